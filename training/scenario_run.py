"""One scenario through a ScenarioTwin: start state, inputs, prediction, diversion windows.

Place in the data flow: training/scenario.py (the `twin scenario` stage) parses the files
(training/scenario_spec.py), loads the twin (training/scenario_twin.py) and calls
`run_scenario_once` per scenario; the result holds the trajectory table written to CSV and
plotted, and the out-of-spec windows of the diversion attribute with the rule's check
(training/diversion.py).
"""

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from hybrid_twin import ConfigError
from training.dataset import PreparedDataset
from training.diversion import (
    DiversionRule,
    OutOfSpecWindow,
    RuleCheck,
    check_rule,
    out_of_spec_windows,
)
from training.scenario_spec import LineSpec, Scenario, ScenarioInputs, scenario_inputs
from training.scenario_twin import ScenarioTwin, input_factor


@dataclass(frozen=True)
class ScenarioResult:
    """A scenario's outcome.

    Attributes:
        scenario: what was run; inputs: the u rows and flow factors it ran on.
        table: one row per grid row: time_min, every u tag, every predicted y tag (tag units),
            `<feeder>.flow_factor`, `throughput_kg_h`.
        windows: tag -> out-of-spec windows, for every tag with spec limits.
        disturbance_s: (start, end) envelope of the feeder disturbances, or None.
        rule: the diversion rule's check on the diversion tag's windows, or None without a
            disturbance.
    """

    scenario: Scenario
    inputs: ScenarioInputs
    table: pd.DataFrame
    windows: dict[str, list[OutOfSpecWindow]]
    disturbance_s: tuple[float, float] | None
    rule: RuleCheck | None


def start_rows(
    twin: ScenarioTwin, scenario: Scenario, line: LineSpec, dataset: PreparedDataset | None
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(past_u (1, P, n_u), past_y (1, P, n_y), first u row (n_u,)), tag units.

    steady_state: the first row from the setpoints and hopper masses (tags the twin reads
    nowhere take its u mean), held over the past window, no measurements. recorded: the P
    rows of the run before `time_min` and the row at it.

    Raises:
        ConfigError: a recorded start without a dataset, an unknown run, a time off the run's
            grid or with fewer than past_steps rows before it.
    """
    start = scenario.start
    if start.kind == "steady_state":
        row = twin.model.u_mean.detach().to(torch.float64).numpy().copy()
        for tag, value in start.setpoints.items():
            row[twin.input_tags.index(tag)] = value
        for name, mass in start.hoppers_kg.items():
            row[twin.input_tags.index(line.feeders[name].hopper)] = mass
        past_u, past_y = twin.steady_past(torch.as_tensor(row))
        return past_u, past_y, row
    where = f"{scenario.source}: start"
    if dataset is None:
        raise ConfigError(f"{where}: a recorded start needs data_path (a prepared dataset)")
    if not math.isclose(dataset.dt_s, twin.dt_s):  # its rows would run as the twin's steps
        raise ConfigError(
            f"{where}: data_path {dataset.root} is on a {dataset.dt_s:g} s grid, the twin on "
            f"{twin.dt_s:g} s: prepare the data with data.dt_s={twin.dt_s:g}"
        )
    runs = dataset.manifest["runs"]
    if start.run not in runs:
        raise ConfigError(
            f"{where}.run: {start.run!r} not in {dataset.root}; runs: {', '.join(runs)}"
        )
    run = dataset.load_run(start.run, torch.float64)
    u_mean, u_std, y_mean, y_std = dataset.normalisation(torch.float64)
    u = run.u * u_std + u_mean
    y = torch.where(run.mask, run.y * y_std + y_mean, float("nan"))
    rows = np.flatnonzero(np.isclose(run.time_s.numpy(), start.time_s, atol=1e-6))
    if rows.size == 0 or rows[0] < twin.past_steps:
        raise ConfigError(
            f"{where}.time_min: {start.time_s / 60:g} min is not a row of run {start.run} with "
            f">= {twin.past_steps} rows before it (rows at {float(run.time_s[0]) / 60:g}-"
            f"{float(run.time_s[-1]) / 60:g} min, every {dataset.dt_s:g} s)"
        )
    k = int(rows[0])
    columns = [dataset.input_tags.index(t) for t in twin.input_tags]
    y_columns = [dataset.measurement_tags.index(t) for t in twin.measurement_tags]
    past_u = u[k - twin.past_steps : k, columns].unsqueeze(0).to(twin.dtype)
    past_y = y[k - twin.past_steps : k, y_columns].unsqueeze(0).to(twin.dtype)
    return past_u, past_y, u[k, columns].numpy()


def run_scenario_once(
    twin: ScenarioTwin, scenario: Scenario, line: LineSpec, rule: DiversionRule,
    diversion_tag: str, weight_tag: str, dataset: PreparedDataset | None = None,
) -> ScenarioResult:  # fmt: skip
    """Start state, events, open-loop prediction, out-of-spec windows and the rule's check.

    Raises:
        ConfigError: see start_rows and scenario_inputs; a spec-limit or diversion tag the
            twin does not predict, a diversion tag without spec limits (the rule checks its
            windows), a weight tag that is no input of the twin.
    """
    for tag in [*scenario.spec_limits, diversion_tag]:
        if tag not in twin.measurement_tags:
            raise ConfigError(f"{scenario.source}: spec_limits/diversion tag {tag!r} is not "
                              f"predicted; tags: {', '.join(twin.measurement_tags)}")  # fmt: skip
    if diversion_tag not in scenario.spec_limits:
        raise ConfigError(f"diversion.tag: {diversion_tag!r} has no spec limits in "
                          f"{scenario.source} (spec_limits: {', '.join(scenario.spec_limits)}): "
                          "the diversion rule is checked on its out-of-spec windows")  # fmt: skip
    if weight_tag not in twin.input_tags:
        raise ConfigError(f"diversion.weight_tag: {weight_tag!r} is no input of the twin; "
                          f"inputs: {', '.join(twin.input_tags)}")  # fmt: skip
    past_u, past_y, first = start_rows(twin, scenario, line, dataset)
    inputs = scenario_inputs(scenario, line, twin.input_tags, first, twin.dt_s)
    u = torch.as_tensor(inputs.u, dtype=twin.dtype).unsqueeze(0)
    factor = input_factor(twin, line, torch.as_tensor(inputs.flow_factor, dtype=twin.dtype)[None])
    with torch.no_grad():
        x0 = twin.initial_state(past_u, past_y)
        y, _ = twin.simulate(x0, u, factor)
    y = y[0].to(torch.float64).numpy()
    time_s = np.arange(scenario.steps) * twin.dt_s
    table = pd.DataFrame({"time_min": time_s / 60.0})
    for j, tag in enumerate(twin.input_tags):
        table[tag] = inputs.u[:, j]
    for j, name in enumerate(line.feeders):
        table[f"{name}.flow_factor"] = inputs.flow_factor[:, j]
    table["throughput_kg_h"] = inputs.throughput_kg_h
    for j, tag in enumerate(twin.measurement_tags):
        table[f"predicted.{tag}"] = y[:, j]
    weight = inputs.u[:, twin.input_tags.index(weight_tag)]
    if not (weight > 0.0).all():  # tablets = mass / weight
        k = int(np.argmax(~(weight > 0.0)))
        raise ConfigError(f"{scenario.source}: {weight_tag} (diversion.weight_tag) is "
                          f"{weight[k]:g} at {k * twin.dt_s / 60:g} min; a tablet weight is > 0")
    windows = {
        tag: out_of_spec_windows(
            time_s, table[f"predicted.{tag}"].to_numpy(), limits, inputs.throughput_kg_h, weight
        )  # fmt: skip
        for tag, limits in scenario.spec_limits.items()
    }
    disturbances = [e for e in scenario.events if e.kind == "feeder_disturbance"]
    envelope, check = None, None
    if disturbances:
        envelope = (min(e.rows[0] for e in disturbances) * twin.dt_s,
                    max(e.rows[1] for e in disturbances) * twin.dt_s)  # fmt: skip
        horizon_s = scenario.steps * twin.dt_s
        check = check_rule(windows[diversion_tag], rule.window(*envelope), horizon_s)
    return ScenarioResult(scenario, inputs, table, windows, envelope, check)


def summary_rows(result: ScenarioResult, units: dict[str, str]) -> list[dict]:
    """One row per spec-limited tag: limits, start/min/max/end, out-of-spec time, windows.

    A tag still out of spec at the horizon has `open_at_end` True and no `last_back_min`;
    its out-of-spec time, kg and tablets then count only up to the horizon (lower bounds).
    """
    rows = []
    for tag, (low, high) in result.scenario.spec_limits.items():
        values = result.table[f"predicted.{tag}"]
        windows = result.windows[tag]
        open_at_end = bool(windows) and windows[-1].open_end
        rows.append({
            "scenario": result.scenario.name, "tag": tag, "unit": units.get(tag, ""),
            "low": low, "high": high, "start": values.iloc[0], "min": values.min(),
            "max": values.max(), "end": values.iloc[-1],
            "out_of_spec_s": sum(w.duration_s for w in windows),
            "first_out_min": windows[0].start_s / 60.0 if windows else float("nan"),
            "last_back_min": float("nan") if open_at_end or not windows
            else windows[-1].end_s / 60.0,
            "open_at_end": open_at_end,
            "out_of_spec_kg": sum(w.mass_kg for w in windows),
            "out_of_spec_tablets": sum(w.tablets for w in windows),
        })  # fmt: skip
    return rows
