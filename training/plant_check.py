"""The simulated plant at given operating settings, under the optimiser's disturbance profiles.

Place in the data flow: `twin optimise` (training/optimise.py) finds settings on the twin
(training/operating_point.py) and checks them here on data_pipelines.plant_sim, the "true
plant" that shares no code with the model: one run per disturbance profile at the settings,
started at its steady state, and the same objective on the plant's true (noise-free) tablet
API content, % of the recipe's label claim, at 1 s. Runs at different settings share their
process noise (screw pulsation, feed-factor drift, load-cell noise), because a run's noise is
keyed by its index and the seed alone (docs/plant_sim.md, Determinism).

The disturbance: the plant's `api_feeder_blockage` fault with a finite duration and a 1 s
ramp, a loss m of the true feed factor. Its gravimetric controller compensates up to
`feeder_control.correction_limit` (c) of the setpoint, so once it saturates the feeder
delivers (1 - m)(1 + c) of its setpoint; m = 1 - (1 + size) / (1 + c) makes that the twin's
(1 + size). Before the controller saturates (its Ti is 20 s) the plant delivers less: the
plant's dip is deeper for the first seconds than the twin's.
"""

from collections.abc import Mapping

import numpy as np

from data_pipelines.plant_sim import FaultSpec, RunSpec, SetpointStep, simulate_runs
from hybrid_twin import ConfigError
from training.operating_point import THROUGHPUT, OperatingProblem
from training.scenario_spec import LineSpec

PLANT_FEEDERS = ("api", "excipient", "lubricant")  # plant_sim's feeder order


def plant_runs(
    settings: Mapping[str, float],
    problem: OperatingProblem,
    line: LineSpec,
    sim: dict,
    speed_tag: str,
    weight_tag: str,
    seed: int,
) -> list[RunSpec]:
    """One plant run per disturbance profile at `settings` (decision variable -> value).

    Raises:
        ConfigError: a line whose feeders are not the plant's (api, excipient, lubricant), a
            disturbance on another feeder than the API's or an increase (a blockage only
            removes flow), a decision variable the plant cannot set.
    """
    if tuple(line.feeders) != PLANT_FEEDERS:
        raise ConfigError(
            f"line.feeders: the simulated plant has {', '.join(PLANT_FEEDERS)}, "
            f"got {', '.join(line.feeders)}"
        )
    if problem.feeder != "api":
        raise ConfigError("optimise.disturbances.feeder: the plant check disturbs the api feeder")
    known = {THROUGHPUT, speed_tag, weight_tag}
    for name in settings:
        if name not in known:
            raise ConfigError(
                f"optimise.settings.{name}: the plant check sets only {', '.join(sorted(known))}"
            )
    flows = {f.name: line.nominal_setpoints[f.setpoint] for f in line.feeders.values()}
    total = sum(flows.values())
    step = SetpointStep(
        0,
        float(settings.get(THROUGHPUT, total)),
        flows["api"] / total,
        float(settings.get(speed_tag, line.nominal_setpoints[speed_tag])),
    )
    weight = float(settings.get(weight_tag, line.nominal_setpoints[weight_tag]))
    limit = float(sim["feeder_control"]["correction_limit"])
    hoppers = tuple(float(line.hoppers_kg[name]) for name in PLANT_FEEDERS)
    duration_s = int(round(problem.steps * problem.dt_s))
    runs = []
    for i, profile in enumerate(problem.profiles):
        if profile.size >= 0:
            raise ConfigError(
                "optimise.disturbances.size: the plant's blockage only removes "
                f"flow; got {profile.size:+.3g}"
            )
        loss = 1.0 - (1.0 + profile.size) / (1.0 + limit)
        fault = FaultSpec("api_feeder_blockage", profile.onset_s, loss, 1.0, profile.duration_s)
        runs.append(
            RunSpec(
                f"profile_{i:02d}",
                i,
                "fault",
                "interpolation",
                0,
                duration_s,
                (step,),
                flows["lubricant"] / total,
                weight,
                hoppers,
                fault,
                seed,
            )
        )
    return runs


def plant_objective(
    settings_list: list[Mapping[str, float]],
    problem: OperatingProblem,
    line: LineSpec,
    sim: dict,
    speed_tag: str,
    weight_tag: str,
    seed: int,
) -> list[tuple[float, np.ndarray]]:
    """The objective on the plant for each settings, in one vectorised batch.

    Returns:
        Per settings: (mean squared deviation of the true tablet API, %LC, from
        problem.target over every profile from problem.from_row's time on, %LC^2;
        the true tablet API (n_profiles, n_s) at 1 s).
    """
    runs = [
        run
        for settings in settings_list
        for run in plant_runs(settings, problem, line, sim, speed_tag, weight_tag, seed)
    ]
    api = simulate_runs(runs, sim).tablet_api_lc()
    first_s = int(round(problem.from_row * problem.dt_s))
    n = len(problem.profiles)
    out = []
    for j in range(len(settings_list)):
        block = api[j * n : (j + 1) * n]
        out.append((float(((block[:, first_s:] - problem.target) ** 2).mean()), block))
    return out
