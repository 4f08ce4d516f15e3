"""Operating settings that minimise API-content variability, by gradients through the twin.

Place in the data flow: `twin optimise` (training/optimise.py) parses `optimise:` of
configs/optimise.yaml into an `OperatingProblem` (decision variables with bounds, a seeded set
of feeder disturbance profiles, the attribute and its target) and calls `optimise_settings`
with a ScenarioTwin (training/scenario_twin.py). The objective is the mean squared deviation
of the predicted attribute (the tablets' API content, %LC, by default) from its target over
every profile, each run open loop from the steady state at the settings; the settings are
`low + (high - low) sigmoid(z)` so every iterate is inside its bounds, and z is moved by Adam
on torch.autograd gradients through the solver. training/plant_check.py runs the same
settings and profiles on the simulated plant.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hybrid_twin import ConfigError
from hybrid_twin.errors import config_number, config_range
from training.scenario_spec import LineSpec
from training.scenario_twin import ScenarioTwin, input_factor

THROUGHPUT = "throughput_kg_h"  # the decision variable that scales every feeder setpoint


@dataclass(frozen=True)
class DisturbanceProfile:
    """One feeder disturbance: the feeder delivers (1 + size) x its setpoint on
    [onset_s, onset_s + duration_s) (times on the twin's grid and in whole seconds)."""

    onset_s: float
    duration_s: float
    size: float


@dataclass(frozen=True)
class OperatingProblem:
    """What `optimise_settings` solves.

    Attributes:
        bounds: decision variable -> (low, high); a setpoint tag of the twin (tag units) or
            `throughput_kg_h` (the sum of the feeder setpoints, recipe kept).
        start: decision variable -> its value at the start (the line's nominal point).
        feeder: the disturbed feeder (a name of `line.feeders`).
        profiles: the seeded disturbance set; each is one trajectory of the batch.
        dt_s: the twin's grid step, s; steps: rows per trajectory; from_row: the first row
            the objective counts.
        tag, target: the attribute (a predicted tag) and the value it should hold.
        iterations, learning_rate: Adam on the unconstrained z.
    """

    bounds: dict[str, tuple[float, float]]
    start: dict[str, float]
    feeder: str
    profiles: tuple[DisturbanceProfile, ...]
    dt_s: float
    steps: int
    from_row: int
    tag: str
    target: float
    iterations: int
    learning_rate: float


def parse_problem(
    raw: Mapping, line: LineSpec, twin: ScenarioTwin, where: str = "optimise"
) -> OperatingProblem:
    """`optimise:` of configs/optimise.yaml -> OperatingProblem, checked against the twin.

    A decision variable whose range is null is left out (an override merges into the
    default settings, so this is how one is dropped).

    Raises:
        ConfigError: an unknown decision variable, feeder or tag, bounds not low < start < high,
            throughput_kg_h together with a feeder setpoint,
            a time off the twin's grid, an objective that starts at or after the horizon, an
            empty or nonpositive range; names the key.
    """
    nominal = dict(line.nominal_setpoints)
    nominal[THROUGHPUT] = sum(nominal[f.setpoint] for f in line.feeders.values())
    bounds, start = {}, {}
    for name, pair in (raw.get("settings") or {}).items():
        if pair is None:  # Hydra merges overrides into the default settings: null drops one
            continue
        key = f"{where}.settings.{name}"
        if name != THROUGHPUT and name not in twin.setpoint_tags:
            valid = ", ".join([THROUGHPUT, *twin.setpoint_tags])
            raise ConfigError(f"{key}: not a decision variable of this twin; valid: {valid}")
        low, high = config_range(pair, key)
        if not low < nominal[name] < high:
            raise ConfigError(
                f"{key}: expected [low, high] around the start value "
                f"{nominal[name]:g} (line.nominal_setpoints), got {list(pair)}"
            )
        bounds[name], start[name] = (low, high), nominal[name]
    if not bounds:
        raise ConfigError(f"{where}.settings: name at least one decision variable")
    feeder_setpoints = [f.setpoint for f in line.feeders.values() if f.setpoint in bounds]
    if THROUGHPUT in bounds and feeder_setpoints:  # both would set the same feeder setpoints
        raise ConfigError(
            f"{where}.settings: {THROUGHPUT} scales every feeder setpoint (the recipe kept), so "
            f"it cannot be optimised together with {', '.join(feeder_setpoints)}; drop one "
            f"(null drops a default setting)"
        )
    dist = raw["disturbances"]
    feeder = str(dist["feeder"])
    if feeder not in line.feeders:
        raise ConfigError(
            f"{where}.disturbances.feeder: unknown feeder {feeder!r}; valid: "
            f"{', '.join(line.feeders)}"
        )
    horizon_min = config_number(raw["horizon_min"], f"{where}.horizon_min", "min")
    steps = _rows(horizon_min * 60.0, twin.dt_s, f"{where}.horizon_min")
    objective = raw["objective"]
    if objective["tag"] not in twin.measurement_tags:
        raise ConfigError(
            f"{where}.objective.tag: {objective['tag']!r} is not predicted; "
            f"tags: {', '.join(twin.measurement_tags)}"
        )
    from_row = _objective_start_row(objective, steps, twin.dt_s, where)
    profiles = draw_profiles(dist, twin.dt_s, steps, f"{where}.disturbances")
    return OperatingProblem(
        bounds,
        start,
        feeder,
        profiles,
        twin.dt_s,
        steps,
        from_row,
        str(objective["tag"]),
        config_number(objective["target"], f"{where}.objective.target"),
        _count(raw["optimiser"]["iterations"], f"{where}.optimiser.iterations", minimum=0),
        config_number(raw["optimiser"]["learning_rate"], f"{where}.optimiser.learning_rate"),
    )


def _objective_start_row(objective: Mapping, steps: int, dt_s: float, where: str) -> int:
    """The first row `objective.from_min` counts; it must leave rows before the horizon, else
    the objective is the mean of no rows (NaN), which optimise_settings would only report as
    a non-finite objective."""
    key = f"{where}.objective.from_min"
    from_min = config_number(objective["from_min"], key, "min")
    from_row = _rows(from_min * 60.0, dt_s, key)
    if from_row >= steps:
        raise ConfigError(
            f"{key}: {from_min:g} min is not before {where}.horizon_min "
            f"({steps * dt_s / 60:g} min): the objective would count no row"
        )
    return from_row


def draw_profiles(
    raw: Mapping, dt_s: float, steps: int, where: str
) -> tuple[DisturbanceProfile, ...]:
    """`n_profiles` disturbances with onset, duration and size uniform in their ranges, from
    numpy's default_rng(seed); onset and duration rounded to the twin's grid.

    Raises:
        ConfigError: a range that is not [low, high], an onset < 0, a duration <= 0, a size
            outside (-1, 1), a disturbance that does not end before the horizon.
    """
    rng = np.random.default_rng(_count(raw["seed"], f"{where}.seed", minimum=0))
    ranges = {}
    for key in ("onset_min", "duration_min", "size"):
        low, high = config_range(raw[key], f"{where}.{key}")
        if not low <= high:
            raise ConfigError(f"{where}.{key}: expected [low, high], got {list(raw[key])}")
        ranges[key] = (low, high)
    if ranges["onset_min"][0] < 0.0:  # a negative row would wrap to the horizon's end
        raise ConfigError(f"{where}.onset_min: expected minutes >= 0 after the start, got "
                          f"{list(raw['onset_min'])}")
    if not ranges["duration_min"][0] > 0.0:
        raise ConfigError(f"{where}.duration_min: expected minutes > 0, got "
                          f"{list(raw['duration_min'])}")
    if not (-1.0 < ranges["size"][0] and ranges["size"][1] < 1.0):
        raise ConfigError(
            f"{where}.size: expected a relative change of the delivered flow in (-1, 1), got "
            f"{list(raw['size'])}"
        )
    profiles = []
    for _ in range(_count(raw["n_profiles"], f"{where}.n_profiles")):
        onset = round(rng.uniform(*ranges["onset_min"]) * 60.0 / dt_s) * dt_s
        duration = max(1, round(rng.uniform(*ranges["duration_min"]) * 60.0 / dt_s)) * dt_s
        profiles.append(DisturbanceProfile(onset, duration, float(rng.uniform(*ranges["size"]))))
        if (onset + duration) / dt_s >= steps:
            raise ConfigError(
                f"{where}: a disturbance ends at {(onset + duration) / 60:g} min, "
                f"after the horizon; shorten onset_min or duration_min"
            )
    return tuple(profiles)


def flow_factors(problem: OperatingProblem, line: LineSpec, dt_s: float) -> np.ndarray:
    """(n_profiles, steps, n_feeders) delivered-flow factor of each feeder, per row."""
    factor = np.ones((len(problem.profiles), problem.steps, len(line.feeders)))
    j = list(line.feeders).index(problem.feeder)
    for i, p in enumerate(problem.profiles):
        k0 = round(p.onset_s / dt_s)
        factor[i, k0 : k0 + round(p.duration_s / dt_s), j] = 1.0 + p.size
    return factor


def setpoint_row(
    twin: ScenarioTwin, line: LineSpec, problem: OperatingProblem, values: Tensor
) -> Tensor:
    """(n_u,) u row at the settings `values` (problem.bounds order), differentiable in them:
    the nominal setpoints with each decision variable applied; hopper columns at
    line.hoppers_kg; tags the twin reads nowhere at its u mean."""
    row = twin.model.u_mean.detach().clone().to(values.dtype)
    for tag, value in line.nominal_setpoints.items():
        row[twin.input_tags.index(tag)] = value
    for feeder in line.feeders.values():
        row[twin.input_tags.index(feeder.hopper)] = line.hoppers_kg[feeder.name]
    nominal_total = sum(line.nominal_setpoints[f.setpoint] for f in line.feeders.values())
    for name, value in zip(problem.bounds, values, strict=True):
        if name == THROUGHPUT:
            for feeder in line.feeders.values():
                column = twin.input_tags.index(feeder.setpoint)
                row[column] = line.nominal_setpoints[feeder.setpoint] * value / nominal_total
        else:
            row[twin.input_tags.index(name)] = value
    return row


def twin_objective(
    twin: ScenarioTwin,
    line: LineSpec,
    problem: OperatingProblem,
    values: Tensor,
    factors: Tensor,
) -> tuple[Tensor, Tensor]:
    """Mean squared deviation of the attribute from its target over every profile.

    Args:
        values: (n_settings,) decision variables, problem.bounds order, tag units.
        factors: (n_profiles, steps, n_feeders) delivered-flow factors (flow_factors).

    Returns:
        The objective (a scalar, tag units squared) and the attribute (n_profiles, steps).
    """
    row = setpoint_row(twin, line, problem, values)
    past_u, past_y = twin.steady_past(row)
    x0 = twin.initial_state(past_u, past_y)
    u = row.reshape(1, 1, -1).expand(factors.shape[0], problem.steps, -1)
    # The hoppers drain at the delivered flow (scenario_spec's mass balance, without refills).
    for j, feeder in enumerate(line.feeders.values()):
        column = twin.input_tags.index(feeder.hopper)
        drained = torch.cumsum(row[twin.input_tags.index(feeder.setpoint)] * factors[:, :, j], 1)
        mass = row[column] - (drained - drained[:, :1]) * twin.dt_s / 3600.0
        u = torch.cat(
            [u[:, :, :column], mass.clamp_min(0.0)[:, :, None], u[:, :, column + 1 :]], dim=2
        )
    y, _ = twin.simulate(x0.expand(factors.shape[0], -1), u, input_factor(twin, line, factors))
    attribute = y[:, :, twin.measurement_tags.index(problem.tag)]
    return ((attribute[:, problem.from_row :] - problem.target) ** 2).mean(), attribute


@dataclass(frozen=True)
class OptimisationResult:
    """Where the gradient search went.

    Attributes:
        start, best: decision variable -> value at the start and at the lowest objective.
        objective_start, objective_best: the twin's objective there (tag units squared).
        history: per iteration (iteration, objective, *settings), the start first.
    """

    start: dict[str, float]
    best: dict[str, float]
    objective_start: float
    objective_best: float
    history: list[tuple[float, ...]]


def optimise_settings(
    twin: ScenarioTwin, line: LineSpec, problem: OperatingProblem
) -> OptimisationResult:
    """Adam on z with settings = low + (high - low) sigmoid(z), from the nominal point.

    Returns:
        The settings of the lowest objective seen (Adam's last iterate need not be it).

    Raises:
        RuntimeError: a non-finite objective (the message names the settings).
    """
    low = torch.tensor([b[0] for b in problem.bounds.values()], dtype=twin.dtype)
    high = torch.tensor([b[1] for b in problem.bounds.values()], dtype=twin.dtype)
    start = torch.tensor(list(problem.start.values()), dtype=twin.dtype)
    z = torch.logit((start - low) / (high - low)).requires_grad_(True)
    factors = torch.as_tensor(flow_factors(problem, line, twin.dt_s), dtype=twin.dtype)
    adam = torch.optim.Adam([z], lr=problem.learning_rate)
    history: list[tuple[float, ...]] = []
    for iteration in range(problem.iterations + 1):
        values = low + (high - low) * torch.sigmoid(z)
        objective, _ = twin_objective(twin, line, problem, values, factors)
        value = objective.detach().item()
        if not math.isfinite(value):
            raise RuntimeError(f"optimise: non-finite objective at {values.detach().tolist()}")
        history.append((iteration, value, *values.detach().tolist()))
        if iteration == problem.iterations:
            break
        adam.zero_grad()
        objective.backward()
        adam.step()
    names = list(problem.bounds)
    best = min(history, key=lambda h: h[1])
    return OptimisationResult(
        dict(zip(names, history[0][2:], strict=True)),
        dict(zip(names, best[2:], strict=True)),
        history[0][1],
        best[1],
        history,
    )


def _count(value: object, where: str, minimum: int = 1) -> int:
    """A whole number >= minimum from the config; ConfigError naming `where` otherwise."""
    number = config_number(value, where)
    if not number.is_integer() or number < minimum:
        raise ConfigError(f"{where}: expected a whole number >= {minimum}, got {value!r}")
    return int(number)


def _rows(seconds: float, dt_s: float, where: str) -> int:
    rows = seconds / dt_s
    if abs(rows - round(rows)) > 1e-6 or rows < 0:
        raise ConfigError(f"{where}: {seconds / 60:g} min is not a whole number of {dt_s:g} s rows")
    return int(round(rows))
