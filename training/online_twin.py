"""OnlineTwin: the trained twin, its extended Kalman filter and its fault detector as one module.

Place in the data flow: `training.export` builds an `OnlineTwin` from a registered
`TwinModel`, fits its `InnovationMonitor` on normal validation runs, scripts it and writes the
TorchScript twin file (docs/export.md). The module holds no Python state: the caller keeps,
per line, the state tuple

    (x (B, n_states), P (B, n_states, n_states), u_held (B, n_u), ewma (B, n_y), run_length (B,))

x: filtered state at the time of the last row given; P: its covariance; u_held: that row's
inputs and disturbances in tag units (held, zero-order, over the next interval); ewma and
run_length: the monitor's memory (hybrid_twin/monitoring.py). Every argument and output is in
engineering (tag) units, batched over lines in dim 0, in the dataset's tag order.

Step convention (the same as `TwinModel._solve`): `update(state at t_k, row at t_(k+1))`
integrates [t_k, t_(k+1)) with the model inputs of u_held (the row at t_k), pins the hopper
masses to the load cells of the new row (TwinModel.reset_from_u), updates with the new row's
measurements where mask is True and finite, steps the monitor and holds the new row's inputs.
"""

import torch
from torch import Tensor, nn

from hybrid_twin import ExtendedKalmanFilter, InnovationMonitor, MonitorState
from training.twin_model import TwinModel, time_rows

STATE_FIELDS = ("x", "P", "u_held", "ewma", "run_length")
UPDATE_OUTPUTS = STATE_FIELDS + (
    "prediction",
    "residual",
    "residual_var",
    "t2",
    "t2_limit",
    "ewma_stat",
    "alarm",
    "contributions",
    "status",
)


class TwinReadout(nn.Module):
    """y = TwinModel.read_out(x) for single states: (B, n_states) -> (B, n_y), tag units.

    The EKF's observation: h(x) with the twin's learned readout correction, so the filter
    predicts exactly what the model does (the EKF floors the states itself first).
    """

    def __init__(self, twin: TwinModel) -> None:
        super().__init__()
        self.twin = twin

    def forward(self, states: Tensor) -> Tensor:
        return self.twin.read_out(states.unsqueeze(1)).squeeze(1)


class OnlineTwin(nn.Module):
    """Forecast, state estimation and fault detection around one trained TwinModel.

    Args:
        twin: the trained TwinModel (its solver, readout and normalisation are used as they are).
        q: (n_states,) process noise variance per state and step, state units^2.
        r: (n_y,) measurement noise variance per tag, tag units^2.
        p0_std: (n_states,) prior standard deviation of the initial state, state units.
        monitor: the fitted detector over the n_y measurement tags (`hybrid_twin.fit_monitor`).
        fd_scheme: the EKF's transition Jacobian, "central" (default, the reference) or
            "forward" (half the solver rows; ExtendedKalmanFilter, benchmarks/online_latency.md).

    Raises:
        ShapeError, ConfigError: from ExtendedKalmanFilter for bad q, r (sizes, signs).
    """

    def __init__(
        self,
        twin: TwinModel,
        q: Tensor,
        r: Tensor,
        p0_std: Tensor,
        monitor: InnovationMonitor,
        fd_scheme: str = "central",
    ) -> None:
        super().__init__()
        self.twin = twin
        self.ekf = ExtendedKalmanFilter(
            twin.solver,
            TwinReadout(twin),
            twin.dt_s,
            q,
            r,
            state_scale=twin.field.state_normaliser.std.detach().clone(),
            state_floor=twin.state_floor.detach().clone(),
            fd_scheme=fd_scheme,
        )
        self.monitor = monitor
        p0_var = p0_std.detach().to(twin.state_floor.dtype) ** 2
        # Pinned states are known from their load cells: no prior uncertainty.
        p0_var = p0_var.index_fill(0, twin.reset_from_u[:, 0], 0.0)
        self.register_buffer("p0_var", p0_var.clone())
        self.register_buffer("pin_index", twin.reset_from_u[:, 0].clone())
        self.register_buffer("pin_columns", twin.reset_from_u[:, 1].clone())
        self.n_u = int(twin.u_mean.shape[0])
        self.n_y = int(twin.y_mean.shape[0])

    @torch.jit.export
    def forecast(self, past_u: Tensor, past_y: Tensor, u: Tensor) -> Tensor:
        """Open-loop forecast, as `TwinModel.forecast`.

        Args:
            past_u: (B, P, n_u) inputs then disturbances, tag units.
            past_y: (B, P, n_y) measurements, tag units; NaN where not sampled.
            u: (B, T, n_u) over the horizon (row 0 is the first row after the past window).

        Returns:
            (B, T, n_y) predicted measurements, tag units (row 0 = h(x) at that first row).

        Raises:
            ValueError: a past window of fewer than 2 rows or a horizon of none.
        """
        _check_rows(past_u, 2, "past_u")
        _check_rows(u, 1, "u")
        return self.twin.forecast(past_u, past_y, u)

    @torch.jit.export
    def initial_state(
        self, past_u: Tensor, past_y: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Filter state at the past window's last row.

        x: `TwinModel.initial_state` over rows 0..P-2 (burn-in + direct-measurement resets),
        which lands on row P-1; the hopper masses pinned to row P-1's load cells; then one EKF
        update with row P-1's measurements from the prior P0 = diag(p0_std^2).

        Args:
            past_u: (B, P, n_u), P >= 2, tag units; past_y: (B, P, n_y), NaN = not sampled.

        Returns:
            (x, P, u_held, ewma, run_length) as in the module docstring; u_held = past_u[:, -1].

        Raises:
            ValueError: a past window of fewer than 2 rows.
        """
        _check_rows(past_u, 2, "past_u")
        steps = past_u.shape[1]
        head_u = time_rows(past_u, 0, steps - 1)
        head_y = time_rows(past_y, 0, steps - 1)
        mask = torch.isfinite(head_y)
        twin = self.twin
        head_y_n = torch.where(mask, (head_y - twin.y_mean) / twin.y_std, torch.zeros_like(head_y))
        x = twin.initial_state((head_u - twin.u_mean) / twin.u_std, head_y_n, mask)
        last_u = past_u[:, -1]
        x = x.index_copy(1, self.pin_index, last_u.index_select(1, self.pin_columns))
        P = torch.diag_embed(self.p0_var.expand_as(x))
        last_y = past_y[:, -1]
        x, P, _, _, _ = self.ekf.update(x, P, last_y, torch.isfinite(last_y))
        ewma, run_length = self.monitor.initial_state(x.shape[0])
        return x, P, last_u, ewma, run_length

    @torch.jit.export
    def predict(
        self, x: Tensor, P: Tensor, u_held: Tensor, inputs: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """EKF time update only: one interval under u_held, hopper masses pinned to `inputs`.

        Args:
            x: (B, n_states); P: (B, n_states, n_states); u_held: (B, n_u) the row at t_k;
            inputs: (B, n_u) the row at t_(k+1), tag units.

        Returns:
            x_pred (B, n_states), P_pred (B, n_states, n_states), status (B,) int64 (0 = ok).
        """
        model_u = u_held.index_select(1, self.twin.input_columns)
        pins = inputs.index_select(1, self.pin_columns)
        return self.ekf.predict(x, P, model_u, self.pin_index, pins)

    @torch.jit.export
    def filter_step(
        self,
        x: Tensor,
        P: Tensor,
        u_held: Tensor,
        inputs: Tensor,
        measurement: Tensor,
        mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """`predict` then the EKF measurement update (no monitor).

        Returns:
            x, P, innovation (B, n_y; 0 where not used), innovation_var (B, n_y),
            prediction (B, n_y) = h(x_pred), status (B,).
        """
        x_pred, P_pred, status = self.predict(x, P, u_held, inputs)
        x, P, innovation, innovation_var, prediction = self.ekf.update(
            x_pred, P_pred, measurement, mask
        )
        return x, P, innovation, innovation_var, prediction, status

    @torch.jit.export
    def update(
        self,
        x: Tensor,
        P: Tensor,
        u_held: Tensor,
        ewma: Tensor,
        run_length: Tensor,
        inputs: Tensor,
        measurement: Tensor,
        mask: Tensor,
    ) -> tuple[
        Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
        Tensor, Tensor, Tensor,
    ]:
        """One grid step for each line: predict, update, monitor.

        Args:
            x, P, u_held, ewma, run_length: the state tuple of the previous row (module
                docstring), from `initial_state` or the previous `update`.
            inputs: (B, n_u) the new row's inputs then disturbances, tag units.
            measurement: (B, n_y) the new row's measurements, tag units (NaN allowed).
            mask: (B, n_y) bool, True where sampled; a tag is used where mask and finite.

        Returns:
            The new state tuple (x, P, u_held = inputs, ewma, run_length), then
            prediction (B, n_y): one-step prediction h(x_pred) of the new row, tag units;
            residual (B, n_y): measurement - prediction where used, 0 elsewhere;
            residual_var (B, n_y): its predicted variance, tag units^2;
            t2 (B,): Hotelling T^2 of the standardised residuals over the used tags;
            t2_limit (B,): its threshold for that number of tags (inf if none used);
            ewma_stat (B, n_y): |EWMA| over its normal RMS (drift statistic per tag);
            alarm (B,) bool; contributions (B, n_y): per-tag contribution to T^2;
            status (B,) int64 solver status (0 = success).
        """
        x, P, residual, residual_var, prediction, status = self.filter_step(
            x, P, u_held, inputs, measurement, mask
        )
        used = mask & torch.isfinite(measurement)
        ewma, run_length, t2, ewma_stat, alarm, contributions = self._monitor(
            ewma, run_length, residual, residual_var, used
        )
        t2_limit = self.monitor.t2_limit(used)
        return (
            x, P, inputs, ewma, run_length, prediction, residual, residual_var, t2, t2_limit,
            ewma_stat, alarm, contributions, status,
        )  # fmt: skip

    def _monitor(
        self, ewma: Tensor, run_length: Tensor, residual: Tensor, residual_var: Tensor, used: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        step = self.monitor.step(MonitorState(ewma, run_length), residual, residual_var, used)
        state = step.state
        return state.ewma, state.run_length, step.t2, step.ewma_stat, step.alarm, step.contributions

    def forward(self, past_u: Tensor, past_y: Tensor, u: Tensor) -> Tensor:
        """Same as `forecast`."""
        return self.forecast(past_u, past_y, u)


def _check_rows(rows: Tensor, minimum: int, name: str) -> None:
    """A (B, T, n) argument with at least `minimum` rows, else a message naming it (instead of
    an indexing error deep in the twin)."""
    if rows.dim() != 3 or rows.shape[1] < minimum:
        raise ValueError(
            f"{name}: expected (batch, rows >= {minimum}, columns), got {list(rows.shape)}"
        )


def placeholder_monitor(n_tags: int) -> InnovationMonitor:
    """A monitor that never alarms, for running the filter before the real one is fitted."""
    big = 1e30
    return InnovationMonitor(
        torch.zeros(n_tags),
        torch.ones(n_tags),
        torch.eye(n_tags),
        torch.full((n_tags + 1,), big),
        torch.ones(n_tags),
        big,
        0.1,
    )
