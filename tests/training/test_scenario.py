"""`twin scenario` and residence-time diversion on an untrained mechanistic twin (float64).

The twin is built from the shipped configs (flowsheet cdc_line, model mechanistic, solver
rk4) with the tiny dataset's tag order and statistics, so its parameters are the documented
defaults and its blender is the tanks-in-series law of docs/model.md: the analytic
residence-time result applies to it exactly, up to the solver and the small change of the
tank rate with the throughput during a feed step.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from hybrid_twin import ConfigError
from training.config_dir import SHIPPED_CONFIG_DIR
from training.dataset import PreparedDataset
from training.diversion import (
    DiversionRule,
    check_rule,
    out_of_spec_windows,
    step_window_tanks_in_series,
)
from training.scenario import check_unique_names, starts_from_recording
from training.scenario_run import run_scenario_once, start_rows, summary_rows
from training.scenario_spec import parse_line, parse_scenario, scenario_inputs
from training.scenario_twin import ScenarioTwin, input_factor, twin_from_model
from training.twin_model import build_twin_model

PAST_STEPS = 6
STEADY = 1e-9  # float64 relative drift over 30 min of a held steady state: rounding only


def _load(relative: str) -> dict:
    return yaml.safe_load((SHIPPED_CONFIG_DIR / relative).read_text())


@pytest.fixture(scope="module")
def root() -> dict:
    return _load("scenario.yaml")


@pytest.fixture(scope="module")
def line(root):
    return parse_line(root["line"])


@pytest.fixture(scope="module")
def dataset(tiny_cdc_dataset) -> PreparedDataset:
    return PreparedDataset.open(tiny_cdc_dataset)


@pytest.fixture(scope="module")
def twin(dataset) -> ScenarioTwin:
    torch.set_num_threads(1)
    model = build_twin_model(
        _load("flowsheet/cdc_line.yaml"), _load("model/mechanistic.yaml"),
        _load("solver/rk4.yaml"), dataset.input_tags, dataset.measurement_tags,
        dataset.normalisation(torch.float64), dataset.dt_s,
    ).to(torch.float64).eval()  # fmt: skip
    units = {tag: spec["unit"] for tag, spec in dataset.manifest["tags"].items()}
    return twin_from_model(model, dataset.input_tags, dataset.measurement_tags, units,
                           PAST_STEPS, "eager mechanistic defaults")  # fmt: skip


def _scenario(root, line, twin, raw: dict, source: str = "test.yaml"):
    return parse_scenario(raw, source, line, twin.setpoint_tags, twin.dt_s, root["spec_limits"])


def _run(root, line, twin, scenario, dataset=None, rule=None):
    rule = rule or DiversionRule.from_config(root["diversion"]["rule"])
    return run_scenario_once(twin, scenario, line, rule, "PRESS.TABLET_API", "PRESS.WEIGHT_SP",
                             dataset)  # fmt: skip


def test_scenario_without_disturbance_stays_at_steady_state(root, line, twin):
    scenario = _scenario(root, line, twin, _load("scenarios/no_disturbance.yaml"))
    result = _run(root, line, twin, scenario)
    # The nominal point: 3 of 30 kg/h API -> 10 %w/w, the recipe's dose -> 100 %LC, 400 mg.
    expected = {"NIR.API_CONC": 10.0, "PRESS.TABLET_API": 100.0, "PRESS.TABLET_WEIGHT": 400.0,
                "PRESS.COMP_FORCE": 15.0, "BLEND.SPEED": 400.0}  # fmt: skip
    for tag, value in expected.items():
        trajectory = result.table[f"predicted.{tag}"].to_numpy()
        np.testing.assert_allclose(trajectory, trajectory[0], rtol=STEADY, err_msg=tag)
        # Learnable parameters are stored through a sigmoid / softplus transform, so a default
        # such as force_ref_kN = 15 comes back as 14.9999996: 1e-7 relative, not 1e-9.
        assert trajectory[0] == pytest.approx(value, rel=1e-7), tag
    assert all(not windows for windows in result.windows.values())
    assert result.rule is None  # no disturbance, nothing to divert
    # The hoppers drain at the setpoint flow: 30 min of 3 kg/h from 6 kg leaves 4.5 kg.
    api_hopper = result.table["FEED_API.HOPPER_MASS"].to_numpy()
    assert api_hopper[-1] == pytest.approx(6.0 - 3.0 * (len(api_hopper) - 1) * 5.0 / 3600.0)


def test_scenario_without_feeder_disturbance_equals_the_twins_forecast(root, line, twin):
    scenario = _scenario(root, line, twin, _load("scenarios/throughput_step.yaml"))
    past_u, past_y, first = start_rows(twin, scenario, line, None)
    inputs = scenario_inputs(scenario, line, twin.input_tags, first, twin.dt_s)
    u = torch.as_tensor(inputs.u)[None]
    with torch.no_grad():
        forecast = twin.model.forecast(past_u, past_y, u)
        factor = input_factor(twin, line, torch.as_tensor(inputs.flow_factor)[None])
        predicted, _ = twin.simulate(twin.initial_state(past_u, past_y), u, factor)
    torch.testing.assert_close(predicted, forecast, rtol=0, atol=0)
    # ... and the step did something: 40 kg/h at 600 rpm is another operating point.
    assert result_changed(inputs.throughput_kg_h, before=29.9, after=39.9)


def test_an_empty_hopper_drains_no_more_and_its_feeder_delivers_nothing(root, line, twin):
    raw = {"name": "api_runs_dry", "duration_min": 12,
           "start": {"from": "steady_state", "hoppers_kg": {"api": 0.2}},
           "events": [{"type": "refill", "feeder": "api", "at_min": 10, "to_kg": 5.0}]}
    scenario = _scenario(root, line, twin, raw)
    _, _, first = start_rows(twin, scenario, line, None)
    inputs = scenario_inputs(scenario, line, twin.input_tags, first, twin.dt_s)
    api = line.nominal_setpoints["FEED_API.MASSFLOW_SP"]
    total = sum(line.nominal_setpoints[f.setpoint] for f in line.feeders.values())
    # 0.2 kg at 3 kg/h: empty after 240 s, i.e. from row 48 (5 s rows)
    assert inputs.hopper_empty_s == {"api": 240.0}
    hopper = inputs.u[:, twin.input_tags.index("FEED_API.HOPPER_MASS")]
    assert hopper[47] > 0.0 and (hopper[48:120] == 0.0).all() and hopper[120] == 5.0
    np.testing.assert_allclose(inputs.throughput_kg_h[:48], total)
    np.testing.assert_allclose(inputs.throughput_kg_h[48:120], total - api)  # was still total
    np.testing.assert_allclose(inputs.throughput_kg_h[120:], total)  # refilled at 10 min


def result_changed(throughput: np.ndarray, before: float, after: float) -> bool:
    return throughput[0] > before and throughput[-1] > after


def test_diversion_window_of_an_api_feed_step_matches_tanks_in_series_within_one_sample(
    root, line, twin
):
    raw = _load("scenarios/api_feeder_dip.yaml")
    result = _run(root, line, twin, _scenario(root, line, twin, raw))
    [window] = result.windows["NIR.API_CONC"]
    # The analytic reference from the twin's own parameters at the start (default values):
    field = twin.model.field
    with torch.no_grad():
        theta = dict(zip(field.flowsheet.param_names, field.theta()[0].tolist(), strict=True))
        x0 = twin.initial_state(*start_rows(twin, result.scenario, line, None)[:2])
    blender = [i for i, n in enumerate(field.flowsheet.state_names)
               if n.startswith("blender.tank")]  # fmt: skip
    holdup_kg = float(x0[0, blender].sum())
    throughput = 30.0
    n_tanks = int(_load("flowsheet/cdc_line.yaml")["units"]["blender"]["n_tanks"])
    k = n_tanks * throughput / (3600.0 * holdup_kg)  # mean residence time = hold-up / throughput
    event = raw["events"][0]
    start_s = event["at_min"] * 60.0
    analytic = step_window_tanks_in_series(
        api_kg_h=3.0, total_kg_h=throughput, drop_kg_h=-3.0 * event["size"], start_s=start_s,
        end_s=start_s + event["duration_min"] * 60.0,
        low_pct=root["spec_limits"]["NIR.API_CONC"][0],
        n_tanks=n_tanks, k_per_s=k, lag_s=theta["feeder_api.response_tau_s"],
        horizon_s=raw["duration_min"] * 60.0,
    )  # fmt: skip
    assert analytic is not None
    print(
        f"twin window {window.start_s:g}-{window.end_s:g} s, analytic {analytic}, "
        f"hold-up {holdup_kg:.4f} kg, mean residence time {holdup_kg / throughput * 3600:.1f} s"
    )
    # The grid's first out-of-spec row is the first sample after the crossing: within one dt.
    assert 0.0 <= window.start_s - analytic[0] <= twin.dt_s
    assert 0.0 <= window.end_s - analytic[1] <= twin.dt_s
    # The default rule (margin 300 s after the disturbance ends) covers the tablets' window;
    # with no margin it misses the tail that is still in the blender when the feeder recovers.
    assert result.rule.covered and result.rule.missed_after_s == 0
    tablets = result.windows["PRESS.TABLET_API"]
    tight = check_rule(tablets, DiversionRule(0.0, 0.0).window(*result.disturbance_s))
    assert not tight.covered and tight.missed_after_s > 60.0


def test_out_of_spec_windows_give_edges_mass_and_tablets():
    t = np.arange(10) * 5.0
    values = np.array([100, 100, 94, 90, 96, 100, 106, 100, 100, 94.0])
    flow, weight = np.full(10, 36.0), np.full(10, 400.0)
    windows = out_of_spec_windows(t, values, (95.0, 105.0), flow, weight)
    assert [(w.start_s, w.end_s, w.worst, w.open_end) for w in windows] == [
        (10.0, 20.0, 90.0, False),
        (30.0, 35.0, 106.0, False),
        (45.0, 50.0, 94.0, True),
    ]
    # 36 kg/h for 10 s = 0.1 kg = 250 tablets of 400 mg.
    assert windows[0].mass_kg == pytest.approx(0.1) and windows[0].tablets == pytest.approx(250)
    check = check_rule(windows, (12.0, 40.0))
    assert (check.covered, check.missed_before_s, check.missed_after_s) == (False, 2.0, 5.0)


def test_a_window_open_at_the_horizon_is_judged_only_up_to_it():
    t = np.arange(10) * 5.0
    values = np.array([100, 100, 94, 90, 96, 100, 106, 100, 100, 94.0])
    windows = out_of_spec_windows(t, values, (95.0, 105.0), np.full(10, 36.0), np.full(10, 400.0))
    # The diversion runs past the horizon (50 s): nothing missed, the last window still open.
    check = check_rule(windows, (0.0, 60.0), horizon_s=50.0)
    assert (check.covered, check.undetermined) == (False, True)
    assert check.verdict == "cannot tell whether it covers"
    assert check.extra_s == pytest.approx(50.0 - 20.0)  # in-spec diverted time up to 50 s only
    # Ending before the horizon, it misses the open window's predicted part: that is known.
    check = check_rule(windows, (0.0, 48.0), horizon_s=50.0)
    assert (check.covered, check.undetermined, check.missed_after_s) == (False, False, 2.0)
    assert check.verdict == "does NOT cover"


def test_a_delay_that_starts_the_diversion_after_its_end_is_refused():
    with pytest.raises(ConfigError, match=r"diversion.rule.delay_s: 720 s starts the diversion "
                                          r"at 17 min, after its end at 12 min"):  # fmt: skip
        DiversionRule(720.0, 300.0).window(300.0, 420.0)


def test_a_scenario_that_ends_out_of_spec_reports_no_return_and_no_verdict(root, line, twin):
    raw = {**_load("scenarios/api_feeder_dip.yaml"), "duration_min": 8}  # window 6.25-9 min
    result = _run(root, line, twin, _scenario(root, line, twin, raw))
    [window] = result.windows["PRESS.TABLET_API"]
    assert window.open_end and window.end_s == 8 * 60.0
    assert result.rule.undetermined and not result.rule.covered
    [row] = [r for r in summary_rows(result, twin.units) if r["tag"] == "PRESS.TABLET_API"]
    assert row["open_at_end"] and np.isnan(row["last_back_min"])
    assert row["out_of_spec_s"] == pytest.approx(8 * 60.0 - 6.25 * 60.0)


def test_a_recorded_start_continues_from_the_runs_state(root, line, twin, dataset):
    run_id = dataset.run_ids("test")[0]
    raw = {"name": "recorded", "duration_min": 5,
           "start": {"from": "recorded", "run": run_id, "time_min": 5}}  # fmt: skip
    scenario = _scenario(root, line, twin, raw)
    result = _run(root, line, twin, scenario, dataset)
    # Held recorded setpoints from row 60 (5 min): the prediction is the twin's forecast from
    # the 6 rows before it, over those held inputs.
    past_u, past_y, first = start_rows(twin, scenario, line, dataset)
    u = torch.as_tensor(result.table[twin.input_tags].to_numpy())[None]
    with torch.no_grad():
        forecast = twin.model.forecast(past_u, past_y, u)[0].numpy()
    predicted = result.table[[f"predicted.{t}" for t in twin.measurement_tags]].to_numpy()
    np.testing.assert_array_equal(predicted, forecast)
    run = dataset.load_run(run_id, torch.float64)
    u_mean, u_std = dataset.normalisation(torch.float64)[:2]
    np.testing.assert_allclose(first, (run.u[60] * u_std + u_mean).numpy())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {
                "events": [
                    {
                        "type": "feeder_disturbance",
                        "feeder": "apii",
                        "at_min": 1,
                        "duration_min": 1,
                        "size": -0.1,
                    }
                ]
            },
            r"events\[0\]\.feeder: unknown feeder 'apii'",
        ),
        ({"events": [{"type": "blip", "at_min": 1}]}, r"events\[0\]\.type: unknown event 'blip'"),
        (
            {"events": [{"type": "refill", "feeder": "api", "at_min": 0.01, "to_kg": 5}]},
            r"events\[0\]\.at_min: 0\.01 min is not a whole number",
        ),
        (
            {"start": {"from": "steady_state", "setpoints": {"NIR.API_CONC": 3}}},
            r"start\.setpoints: 'NIR\.API_CONC' is not a setpoint",
        ),
        ({"duraton_min": 3}, r"unknown key 'duraton_min'"),
        ({"duration_min": "20 min"}, r"duration_min: expected a number \(min\), got '20 min'"),
        (
            {"events": [{"type": "feeder_disturbance", "feeder": "api", "at_min": 1,
                         "duration_min": 1, "size": "20%"}]},
            r"events\[0\]\.size: expected a number \(relative change, e\.g\. -0\.2\), got '20%'",
        ),  # fmt: skip
        (
            {"spec_limits": {"PRESS.TABLET_API": 95}},
            r"spec_limits\.PRESS\.TABLET_API: expected \[low, high\], got 95",
        ),
        (
            {"start": {"from": "steady_state", "hoppers_kg": {"api": "full"}}},
            r"start\.hoppers_kg\.api: expected a number \(kg\), got 'full'",
        ),
        (  # percent for a fraction: 20 would be a 21-fold feed
            {"events": [{"type": "feeder_disturbance", "feeder": "api", "at_min": 1,
                         "duration_min": 1, "size": 20}]},
            r"events\[0\]\.size: a relative change of the delivered flow in \(-1, 1\].*got 20",
        ),  # fmt: skip
        (
            {"start": {"from": "steady_state", "setpoints": {"BLEND.SPEED_SP": -400}}},
            r"start\.setpoints\.BLEND\.SPEED_SP: must be >= 0, got -400",
        ),
        (
            {"start": {"from": "steady_state", "hoppers_kg": {"api": -1}}},
            r"start\.hoppers_kg\.api: must be >= 0, got -1",
        ),
        (
            {"events": [{"type": "setpoint_step", "tag": "BLEND.SPEED_SP", "at_min": 1,
                         "value": -5}]},
            r"events\[0\]\.value: a setpoint must be >= 0, got -5",
        ),  # fmt: skip
        ({"start": "steady_state"}, r"start\.from: expected one of .*got None"),
    ],
)
def test_bad_scenario_errors_name_the_file_and_key(root, line, twin, change, match):
    raw = {**_load("scenarios/api_feeder_dip.yaml"), **change}
    with pytest.raises(ConfigError, match=match) as error:
        _scenario(root, line, twin, raw, source="configs/scenarios/mine.yaml")
    assert "configs/scenarios/mine.yaml" in str(error.value)


def test_run_settings_the_scenario_cannot_honour_are_refused_naming_the_key(root, line, twin):
    scenario = _scenario(root, line, twin, _load("scenarios/api_feeder_dip.yaml"))
    rule = DiversionRule.from_config(root["diversion"]["rule"])
    # a diversion tag without limits used to skip the rule's check, silently
    with pytest.raises(ConfigError, match=r"diversion\.tag: 'PRESS\.COMP_FORCE' has no spec lim"):
        run_scenario_once(twin, scenario, line, rule, "PRESS.COMP_FORCE", "PRESS.WEIGHT_SP")
    with pytest.raises(ConfigError, match=r"diversion\.weight_tag: 'PRESS\.TABLET_WEIGHT' is no "):
        run_scenario_once(twin, scenario, line, rule, "PRESS.TABLET_API", "PRESS.TABLET_WEIGHT")
    zero_weight = {**_load("scenarios/api_feeder_dip.yaml"), "events": [
        {"type": "setpoint_step", "tag": "PRESS.WEIGHT_SP", "at_min": 1, "value": 0}]}
    with pytest.raises(ConfigError, match=r"PRESS\.WEIGHT_SP \(diversion\.weight_tag\) is 0 "
                                          r"at 1 min; a tablet weight is > 0"):
        _run(root, line, twin, _scenario(root, line, twin, zero_weight))


def test_a_start_written_as_a_word_reaches_the_parser_that_names_it():
    # `start: steady_state` crashed run_scenario with AttributeError ('str' has no 'get')
    assert not starts_from_recording({"start": "steady_state"})
    assert not starts_from_recording("not a mapping")
    assert starts_from_recording({"start": {"from": "recorded", "run": "run_001"}})


def test_two_scenarios_of_one_name_are_refused_naming_both_files(root, line, twin):
    raw = _load("scenarios/api_feeder_dip.yaml")
    scenarios = [_scenario(root, line, twin, raw, source) for source in ("a.yaml", "b.yaml")]
    with pytest.raises(ConfigError, match=r"run: scenarios a\.yaml, b\.yaml all have name "
                                          r"'api_feeder_dip'"):  # fmt: skip
        check_unique_names(scenarios)


def test_every_shipped_scenario_parses(root, line, twin):
    for path in sorted((SHIPPED_CONFIG_DIR / "scenarios").glob("*.yaml")):
        scenario = _scenario(root, line, twin, yaml.safe_load(path.read_text()), str(path))
        assert scenario.name == Path(path).stem


@pytest.fixture(scope="module")
def twin_file(twin, tmp_path_factory) -> Path:
    """The eager twin as a twin file: scripted OnlineTwin + metadata (its filter and detector
    are unfitted placeholders; a scenario uses only the twin inside)."""
    from training.export import FORMAT_VERSION, script_and_reload, write_twin_file
    from training.online_twin import OnlineTwin, placeholder_monitor

    n_x, n_y = twin.model.state_floor.shape[0], len(twin.measurement_tags)
    online = OnlineTwin(twin.model, torch.ones(n_x), torch.ones(n_y), torch.ones(n_x),
                        placeholder_monitor(n_y)).to(torch.float64).eval()  # fmt: skip
    path = tmp_path_factory.mktemp("scenario_twin") / "twin.pt"
    metadata = {"format_version": FORMAT_VERSION, "model_kind": "mechanistic",
                "training_run_id": "untrained", "dt_s": twin.dt_s, "past_steps": PAST_STEPS,
                "dtype": "float64", "input_tags": twin.input_tags,
                "measurement_tags": twin.measurement_tags, "units": twin.units}  # fmt: skip
    write_twin_file(script_and_reload(online), metadata, path)
    return path


def test_twin_scenario_cli_writes_tables_plots_and_an_mlflow_run(twin_file, tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.training.twin_cli import run_twin

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    result = run_twin(tmp_path, uri, "scenario", f"twin.file={twin_file}",
                      "run=[no_disturbance,api_feeder_dip]", "hydra.run.dir=out")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    summary = pd.read_csv(out / "scenarios.csv")
    dip = summary[
        (summary["scenario"] == "api_feeder_dip") & (summary["tag"] == "PRESS.TABLET_API")
    ]
    # The scripted twin from the file gives the eager twin's window (test above): 375-540 s.
    assert dip["first_out_min"].item() == pytest.approx(6.25)
    assert dip["last_back_min"].item() == pytest.approx(9.0)
    assert (summary[summary["scenario"] == "no_disturbance"]["out_of_spec_s"] == 0).all()
    assert "| PRESS.TABLET_API | %LC | 95-105 |" in result.stdout
    assert "covers the PRESS.TABLET_API windows" in result.stdout
    for name in ("no_disturbance", "api_feeder_dip"):
        table = pd.read_csv(out / f"{name}.csv")
        assert len(table) > 100 and "predicted.NIR.API_CONC" in table.columns
        assert (out / f"{name}.png").stat().st_size > 10_000
    client = MlflowClient(uri)
    [run] = client.search_runs(
        [client.get_experiment_by_name("cdc-line-twin").experiment_id],
        "tags.`twin.stage` = 'scenario'",
    )
    assert run.data.metrics["api_feeder_dip/rule_covers"] == 1.0
    names = {a.path for a in client.list_artifacts(run.info.run_id, "scenarios")}
    assert "scenarios/api_feeder_dip.png" in names


def test_twin_optimise_cli_improves_the_twin_and_records_the_plant_check(twin_file, tmp_path):
    # Here rather than in test_optimise.py: it reuses this module's twin file.
    from mlflow.tracking import MlflowClient

    from tests.training.twin_cli import run_twin

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    small = ["optimise.disturbances.n_profiles=2", "optimise.horizon_min=8",
             "optimise.optimiser.iterations=4", "optimise.disturbances.onset_min=[1.0,2.0]"]
    result = run_twin(tmp_path, uri, "optimise", f"twin.file={twin_file}", *small,
                      "hydra.run.dir=out")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    history = pd.read_csv(out / "optimise.csv")
    assert len(history) >= 4 and {"BLEND.SPEED_SP", "throughput_kg_h"} <= set(history.columns)
    assert "| plant |" in (out / "optimise.md").read_text()
    assert (out / "optimise.png").stat().st_size > 10_000
    client = MlflowClient(uri)
    [run] = client.search_runs(
        [client.get_experiment_by_name("cdc-line-twin").experiment_id],
        "tags.`twin.stage` = 'optimise'",
    )
    metrics = run.data.metrics
    assert metrics["twin_rms_best"] <= metrics["twin_rms_start"]
    assert metrics["plant_rms_start"] > 0 and metrics["plant_rms_best"] > 0
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"optimise.csv", "optimise.md", "optimise.png"} <= names


def test_twin_optimise_refuses_what_the_plant_cannot_run_before_the_search(twin_file, tmp_path):
    from tests.training.twin_cli import run_twin

    # A million iterations: were the plant check's refusal to come after the search, the
    # command would run for hours and time out here.
    result = run_twin(tmp_path, f"sqlite:///{tmp_path / 'store.db'}", "optimise",
                      f"twin.file={twin_file}",
                      "+optimise.settings={FEED_API.MASSFLOW_SP: [2.5, 3.5]}",
                      "optimise.settings.throughput_kg_h=null",  # it, too, sets FEED_API
                      "optimise.optimiser.iterations=1000000", "hydra.run.dir=out",
                      timeout=300)  # fmt: skip
    assert result.returncode != 0
    assert ("optimise.settings.FEED_API.MASSFLOW_SP: the plant check sets only"
            in result.stderr)  # fmt: skip
