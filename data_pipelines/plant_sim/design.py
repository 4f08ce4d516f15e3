"""The campaign: which runs the plant makes, in what order, at which setpoints.

Between the config check and the simulation: `design_campaign` turns the validated `sim`
dict and a seed into RunSpecs. Runs inside the design space (normal interpolation runs and all
fault runs) start from a Latin hypercube over throughput, API fraction and blender speed;
extrapolation runs take one factor outside it (throughput or API fraction, in turn). Every run
steps its setpoints a few times, one factor per step. Runs are shuffled in time and follow one
another with an idle gap.

Seeds: the design draws from SeedSequence(seed, spawn_key=(0,)); run i draws its process
noise from spawn_key (1, i, 0) and its sensor noise from (1, i, 1), so one run's noise does
not depend on how many other runs there are or what they draw.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from data_pipelines.plant_sim.config import FACTORS, FEEDERS
from data_pipelines.plant_sim.faults import FAULT_KINDS, FaultSpec, draw_fault

PROCESS, SENSORS = 0, 1


@dataclass(frozen=True)
class SetpointStep:
    """Setpoints from `time_s` (s after the run start) until the next step."""

    time_s: int
    throughput_kg_h: float
    api_fraction: float
    blender_speed_rpm: float


@dataclass(frozen=True)
class RunSpec:
    """Everything that makes one run what it is.

    Attributes:
        run_id: `run_001`, ... in time order.
        index: position in the campaign; keys the run's random streams.
        kind: "normal" or "fault".
        regime: "interpolation" (inside the design space) or "extrapolation".
        start_ms: run start, ms since the Unix epoch, UTC.
        duration_s: run length in whole seconds.
        steps: setpoint schedule, the first step at time 0.
        lubricant_fraction: lubricant mass fraction of the recipe.
        tablet_weight_mg: target tablet weight.
        hopper0_kg: initial hopper mass of the API, excipient and lubricant feeders.
        fault: the injected fault, None for a normal run.
        seed: the campaign seed.
    """

    run_id: str
    index: int
    kind: str
    regime: str
    start_ms: int
    duration_s: int
    steps: tuple[SetpointStep, ...]
    lubricant_fraction: float
    tablet_weight_mg: float
    hopper0_kg: tuple[float, float, float]
    fault: FaultSpec | None
    seed: int

    def rng(self, stream: int) -> np.random.Generator:
        """The run's own generator for `stream` (PROCESS or SENSORS)."""
        return np.random.default_rng(
            np.random.SeedSequence(self.seed, spawn_key=(1, self.index, stream))
        )


def design_campaign(sim: dict, seed: int) -> list[RunSpec]:
    """Lay out the campaign: normal, extrapolation and fault runs, shuffled in time.

    Args:
        sim: the validated sim config (config.validate_sim_config).
        seed: campaign seed; the same seed gives the same campaign.

    Returns:
        The runs in time order.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    n_extra = sim["n_extrapolation_runs"]
    slots = [("normal", "interpolation", None)] * (sim["n_normal_runs"] - n_extra)
    slots += [("normal", "extrapolation", None)] * n_extra
    slots += [
        ("fault", "interpolation", k)
        for k in FAULT_KINDS
        for _ in range(sim["n_fault_runs_per_kind"])
    ]
    boxes = _boxes(slots, sim)
    first = _first_points(slots, boxes, sim["design"], rng)
    order = rng.permutation(len(slots))
    run_s = int(round(sim["run_hours"] * 3600.0))
    period_ms = 1000 * (run_s + int(round(sim["gap_minutes"] * 60.0)))
    start_ms = int(pd.Timestamp(sim["start_utc"]).value // 1_000_000)
    runs = []
    for position, slot_index in enumerate(order):
        kind, regime, fault_kind = slots[slot_index]
        steps = _steps(first[slot_index], boxes[slot_index], sim, run_s, rng)
        fault = None if fault_kind is None else draw_fault(fault_kind, sim["faults"], run_s, rng)
        runs.append(
            RunSpec(
                run_id=f"run_{position + 1:03d}",
                index=position,
                kind=kind,
                regime=regime,
                start_ms=start_ms + position * period_ms,
                duration_s=run_s,
                steps=steps,
                lubricant_fraction=sim["design"]["lubricant_fraction"],
                tablet_weight_mg=sim["design"]["tablet_weight_mg"],
                hopper0_kg=_initial_hoppers(steps[0], fault, sim, rng),
                fault=fault,
                seed=seed,
            )
        )
    return runs


def _boxes(slots: list, sim: dict) -> list[dict]:
    """Per slot the interval of each factor; extrapolation slots take turns over the factors."""
    design, extrapolation = sim["design"], sim["extrapolation"]
    outside = [f for f in FACTORS if f in extrapolation]
    boxes, n_extra = [], 0
    for _, regime, _ in slots:
        box = {f: design[f] for f in FACTORS}
        if regime == "extrapolation":
            factor = outside[n_extra % len(outside)]
            box[factor] = extrapolation[factor]
            n_extra += 1
        boxes.append(box)
    return boxes


def _first_points(slots: list, boxes: list, design: dict, rng: np.random.Generator) -> list:
    """First setpoints: a Latin hypercube over the runs inside the design space, uniform else."""
    inside = [i for i, slot in enumerate(slots) if slot[1] == "interpolation"]
    n = len(inside)
    # one stratum per run in every factor, strata paired at random (McKay et al., 1979)
    unit = np.argsort(rng.random((len(FACTORS), n)), axis=1).T + rng.random((n, len(FACTORS)))
    points: list = [None] * len(slots)
    for row, i in enumerate(inside):
        points[i] = {f: _scale(unit[row, j] / n, design[f]) for j, f in enumerate(FACTORS)}
    for i, box in enumerate(boxes):
        if points[i] is None:
            points[i] = {f: _scale(rng.random(), box[f]) for f in FACTORS}
    return points


def _scale(u: float, interval: tuple[float, float]) -> float:
    return float(interval[0] + u * (interval[1] - interval[0]))


def _steps(
    point: dict, box: dict, sim: dict, run_s: int, rng: np.random.Generator
) -> tuple[SetpointStep, ...]:
    """Setpoint schedule: one step per equal slice of the middle 80 % of the run."""
    n = sim["n_setpoint_changes"]
    edges = np.linspace(0.1 * run_s, 0.9 * run_s, n + 1)
    times = np.floor(edges[:-1] + rng.random(n) * np.diff(edges)).astype(int)
    current = dict(point)
    steps = [SetpointStep(0, *(current[f] for f in FACTORS))]
    for time_s in times:
        factor = FACTORS[int(rng.integers(len(FACTORS)))]
        current[factor] = _new_level(
            current[factor], box[factor], sim["design"]["min_step_fraction"], rng
        )
        steps.append(SetpointStep(int(time_s), *(current[f] for f in FACTORS)))
    return tuple(steps)


def _new_level(
    old: float, interval: tuple[float, float], min_step: float, rng: np.random.Generator
) -> float:
    """Uniform over the interval minus (old - d, old + d), d = min_step * interval width."""
    low, high = interval
    d = min_step * (high - low)
    below, above = max(0.0, old - d - low), max(0.0, high - old - d)
    if below + above <= 0.0:
        return old
    u = rng.random() * (below + above)
    return float(low + u if u < below else old + d + (u - below))


def _initial_hoppers(
    step: SetpointStep, fault: FaultSpec | None, sim: dict, rng: np.random.Generator
) -> tuple[float, float, float]:
    """Random fill between just above the refill level and full.

    In an excipient refill failure run the excipient hopper starts where it reaches its refill
    level at the planned onset, so the failing refill request falls inside the run.
    """
    masses = []
    for name in FEEDERS:
        feeder = sim["feeders"][name]
        low, high = feeder["hopper_low_kg"], feeder["hopper_high_kg"]
        masses.append(float(rng.uniform(low + 0.1 * (high - low), high)))
    if fault is not None and fault.kind == "excipient_refill_failure":
        feeder = sim["feeders"]["excipient"]
        flow_kg_h = step.throughput_kg_h * (
            1 - step.api_fraction - sim["design"]["lubricant_fraction"]
        )
        planned = feeder["hopper_low_kg"] + flow_kg_h * fault.onset_s / 3600.0
        masses[1] = float(min(planned, feeder["hopper_high_kg"]))
    return masses[0], masses[1], masses[2]
