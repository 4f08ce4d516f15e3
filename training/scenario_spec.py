"""What-if scenarios as data: a scenario file -> validated events -> input trajectories.

Place in the data flow: `twin scenario` (training/scenario.py) reads configs/scenario.yaml and
one file per scenario from configs/scenarios/; `parse_scenario` checks each against the line
description (`LineSpec`: which setpoint tag and hopper tag belong to which feeder) and
`scenario_inputs` turns it into what the twin is run on (training/scenario_twin.py): the u rows
in tag units (setpoints after every step, hopper masses from the mass balance with refills)
and a per-row factor on each feeder's delivered flow (a feeder disturbance). Nothing here
imports torch; times are in seconds from the scenario's start (row 0 = t 0).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hybrid_twin import ConfigError
from hybrid_twin.errors import config_number, config_range

EVENT_KEYS = {
    "setpoint_step": {"type", "at_min", "tag", "value"},
    "throughput_change": {"type", "at_min", "factor"},
    "refill": {"type", "at_min", "feeder", "to_kg"},
    "feeder_disturbance": {"type", "at_min", "feeder", "size", "duration_min"},
}
START_KINDS = ("steady_state", "recorded")
SCENARIO_KEYS = {"name", "description", "duration_min", "start", "events", "spec_limits"}
START_KEYS = {
    "steady_state": {"from", "setpoints", "hoppers_kg"},
    "recorded": {"from", "run", "time_min"},
}


@dataclass(frozen=True)
class Feeder:
    """One loss-in-weight feeder as the scenario sees it.

    Attributes:
        name: the scenario files' name for it, e.g. "api".
        setpoint: its mass-flow setpoint tag (a twin input), kg/h.
        hopper: its hopper load-cell tag (a twin disturbance), kg.
        model_input: the flowsheet input the setpoint drives, e.g. "feeder_api.mass_flow_sp_kg_h";
            a feeder disturbance scales this input alone, so the recipe the press knows is kept.
    """

    name: str
    setpoint: str
    hopper: str
    model_input: str


@dataclass(frozen=True)
class LineSpec:
    """The line around the twin: its feeders and the default steady-state operating point."""

    feeders: dict[str, Feeder]
    nominal_setpoints: dict[str, float]
    hoppers_kg: dict[str, float]


@dataclass(frozen=True)
class Event:
    """One scenario event; `rows` is (first row, end row) it acts on, end exclusive."""

    kind: str
    rows: tuple[int, int]
    tag: str = ""
    feeder: str = ""
    value: float = 0.0


@dataclass(frozen=True)
class Start:
    """steady_state: setpoints and hopper masses given; recorded: a run's state at a time."""

    kind: str
    setpoints: dict[str, float] = field(default_factory=dict)
    hoppers_kg: dict[str, float] = field(default_factory=dict)
    run: str = ""
    time_s: float = 0.0


@dataclass(frozen=True)
class Scenario:
    """A validated scenario: `steps` rows of dt_s from `start`, `events` sorted by time."""

    name: str
    description: str
    steps: int
    start: Start
    events: tuple[Event, ...]
    spec_limits: dict[str, tuple[float, float]]
    source: str


def parse_line(line: Mapping, where: str = "line") -> LineSpec:
    """`line:` of configs/scenario.yaml -> LineSpec.

    Raises:
        ConfigError: a missing key or a feeder without setpoint, hopper or input (names the key).
    """
    feeders = {}
    for name, spec in _required(line, "feeders", where).items():
        keys = {"setpoint", "hopper", "input"}
        _check_keys(spec, keys, keys, f"{where}.feeders.{name}")
        feeders[str(name)] = Feeder(str(name), spec["setpoint"], spec["hopper"], spec["input"])
    nominal = {
        str(k): config_number(v, f"{where}.nominal_setpoints.{k}")
        for k, v in _required(line, "nominal_setpoints", where).items()
    }
    hoppers = {
        str(k): config_number(v, f"{where}.hoppers_kg.{k}", "kg")
        for k, v in _required(line, "hoppers_kg", where).items()
    }
    _check_feeder_names(hoppers, feeders, f"{where}.hoppers_kg")
    return LineSpec(feeders, nominal, hoppers)


def parse_scenario(
    raw: Mapping,
    source: str,
    line: LineSpec,
    setpoint_tags: Sequence[str],
    dt_s: float,
    default_limits: Mapping[str, Sequence[float]],
) -> Scenario:
    """One scenario file's mapping -> Scenario, checked against the twin's tags.

    Args:
        raw: the file's content; source: its path, named in every error.
        line: the feeders; setpoint_tags: the twin's input tags a scenario may set.
        dt_s: the twin's grid step; event times must fall on it.
        default_limits: the root config's spec limits, which the file's `spec_limits` update.

    Raises:
        ConfigError: unknown or missing keys, an unknown event type, feeder or tag, an event
            time off the grid or past the end, a nonpositive duration or factor; the message
            names the file and the key.
    """
    _check_keys(raw, SCENARIO_KEYS, {"name", "duration_min", "start"}, source)
    duration_min = config_number(raw["duration_min"], f"{source}: duration_min", "min")
    steps = _rows(duration_min * 60.0, dt_s, f"{source}: duration_min")
    if steps < 2:
        raise ConfigError(f"{source}: duration_min must cover at least 2 rows of {dt_s:g} s")
    start = _parse_start(raw["start"], f"{source}: start", line, setpoint_tags)
    events = tuple(
        sorted(
            (
                _parse_event(e, f"{source}: events[{i}]", line, setpoint_tags, dt_s, steps)
                for i, e in enumerate(raw.get("events") or [])
            ),
            key=lambda e: e.rows[0],
        )
    )
    limits = {**default_limits, **(raw.get("spec_limits") or {})}
    spec_limits = {}
    for tag, pair in limits.items():
        low, high = config_range(pair, f"{source}: spec_limits.{tag}")
        if not low < high:
            raise ConfigError(f"{source}: spec_limits.{tag}: expected [low, high], got {pair}")
        spec_limits[str(tag)] = (low, high)
    return Scenario(
        str(raw["name"]), str(raw.get("description", "")), steps, start, events, spec_limits,
        source,
    )  # fmt: skip


@dataclass(frozen=True)
class ScenarioInputs:
    """What the twin runs a scenario on.

    Attributes:
        u: (steps, n_u) inputs then disturbances in tag units; hopper columns from the mass
            balance (delivered flow drains the hopper, a refill sets it).
        flow_factor: (steps, n_feeders) factor on each feeder's delivered flow (1 = none).
        throughput_kg_h: (steps,) the sum of the feeders' delivered flows (0 from a feeder
            whose hopper is empty, until a refill).
        hopper_empty_s: feeder -> first time its hopper reaches 0 (the mass balance stops at
            0: a hopper cannot hold less), for the feeders that run empty.
    """

    u: np.ndarray
    flow_factor: np.ndarray
    throughput_kg_h: np.ndarray
    hopper_empty_s: dict[str, float]


def scenario_inputs(
    scenario: Scenario, line: LineSpec, input_tags: Sequence[str], first_row: np.ndarray,
    dt_s: float,
) -> ScenarioInputs:  # fmt: skip
    """Apply the events to the held first row and integrate the hopper masses.

    Args:
        first_row: (n_u,) tag units: the held inputs and the hopper masses at t 0.

    Raises:
        ConfigError: a throughput change or step that leaves a setpoint negative.
    """
    tags = list(input_tags)
    feeders = list(line.feeders.values())
    u = np.tile(np.asarray(first_row, dtype=np.float64), (scenario.steps, 1))
    factor = np.ones((scenario.steps, len(feeders)))
    refills: dict[int, dict[int, float]] = {}
    for event in scenario.events:
        k0, k1 = event.rows
        if event.kind == "setpoint_step":
            u[k0:, tags.index(event.tag)] = event.value
        elif event.kind == "throughput_change":
            for feeder in feeders:
                u[k0:, tags.index(feeder.setpoint)] *= event.value
        elif event.kind == "feeder_disturbance":
            factor[k0:k1, [f.name for f in feeders].index(event.feeder)] *= 1.0 + event.value
        else:  # refill
            hopper = tags.index(line.feeders[event.feeder].hopper)
            refills.setdefault(k0, {})[hopper] = event.value
    delivered = np.stack([u[:, tags.index(f.setpoint)] for f in feeders], axis=1) * factor
    if (delivered < 0).any():
        k, j = np.argwhere(delivered < 0)[0]
        raise ConfigError(
            f"{scenario.source}: feeder {feeders[j].name} setpoint is negative at "
            f"{k * dt_s / 60:g} min"
        )
    empty = {}
    for j, feeder in enumerate(feeders):
        column = tags.index(feeder.hopper)
        mass = u[0, column]
        for k in range(scenario.steps):
            mass = refills.get(k, {}).get(column, mass)
            u[k, column] = mass
            if mass <= 0.0:  # an empty feeder delivers nothing: not to the kg and tablets
                delivered[k, j] = 0.0
                empty.setdefault(feeder.name, k * dt_s)
            mass = max(mass - delivered[k, j] * dt_s / 3600.0, 0.0)
    return ScenarioInputs(u, factor, delivered.sum(axis=1), empty)


def _parse_start(raw: Mapping, where: str, line: LineSpec, setpoint_tags: Sequence[str]) -> Start:
    kind = raw.get("from") if isinstance(raw, Mapping) else None
    if kind not in START_KINDS:
        raise ConfigError(f"{where}.from: expected one of {', '.join(START_KINDS)}, got {kind!r}")
    _check_keys(raw, START_KEYS[kind], {"from"}, where)
    if kind == "recorded":
        for key in ("run", "time_min"):
            if key not in raw:
                raise ConfigError(f"{where}.{key}: required for a recorded start")
        time_min = config_number(raw["time_min"], f"{where}.time_min", "min")
        return Start(kind, run=str(raw["run"]), time_s=time_min * 60.0)
    setpoints = {**line.nominal_setpoints, **(raw.get("setpoints") or {})}
    for tag in setpoints:
        _check_tag(tag, setpoint_tags, f"{where}.setpoints")
    missing = [tag for tag in setpoint_tags if tag not in setpoints]
    if missing:
        raise ConfigError(f"{where}.setpoints: no value for {missing[0]!r} here or in "
                          f"line.nominal_setpoints")  # fmt: skip
    hoppers = {**line.hoppers_kg, **(raw.get("hoppers_kg") or {})}
    _check_feeder_names(hoppers, line.feeders, f"{where}.hoppers_kg")
    empty = [name for name in line.feeders if name not in hoppers]
    if empty:
        raise ConfigError(f"{where}.hoppers_kg: no mass for feeder {empty[0]!r} here or in "
                          f"line.hoppers_kg")  # fmt: skip
    setpoints = {k: config_number(v, f"{where}.setpoints.{k}") for k, v in setpoints.items()}
    hoppers = {k: config_number(v, f"{where}.hoppers_kg.{k}", "kg") for k, v in hoppers.items()}
    for key, values in (("setpoints", setpoints), ("hoppers_kg", hoppers)):
        negative = [k for k, v in values.items() if v < 0.0]
        if negative:  # flows, speeds, weights and masses are >= 0 in their units
            raise ConfigError(f"{where}.{key}.{negative[0]}: must be >= 0, got "
                              f"{values[negative[0]]:g}")  # fmt: skip
    return Start(kind, setpoints, hoppers)


def _parse_event(
    raw: Mapping, where: str, line: LineSpec, setpoint_tags: Sequence[str], dt_s: float, steps: int
) -> Event:
    kind = raw.get("type") if isinstance(raw, Mapping) else None
    if kind not in EVENT_KEYS:
        raise ConfigError(f"{where}.type: unknown event {kind!r}; valid: {', '.join(EVENT_KEYS)}")
    _check_keys(raw, EVENT_KEYS[kind], EVENT_KEYS[kind], where)
    at_min = config_number(raw["at_min"], f"{where}.at_min", "min")
    k0 = _rows(at_min * 60.0, dt_s, f"{where}.at_min", allow_zero=True)
    if k0 >= steps:
        raise ConfigError(f"{where}.at_min: {raw['at_min']} min is not before the scenario end")
    if kind == "setpoint_step":
        _check_tag(raw["tag"], setpoint_tags, f"{where}.tag")
        value = config_number(raw["value"], f"{where}.value")
        if value < 0.0:  # flows, speeds, weights are >= 0 in their units
            raise ConfigError(f"{where}.value: a setpoint must be >= 0, got {raw['value']}")
        return Event(kind, (k0, steps), tag=str(raw["tag"]), value=value)
    if kind == "throughput_change":
        factor = config_number(raw["factor"], f"{where}.factor")
        if not factor > 0:
            raise ConfigError(f"{where}.factor: must be > 0, got {raw['factor']}")
        return Event(kind, (k0, steps), value=factor)
    _check_feeder_names({raw["feeder"]: 0}, line.feeders, f"{where}.feeder")
    if kind == "refill":
        to_kg = config_number(raw["to_kg"], f"{where}.to_kg", "kg")
        if not to_kg > 0:
            raise ConfigError(f"{where}.to_kg: must be > 0 kg, got {raw['to_kg']}")
        return Event(kind, (k0, k0 + 1), feeder=str(raw["feeder"]), value=to_kg)
    size = config_number(raw["size"], f"{where}.size", "relative change, e.g. -0.2")
    if not -1.0 < size <= 1.0:  # 20 for +20 % would be a 21-fold feed
        raise ConfigError(f"{where}.size: a relative change of the delivered flow in (-1, 1] "
                          f"(-0.2: 20 % less), got {raw['size']}")
    duration_min = config_number(raw["duration_min"], f"{where}.duration_min", "min")
    k1 = k0 + _rows(duration_min * 60.0, dt_s, f"{where}.duration_min")
    return Event(kind, (k0, min(k1, steps)), feeder=str(raw["feeder"]), value=size)


def _rows(seconds: float, dt_s: float, where: str, allow_zero: bool = False) -> int:
    rows = seconds / dt_s
    if abs(rows - round(rows)) > 1e-6 or rows < (0 if allow_zero else 1):
        raise ConfigError(f"{where}: {seconds / 60:g} min is not a whole number of "
                          f"{dt_s:g} s rows{'' if allow_zero else ' >= 1'}")  # fmt: skip
    return int(round(rows))


def _check_keys(raw: object, allowed: set[str], required: set[str], where: str) -> None:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(sorted(allowed))}"
        )
    missing = sorted(required - set(raw))
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required")


def _required(raw: Mapping, key: str, where: str) -> Mapping:
    if not isinstance(raw, Mapping) or not isinstance(raw.get(key), Mapping):
        raise ConfigError(f"{where}.{key}: required mapping")
    return raw[key]


def _check_tag(tag: str, valid: Sequence[str], where: str) -> None:
    if tag not in valid:
        raise ConfigError(
            f"{where}: {tag!r} is not a setpoint of this twin; valid: {', '.join(valid)}"
        )


def _check_feeder_names(names: Mapping, feeders: Mapping[str, Feeder], where: str) -> None:
    unknown = [n for n in names if n not in feeders]
    if unknown:
        raise ConfigError(f"{where}: unknown feeder {unknown[0]!r}; valid: {', '.join(feeders)}")
