"""ScenarioTwin: a trained twin driven open loop through a scenario's inputs.

Place in the data flow: `twin scenario` (training/scenario.py) gets a TwinModel, scripted from
a twin file (`OnlineTwin.twin`, docs/export.md) or from an MLflow run, or eager (tests and
optimisation), and wraps it here with its tag order, units, dt and past window. The twin runs
exactly as `TwinModel.forecast` does (initial state from a past window, fixed-step solver with
the hopper masses pinned to their load-cell column, readout), with one addition: a factor on
each feeder's flowsheet input alone (a feeder disturbance changes what the feeder delivers,
not the recipe the press divides by). With every factor 1 the result is `forecast`'s
(tested). Gradients flow through it, eager or scripted.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hybrid_twin import ConfigError
from training.scenario_spec import LineSpec


@dataclass
class ScenarioTwin:
    """A TwinModel (eager or scripted) with what a scenario needs to know about it.

    Attributes:
        model: the TwinModel; its `initial_state`, `model_inputs`, `_solve` and `read_out`.
        input_tags: (n_u,) u column order (inputs then disturbances).
        measurement_tags: (n_y,) y column order.
        units: tag -> engineering unit.
        dt_s: grid step, s; past_steps: rows of the past window it was trained to start from.
        source: where it came from (a file path, a run id), for reports.
    """

    model: torch.nn.Module
    input_tags: list[str]
    measurement_tags: list[str]
    units: dict[str, str]
    dt_s: float
    past_steps: int
    source: str

    @property
    def dtype(self) -> torch.dtype:
        return self.model.u_mean.dtype

    @property
    def setpoint_tags(self) -> list[str]:
        """u tags the flowsheet takes as inputs (manipulated setpoints), in u order."""
        used = set(self.model.input_columns.tolist())
        return [t for i, t in enumerate(self.input_tags) if i in used]

    def unused_tags(self) -> list[str]:
        """u tags the model reads nowhere (neither an input nor a pinned state)."""
        used = set(self.model.input_columns.tolist()) | set(self.model.reset_from_u[:, 1].tolist())
        return [t for i, t in enumerate(self.input_tags) if i not in used]

    def feeder_input_index(self, line: LineSpec) -> list[int]:
        """(n_feeders,) index of each feeder's `model_input` among the flowsheet inputs.

        Raises:
            ConfigError: a feeder names an input or tag the twin does not have.
        """
        names = list(self.model.field.flowsheet.input_names)
        index = []
        for feeder in line.feeders.values():
            for tag in (feeder.setpoint, feeder.hopper):
                if tag not in self.input_tags:
                    raise ConfigError(f"line.feeders.{feeder.name}: tag {tag!r} is not a twin "
                                      f"input; inputs: {', '.join(self.input_tags)}")  # fmt: skip
            if feeder.model_input not in names:
                raise ConfigError(f"line.feeders.{feeder.name}.input: {feeder.model_input!r} is "
                                  f"not a flowsheet input; valid: {', '.join(names)}")  # fmt: skip
            index.append(names.index(feeder.model_input))
        return index

    def initial_state(self, past_u: Tensor, past_y: Tensor) -> Tensor:
        """x at the row after the past window, (B, n_states).

        Args:
            past_u: (B, P, n_u) tag units; past_y: (B, P, n_y) tag units, NaN = not sampled.
        """
        m = self.model
        mask = torch.isfinite(past_y)
        past_y_n = torch.where(mask, (past_y - m.y_mean) / m.y_std, torch.zeros_like(past_y))
        return m.initial_state((past_u - m.u_mean) / m.u_std, past_y_n, mask)

    def steady_past(self, row: Tensor) -> tuple[Tensor, Tensor]:
        """A past window held at one row: (1, P, n_u) inputs, (1, P, n_y) all NaN."""
        past_u = row.to(self.dtype).reshape(1, 1, -1).expand(1, self.past_steps, -1)
        past_y = torch.full((1, self.past_steps, len(self.measurement_tags)), float("nan"),
                            dtype=self.dtype)  # fmt: skip
        return past_u.contiguous(), past_y

    def simulate(
        self, x0: Tensor, u: Tensor, input_factor: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Open loop from x0 over u.

        Args:
            x0: (B, n_states) at row 0; u: (B, T, n_u) tag units, row k held on [t_k, t_k+1),
                hopper columns pinned at each row as in training.
            input_factor: (B, T, n_inputs) factor on each flowsheet input, or None (all 1).

        Returns:
            y: (B, T, n_y) predicted measurements, tag units (row 0 = h(x0));
            states: (B, T, n_states), row k = x(t_k).
        """
        m = self.model
        u_n = (u - m.u_mean) / m.u_std
        inputs = m.model_inputs(u_n)
        if input_factor is not None:
            inputs = inputs * input_factor
        steps = u.shape[1] - 1
        states = m._solve(x0, inputs.narrow(1, 0, steps), u_n.narrow(1, 1, steps))[0]
        return m.read_out(torch.maximum(states, m.state_floor)), states


def input_factor(twin: ScenarioTwin, line: LineSpec, flow_factor: Tensor) -> Tensor:
    """(B, T, n_feeders) delivered-flow factors -> (B, T, n_inputs) flowsheet input factors."""
    n_inputs = len(twin.model.field.flowsheet.input_names)
    factor = torch.ones(*flow_factor.shape[:2], n_inputs, dtype=flow_factor.dtype)
    index = torch.tensor(twin.feeder_input_index(line), dtype=torch.long)
    return factor.index_copy(2, index, flow_factor)


def twin_from_file(path: str) -> ScenarioTwin:
    """The TwinModel inside a twin file (`twin export`) with the file's metadata.

    Raises:
        TwinFileError: missing or damaged file (training.export.load_twin_file).
    """
    from training.export import load_twin_file

    module, meta = load_twin_file(path)
    return ScenarioTwin(
        module.twin, list(meta["input_tags"]), list(meta["measurement_tags"]),
        dict(meta["units"]), float(meta["dt_s"]), int(meta["past_steps"]),
        f"{path} ({meta['model_kind']}, run {meta['training_run_id']})",
    )  # fmt: skip


def twin_from_model(
    model: torch.nn.Module, input_tags: Sequence[str], measurement_tags: Sequence[str],
    units: Mapping[str, str], past_steps: int, source: str,
) -> ScenarioTwin:  # fmt: skip
    """A ScenarioTwin around a TwinModel (eager or scripted) and a dataset's tag order."""
    return ScenarioTwin(model, list(input_tags), list(measurement_tags), dict(units),
                        float(model.dt_s), int(past_steps), source)  # fmt: skip
