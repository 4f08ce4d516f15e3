"""TwinModel: the trainable twin as one torch module (window in, predicted PAT tags out).

Data flow: a `windows.Window` batch (normalised, in the manifest's tag order) -> the model's
inputs picked by tag name through the flowsheet spec's `inputs` map and denormalised ->
initial state from the past window (`TwinModel.initial_state`, docs/training.md) -> fixed-step
solver over the window's zero-order-held inputs -> `ObservationModel` -> measurements,
normalised again for the loss. The module holds everything it needs (tag maps as index
buffers, normalisation statistics, dt), so the twin issue can script it as it is.
`build_twin_model` is the only place that knows about tag names; the module sees indices.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from hybrid_twin import (
    ConfigError,
    HybridVectorField,
    ObservationModel,
    ZOHSolution,
    build_flowsheet,
    build_solver,
)

INITIAL_STATE_METHODS = ("steady_state", "burn_in", "learned")


def time_rows(t: Tensor, start: int, length: int) -> Tensor:
    """Rows start .. start + length - 1 of dim 1 (time) as a new tensor. Not a `narrow` view:
    whether such a view is contiguous depends on length == 1, which would tie a `torch.export`
    program with a dynamic time dimension to one side of that case."""
    return t.index_select(1, torch.arange(start, start + length, device=t.device))


class TwinModel(nn.Module):
    """x0 from the past window, then x' = f(x, u), y = h(x), on normalised window tensors.

    Args:
        field: the vector field (its kind decides mechanistic / black_box / hybrid).
        observation: y = h(x) for the dataset's measurement tags, in their order.
        solver: a fixed-step solver module wrapping `field` (`hybrid_twin.build_solver`).
        input_columns: (n_model_inputs,) column of the window's u feeding each flowsheet input.
        u_mean, u_std: (n_u,) statistics of all u columns (inputs then disturbances).
        y_mean, y_std: (n_y,) statistics of the measurement tags.
        reset_from_u: (k, 2) rows [state index, u column]: states a held tag measures directly.
        reset_from_y: (m, 2) rows [state index, y column]: states a measurement reads directly.
        dt_s: grid step of the data, s.
        state_floor: (n_states,) smallest state value the readout h(x) sees (-inf: none).
        burn_in: integrate through the past window from its first row's steady state (True)
            or take the steady state at its last row (False).
        learned_start: every run starts, at its first past row, from one learned state
            (`start_offset`, in units of the networks' state normalisation) integrated through
            the past window; for records that all begin from the same unknown state, scored
            from a run's first rows (the Cascaded Tanks protocol). Overrides `burn_in`.
        readout_columns: (k,) y columns whose reading the field's readout network corrects,
            in the order of its `readout` tags; None: none.
    """

    def __init__(
        self,
        field: HybridVectorField,
        observation: ObservationModel,
        solver: nn.Module,
        input_columns: Tensor,
        u_mean: Tensor,
        u_std: Tensor,
        y_mean: Tensor,
        y_std: Tensor,
        reset_from_u: Tensor,
        reset_from_y: Tensor,
        dt_s: float,
        state_floor: Tensor,
        burn_in: bool = True,
        readout_columns: Tensor | None = None,
        learned_start: bool = False,
    ) -> None:
        super().__init__()
        self.field = field
        self.observation = observation
        self.solver = solver
        self.register_buffer("input_columns", input_columns.to(torch.long))
        dtype = torch.get_default_dtype()
        for name, value in (("u_mean", u_mean), ("u_std", u_std), ("y_mean", y_mean)):
            self.register_buffer(name, value.to(dtype))
        self.register_buffer("y_std", y_std.to(dtype))
        self.register_buffer("state_floor", state_floor.to(dtype))
        self.register_buffer("reset_from_u", reset_from_u.to(torch.long).reshape(-1, 2))
        self.register_buffer("reset_from_y", reset_from_y.to(torch.long).reshape(-1, 2))
        columns = torch.zeros(0) if readout_columns is None else readout_columns
        self.register_buffer("readout_columns", columns.to(torch.long))
        self.dt_s = float(dt_s)
        self.burn_in = bool(burn_in)
        self.learned_start = bool(learned_start)
        if self.learned_start:
            # Zero: the normalisation's centre (the nominal steady state, or the data's mean).
            self.start_offset = nn.Parameter(torch.zeros(len(field.flowsheet.state_names)))
        else:  # a plain attribute (TorchScript needs it typed), in no state dict: a scripted
            # module's state_dict would carry even a non-persistent buffer
            self.start_offset = torch.zeros(0)

    def model_inputs(self, u: Tensor) -> Tensor:
        """Normalised window inputs (batch, T, n_u) -> flowsheet inputs (batch, T, n_inputs)."""
        physical = u * self.u_std + self.u_mean
        return physical.index_select(2, self.input_columns)

    def initial_state(self, past_u: Tensor, past_y: Tensor, past_mask: Tensor) -> Tensor:
        """State at the window's first row, (batch, n_states), from the past window.

        Args:
            past_u: (batch, P, n_u) normalised; past_y, past_mask: (batch, P, n_y).

        Returns:
            The learned start (`learned_start`) or the steady state at past_u[:, 0], integrated
            through the past inputs (burn-in), or the steady state at past_u[:, -1]; then
            states a tag measures directly are set to their last good past value (hopper
            masses, impeller speed, tablet weight).
        """
        inputs = self.model_inputs(past_u)
        theta = self.field.theta()
        if self.learned_start or self.burn_in:
            if self.learned_start:
                normaliser = self.field.state_normaliser
                start = normaliser.mean + normaliser.std * self.start_offset
                x = start.unsqueeze(0).repeat(past_u.shape[0], 1)  # contiguous rows (AOTI)
            else:
                x = self.field.flowsheet.steady_state(inputs[:, 0], theta)
            # Interval k ends at past row k + 1; the last ends at t_0, whose row the past
            # window lacks: its pinned states are held at the last past value.
            ends = torch.cat([time_rows(past_u, 1, past_u.shape[1] - 1), past_u[:, -1:]], dim=1)
            x = self._solve(x, inputs, ends).states[:, -1]
        else:
            x = self.field.flowsheet.steady_state(inputs[:, -1], theta)
        if self.reset_from_u.shape[0] > 0:
            last_u = past_u[:, -1] * self.u_std + self.u_mean
            values = last_u.index_select(1, self.reset_from_u[:, 1])
            x = x.index_copy(1, self.reset_from_u[:, 0], values)
        if self.reset_from_y.shape[0] > 0:
            x = self._reset_from_measurements(x, past_y, past_mask)
        # Without a reset, x is a view of the burn-in's trajectory (row stride P n): the
        # exported forecast's time loop needs the state it carries laid out as it returns it.
        return x.clone(memory_format=torch.contiguous_format)

    def _reset_from_measurements(self, x: Tensor, past_y: Tensor, past_mask: Tensor) -> Tensor:
        columns = self.reset_from_y[:, 1]
        y = past_y.index_select(2, columns) * self.y_std.index_select(0, columns)
        y = y + self.y_mean.index_select(0, columns)
        mask = past_mask.index_select(2, columns)
        rows = torch.arange(past_y.shape[1], device=past_y.device).view(1, -1, 1)
        last_row, _ = torch.where(mask, rows, torch.full_like(rows, -1)).max(dim=1)
        seen = last_row >= 0
        last = y.gather(1, last_row.clamp_min(0).unsqueeze(1)).squeeze(1)
        current = x.index_select(1, self.reset_from_y[:, 0])
        return x.index_copy(1, self.reset_from_y[:, 0], torch.where(seen, last, current))

    def _solve(self, x0: Tensor, inputs: Tensor, u_at_ends: Tensor) -> ZOHSolution:
        """Integrate over `inputs` (batch, K, n_inputs) with the states a held tag measures
        directly (reset_from_u: the hopper masses) pinned to that tag at each interval's end.

        Args:
            u_at_ends: (batch, K, n_u) normalised u at the end of each interval.
        """
        if self.reset_from_u.shape[0] == 0:
            return self.solver(x0, inputs, self.dt_s)
        columns = self.reset_from_u[:, 1]
        measured = u_at_ends.index_select(2, columns) * self.u_std.index_select(0, columns)
        measured = measured + self.u_mean.index_select(0, columns)
        return self.solver(x0, inputs, self.dt_s, self.reset_from_u[:, 0], measured)

    @torch.jit.export
    def simulate(
        self, past_u: Tensor, past_y: Tensor, past_mask: Tensor, u: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Predictions and what the loss needs besides them.

        Args:
            past_u: (batch, P, n_u), past_y / past_mask: (batch, P, n_y), u: (batch, T, n_u);
                normalised as the datamodule serves them.

        Returns:
            y_hat: (batch, T, n_y) normalised; states: (batch, T, n_states) at the rows of y
            (row k = x(t_k); row 0 is the initial state); inputs: (batch, T, n_inputs)
            physical flowsheet inputs; status: (batch,) int64 solver status (0 = success).
        """
        x0 = self.initial_state(past_u, past_y, past_mask)
        inputs = self.model_inputs(u)
        # y[:, k] is measured at t_k, so the last input interval is not needed.
        intervals = time_rows(inputs, 0, inputs.shape[1] - 1)
        solution = self._solve(x0, intervals, time_rows(u, 1, u.shape[1] - 1))
        states = solution.states
        # h(x) is defined on physical states only (a negative tablet weight makes the force
        # law's power NaN); a learned field can leave that domain, so the readout is projected.
        y = self.read_out(torch.maximum(states, self.state_floor))
        return (y - self.y_mean) / self.y_std, states, inputs, solution.status

    def read_out(self, states: Tensor) -> Tensor:
        """y = h(x) (batch, T, n_y) in tag units, with the learned readout correction, if any,
        on the tags of `readout_columns`."""
        y = self.observation(states)
        if self.readout_columns.shape[0] == 0:
            return y
        g = self.field.readout_correction(states.reshape(-1, states.shape[-1]))
        factor = torch.exp(g * self.field.readout_log_bound).reshape(
            states.shape[0], states.shape[1], -1
        )
        corrected = y.index_select(2, self.readout_columns) * factor
        return y.index_copy(2, self.readout_columns, corrected)

    def forward(self, past_u: Tensor, past_y: Tensor, past_mask: Tensor, u: Tensor) -> Tensor:
        """Normalised predictions y_hat, (batch, T, n_y); arguments as in `simulate`."""
        return self.simulate(past_u, past_y, past_mask, u)[0]

    @torch.jit.export
    def forecast(self, past_u: Tensor, past_y: Tensor, u: Tensor) -> Tensor:
        """Physical units in and out: the form the registered MLflow model serves.

        Args:
            past_u: (batch, P, n_u) inputs then disturbances, tag units.
            past_y: (batch, P, n_y) measurements, tag units; NaN where not sampled.
            u: (batch, T, n_u) inputs then disturbances over the forecast horizon.

        Returns:
            (batch, T, n_y) predicted measurements, tag units.
        """
        mask = torch.isfinite(past_y)
        past_y_n = torch.where(mask, (past_y - self.y_mean) / self.y_std, torch.zeros_like(past_y))
        y_hat = self.forward(
            (past_u - self.u_mean) / self.u_std, past_y_n, mask, (u - self.u_mean) / self.u_std
        )
        return y_hat * self.y_std + self.y_mean

    @torch.jit.export
    def residual_size(self, states: Tensor, inputs: Tensor) -> Tensor:
        """mean |g_nn(x, u)|^2 of the normalised network output along the trajectory, plus the
        same of the readout correction's network where there is one; 0 if none.

        Args:
            states: (batch, T, n_states); inputs: (batch, T, n_inputs), physical units.
        """
        flat_x = states.reshape(-1, states.shape[-1])
        g = self.field.residual(flat_x, inputs.reshape(-1, inputs.shape[-1]))
        size = torch.zeros((), dtype=states.dtype, device=states.device)
        if g.numel() > 0:
            size = size + g.pow(2).mean()
        if self.readout_columns.shape[0] > 0:
            size = size + self.field.readout_correction(flat_x).pow(2).mean()
        return size


def _columns(
    tags: Sequence[str], wanted: Sequence[str], what: str, where: str, hint: str
) -> list[int]:
    missing = [tag for tag in wanted if tag not in tags]
    if missing:
        raise ConfigError(
            f"{what}: tag {missing[0]!r} is not among the dataset's {where} {list(tags)}; {hint}"
        )
    return [list(tags).index(tag) for tag in wanted]


def _reset_rows(
    mapping: Mapping[str, str], tags: Sequence[str], state_names: Sequence[str]
) -> Tensor:
    rows = [
        [state_names.index(target), list(tags).index(tag)]
        for tag, target in mapping.items()
        if tag in tags and target in state_names
    ]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 2)


def _state_floor(specs: Sequence) -> Tensor:
    # 1e-6 of a state's typical magnitude: far below any real value, far above 0 where the
    # readout divides (API fraction) or raises to a power below 1 (force law).
    floors = [1e-6 * spec.scale if spec.nonnegative else float("-inf") for spec in specs]
    return torch.tensor(floors)


def build_twin_model(
    flowsheet_spec: Mapping[str, object],
    model_config: Mapping[str, object],
    solver_config: Mapping[str, object],
    input_tags: Sequence[str],
    measurement_tags: Sequence[str],
    stats: Sequence[Tensor],
    dt_s: float,
    initial_state: str = "burn_in",
    generator: torch.Generator | None = None,
) -> TwinModel:
    """A TwinModel for a dataset's tag order, from plain mappings (no DictConfig).

    Args:
        flowsheet_spec: configs/flowsheet/<line>.yaml as a mapping.
        model_config: configs/model/<kind>.yaml as a mapping; its optional key
            `state_normalisation` ("nominal", the default, or "data") says what the networks'
            inputs are normalised with (`_normalise_on_data`).
        solver_config: configs/solver/<name>.yaml as a mapping (a fixed-step solver).
        input_tags: the dataset's u columns (inputs then disturbances).
        measurement_tags: the dataset's y columns.
        stats: (u_mean, u_std, y_mean, y_std) as `CDCDataModule.normalisation` gives them.
        dt_s: the dataset's grid step, s.
        initial_state: "burn_in", "steady_state" or "learned" (docs/training.md).
        generator: seeds the residual network's initial weights.

    Raises:
        ConfigError: a flowsheet input tag missing from the dataset's inputs, a dataset tag
            the flowsheet does not map (the message names the tag), an unknown method.
    """
    if initial_state not in INITIAL_STATE_METHODS:
        raise ConfigError(
            f"initial_state: unknown method {initial_state!r}; valid: "
            f"{', '.join(INITIAL_STATE_METHODS)}"
        )
    flowsheet = build_flowsheet(flowsheet_spec)
    held = {
        **dict(flowsheet.tags.get("inputs", {})),
        **dict(flowsheet.tags.get("disturbances", {})),
    }
    observed = {
        **dict(flowsheet.tags.get("measurements", {})),
        **dict(flowsheet.tags.get("disturbances", {})),
    }
    for tags, known, where in (
        (input_tags, held, "inputs or disturbances"),
        (measurement_tags, observed, "measurements"),
    ):
        for tag in tags:
            if tag not in known:
                raise ConfigError(
                    f"dataset tag {tag!r}: the flowsheet maps no {where} tag of that name; "
                    f"known: {', '.join(sorted(known))}"
                )
    input_columns = _columns(
        input_tags,
        flowsheet.input_tags,
        "flowsheet.inputs",
        "u columns",
        "the dataset and configs/flowsheet disagree",
    )
    options = dict(model_config)
    normalisation = str(options.pop("state_normalisation", "nominal"))
    if normalisation not in STATE_NORMALISATIONS:
        raise ConfigError(
            f"model.state_normalisation: unknown choice {normalisation!r}; valid: "
            f"{', '.join(STATE_NORMALISATIONS)}"
        )
    field = HybridVectorField(flowsheet, options, generator)
    if normalisation == "data":
        _normalise_on_data(field, measurement_tags, input_columns, stats)
    observation = ObservationModel(flowsheet, tags=list(measurement_tags))
    solver = build_solver(field, dict(solver_config))
    disturbances = dict(flowsheet.tags.get("disturbances", {}))
    measured = dict(flowsheet.tags.get("measurements", {}))
    u_mean, u_std, y_mean, y_std = stats
    return TwinModel(
        field,
        observation,
        solver,
        torch.tensor(input_columns, dtype=torch.long),
        u_mean,
        u_std,
        y_mean,
        y_std,
        _reset_rows(disturbances, input_tags, flowsheet.state_names),
        _reset_rows(measured, measurement_tags, flowsheet.state_names),
        dt_s,
        _state_floor(flowsheet.state_specs),
        burn_in=initial_state == "burn_in",
        learned_start=initial_state == "learned",
        readout_columns=torch.tensor(
            _columns(
                measurement_tags,
                field.config.readout,
                "model.readout",
                "measurements",
                "configs/model names a tag this dataset does not measure",
            ),
            dtype=torch.long,
        ),
    )


# What the networks' inputs are normalised with: the flowsheet's nominal steady state and its
# magnitude (HybridVectorField's default), or the dataset's statistics (`_normalise_on_data`).
STATE_NORMALISATIONS = ("nominal", "data")


def _normalise_on_data(
    field: HybridVectorField,
    measurement_tags: Sequence[str],
    input_columns: Sequence[int],
    stats: Sequence[Tensor],
) -> None:
    """Normalise the networks' inputs with the dataset's train statistics where it has them.

    Inputs: their tags' mean and std. States that a measurement reads directly (an output
    named like the state, as the past window resets them): that tag's mean and std. Other
    states: centred on the nominal steady state, with their StateSpec scale as std. The
    nominal default (std = |steady state|) squeezes a state that swings around a large
    operating point into a narrow band of the tanh network (the Cascaded Tanks levels: 2-10 V
    around 7.8 V gave inputs of about +-0.5; in a plain-torch prototype of that hybrid the fit
    of the estimation record after 160 steps was 0.51 V so, 0.33 V with inputs of about +-1
    and a readout correction). The residual's bound follows the new std.
    """
    flowsheet = field.flowsheet
    u_mean, u_std, y_mean, y_std = stats
    state_mean = field.state_normaliser.mean.clone()
    state_std = torch.tensor([spec.scale for spec in flowsheet.state_specs], dtype=state_mean.dtype)
    measured = dict(flowsheet.tags.get("measurements", {}))
    for column, tag in enumerate(measurement_tags):
        target = measured.get(tag)
        if target in flowsheet.state_names:
            state = flowsheet.state_names.index(target)
            state_mean[state], state_std[state] = y_mean[column], y_std[column]
    columns = torch.tensor(list(input_columns), dtype=torch.long)
    field.set_normalisation(
        state_mean, state_std, u_mean.index_select(0, columns), u_std.index_select(0, columns)
    )
