"""`twin evaluate-diversion`'s parts: the re-simulated truth of fault runs and the twin's
out-of-spec windows against it.

A tiny campaign (3 normal + 1 fault run per kind, 30 min each) is simulated and prepared
as `twin generate` + `twin prepare` would; the API blockage is drawn deep and fast (70-75 %
feed factor lost over 1-2 min) so that its tablets leave the specification inside the run.
The twin is the untrained mechanistic twin of the shipped configs (float64) in an OnlineTwin
with a never-alarming monitor: the windows depend on the filter's prediction alone.
"""

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from data_pipelines.plant_sim import validate_sim_config
from hybrid_twin import ConfigError
from training.config_dir import SHIPPED_CONFIG_DIR
from training.dataset import PreparedDataset
from training.diversion_truth import DiversionSettings, compare_windows, diversion_per_run
from training.export import noise_settings
from training.fault_evaluation import load_labels
from training.online_twin import OnlineTwin, placeholder_monitor
from training.plant_truth import cell_means
from training.twin_model import build_twin_model

PAST_STEPS = 6
SEED = 0


def _load(relative: str) -> dict:
    return yaml.safe_load((SHIPPED_CONFIG_DIR / relative).read_text())


@pytest.fixture(scope="module")
def sim() -> dict:
    sim = {
        **_load("sim/cdc_default.yaml"),
        "n_normal_runs": 3,
        "n_extrapolation_runs": 0,
        "n_fault_runs_per_kind": 1,
        "run_hours": 0.5,
        "n_setpoint_changes": 1,
    }
    sim["faults"]["api_feeder_blockage"] = {"magnitude": [0.7, 0.75], "ramp_minutes": [1.0, 2.0]}
    return validate_sim_config(sim)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, sim) -> PreparedDataset:
    from data_pipelines import prepare_dataset
    from data_pipelines.plant_sim import write_historian_export

    root = tmp_path_factory.mktemp("fault_campaign")
    tags = _load("plant/cdc_line.yaml")["tags"]
    write_historian_export(root / "raw", tags=tags, sim=sim, seed=SEED)
    data = {**_load("data/cdc_default.yaml"), "raw_dir": str(root / "raw")}
    data["out_dir"] = str(root / "prepared")
    prepare_dataset(root / "raw", root / "prepared", tags=tags, data=data, plant_name="cdc_line")
    return PreparedDataset.open(root / "prepared")


@pytest.fixture(scope="module")
def settings(dataset) -> DiversionSettings:
    return DiversionSettings.from_config(
        OmegaConf.create(_load("evaluate_diversion.yaml")), dataset
    )


@pytest.fixture(scope="module")
def online(dataset) -> OnlineTwin:
    torch.set_num_threads(1)
    model = build_twin_model(
        _load("flowsheet/cdc_line.yaml"), _load("model/mechanistic.yaml"),
        _load("solver/rk4.yaml"), dataset.input_tags, dataset.measurement_tags,
        dataset.normalisation(torch.float64), dataset.dt_s,
    ).to(torch.float64).eval()  # fmt: skip
    noise = noise_settings(model, dataset, OmegaConf.create(_load("export.yaml")).filter)
    monitor = placeholder_monitor(len(dataset.measurement_tags))
    online = OnlineTwin(model, noise["q"], noise["r"], noise["p0_std"], monitor)
    return online.to(torch.float64).eval()


@pytest.fixture(scope="module")
def per_run(dataset, sim, settings, online) -> pd.DataFrame:
    runs = dataset.load_split("fault", torch.float64)
    return diversion_per_run(
        online, dataset, runs, load_labels(dataset, [r.run_id for r in runs]), sim, SEED,
        settings, PAST_STEPS, torch.float64,
    ).set_index("fault_kind")


def test_resimulation_reproduces_the_recorded_runs(per_run):
    # the controller's load-cell flow is recorded as simulated: historian rounding only
    assert (per_run.loadcell_dev < 1e-3).all(), per_run.loadcell_dev
    # noise-free flows and NIR: within the sensor noise (a few % of the signal, << 1 std)
    assert (per_run.flow_dev < 0.3).all() and (per_run.nir_dev < 0.3).all()
    assert len(per_run) == 5


def test_true_window_follows_the_blockage_and_the_twin_window_overlaps_it(per_run):
    run = per_run.loc["api_feeder_blockage"]
    # the feed factor is 70-75 % gone 1-2 min after onset; the tablets follow through the
    # blender and feed frame (tens of seconds to a few minutes) and stay out (persisting)
    assert run.onset_s < run.true_start_s < run.onset_s + 600.0
    assert run.true_end_s >= run.end_s  # open to the end of the run
    assert run.true_worst < 60.0  # %LC: far below 95
    assert run.twin_windows >= 1
    assert run.overlap_true > 0.1 and run.overlap_twin > 0.9
    assert abs(run.start_diff_s) < 300.0
    # the rule misses nothing, but the window is still open where the run's data end: whether
    # the rule's end (label end + 300 s, after the data) covers it is not known
    assert run.rule_open_end and not run.rule_covers and run.rule_missed_s == 0.0
    assert run.true_tablets > 1000 and run.twin_tablets > 100


def test_nir_fouling_leaves_the_tablets_in_spec(per_run):
    # the process is unchanged: no true window (the twin's may follow the biased NIR)
    run = per_run.loc["nir_fouling"]
    assert run.true_windows == 0 and run.true_tablets == 0.0
    assert run.twin_covers and math.isnan(run.overlap_true)


def test_wrong_seed_is_refused_naming_it(dataset, sim, settings):
    runs = dataset.load_split("fault", torch.float64)[:1]
    labels = load_labels(dataset, [runs[0].run_id])
    with pytest.raises(ConfigError, match="seed"):
        diversion_per_run(None, dataset, runs, labels, sim, SEED + 1, settings, PAST_STEPS,
                          torch.float64)  # fmt: skip


def test_compare_windows_edges_overlap_and_coverage():
    t = np.arange(20) * 5.0
    true = np.full(20, 100.0)
    true[4:10] = 90.0  # 20-50 s
    twin = np.full(20, 100.0)
    twin[6:12] = 92.0  # 30-60 s
    ones = (np.full(20, 36.0), np.full(20, 400.0))  # 36 kg/h, 400 mg: 0.05 kg, 125 tablets/5 s
    row = compare_windows(t, (true, *ones), (twin, *ones), (95.0, 105.0), (15.0, 40.0))
    assert (row["true_start_s"], row["true_end_s"]) == (20.0, 50.0)
    assert (row["start_diff_s"], row["end_diff_s"]) == (10.0, 10.0)
    assert row["overlap_true"] == pytest.approx(4 / 6) and row["overlap_twin"] == pytest.approx(
        4 / 6
    )
    assert row["true_tablets"] == pytest.approx(6 * 125.0)
    assert not row["twin_covers"] and row["twin_missed_s"] == 10.0  # 20-30 s before the twin's
    assert not row["rule_covers"] and row["rule_missed_s"] == 10.0  # 40-50 s after the rule's
    assert row["rule_extra_s"] == 5.0  # 15-20 s diverted in spec


def test_the_rule_is_judged_only_up_to_the_last_compared_row():
    # Past the data (a label ending with the run) the rule's diversion counted as in-spec
    # time diverted, and a window still open there as covered
    t = np.arange(20) * 5.0  # compared rows end at 100 s
    ones = (np.full(20, 36.0), np.full(20, 400.0))
    closed = np.full(20, 100.0)
    closed[4:10] = 90.0  # out 20-50 s
    row = compare_windows(t, (closed, *ones), (closed, *ones), (95.0, 105.0), (15.0, 400.0))
    assert row["rule_covers"] and not row["rule_open_end"]
    assert row["rule_extra_s"] == 5.0 + 50.0  # 15-20 s and 50-100 s, not 50-400 s
    still_out = np.full(20, 100.0)
    still_out[12:] = 90.0  # out from 60 s to the end of the rows
    row = compare_windows(t, (still_out, *ones), (still_out, *ones), (95.0, 105.0),
                          (15.0, 400.0))  # fmt: skip
    assert not row["rule_covers"] and row["rule_open_end"] and row["rule_missed_s"] == 0.0


def test_the_worst_value_is_the_one_farthest_outside_the_limits_in_any_unit():
    t = np.arange(10) * 5.0
    nir = np.array([10, 9.4, 10, 10, 12.0, 10, 10, 10, 10, 10])  # %w/w: 0.1 below, 1.5 above
    ones = (np.full(10, 30.0), np.full(10, 400.0))
    row = compare_windows(t, (nir, *ones), (nir, *ones), (9.5, 10.5), (0.0, 50.0))
    assert row["true_worst"] == row["twin_worst"] == 12.0  # not 9.4, the nearer to 100


def test_cell_means_follow_the_prepared_grid_convention():
    signal = np.arange(12.0)  # 1 s samples at t = 0..11
    # cell (t - 5, t]: t=0 -> {0}; t=5 -> {1..5}; t=10 -> {6..10}; t=15 -> {11} (end of data)
    np.testing.assert_allclose(cell_means(signal, np.array([0.0, 5.0, 10.0, 15.0]), 5.0),
                               [0.0, 3.0, 8.0, 11.0])  # fmt: skip


def test_settings_errors_name_the_key(dataset):
    raw = _load("evaluate_diversion.yaml")
    bad_tag = OmegaConf.create({**raw, "diversion": {**raw["diversion"], "tag": "PRESS.X"}})
    with pytest.raises(ConfigError, match="diversion.tag"):
        DiversionSettings.from_config(bad_tag, dataset)
    no_limits = OmegaConf.create({**raw, "spec_limits": {"NIR.API_CONC": [9.5, 10.5]}})
    with pytest.raises(ConfigError, match="spec_limits.PRESS.TABLET_API"):
        DiversionSettings.from_config(no_limits, dataset)
    bad_rule = OmegaConf.create(
        {**raw, "diversion": {**raw["diversion"], "rule": {"delay_s": 0, "margin_s": -1}}}
    )
    with pytest.raises(ConfigError, match="diversion.rule.margin_s"):
        DiversionSettings.from_config(bad_rule, dataset)


@pytest.fixture(scope="module")
def gapped(tmp_path_factory, dataset) -> tuple[PreparedDataset, str]:
    """The campaign again, with a 5 min historian outage 10 min before the blockage's onset:
    `twin prepare` splits that run into two segments, the first wholly before the fault."""
    from data_pipelines import prepare_dataset

    root = tmp_path_factory.mktemp("gapped_campaign")
    shutil.copytree(Path(dataset.root).parent / "raw", root / "raw")  # the `dataset` export
    labels = pd.read_csv(root / "raw" / "fault_labels.csv").set_index("fault_kind")
    blockage = labels.loc["api_feeder_blockage"]
    onset = pd.Timestamp(blockage.onset)
    historian = pd.read_parquet(root / "raw" / "historian.parquet")
    outage = historian.timestamp.between(onset - pd.Timedelta(minutes=10),
                                         onset - pd.Timedelta(minutes=5))  # fmt: skip
    historian[~outage].to_parquet(root / "raw" / "historian.parquet", index=False)
    data = {**_load("data/cdc_default.yaml"), "raw_dir": str(root / "raw")}
    data["out_dir"] = str(root / "prepared")
    prepare_dataset(root / "raw", root / "prepared", tags=_load("plant/cdc_line.yaml")["tags"],
                    data=data, plant_name="cdc_line")  # fmt: skip
    return PreparedDataset.open(root / "prepared"), str(blockage.run_id)


def test_a_run_split_at_a_data_gap_is_scored_on_its_segment_in_the_fault(gapped, sim, settings,
                                                                        online, caplog):
    dataset, blocked = gapped
    segments = [r for r in dataset.run_ids("fault") if r.startswith(blocked)]
    assert segments == [blocked, f"{blocked}_s1"]  # the outage split the run
    runs = [r for r in dataset.load_split("fault", torch.float64) if r.run_id in segments]
    labels = load_labels(dataset, segments)
    assert list(labels.source_run) == [blocked, blocked]  # both segments carry its label
    with caplog.at_level("WARNING", logger="training.diversion_truth"):
        per_run = diversion_per_run(online, dataset, runs, labels, sim, SEED, settings,
                                    PAST_STEPS, torch.float64)  # fmt: skip
    # the first segment ends before the onset: left out; the second is scored as a whole run
    assert list(per_run.run_id) == [f"{blocked}_s1"]
    assert f"left out: {blocked}" in caplog.text
    run = per_run.iloc[0]
    assert run.fault_kind == "api_feeder_blockage" and run.loadcell_dev < 1e-3
    assert run.onset_s > 0 and run.true_windows >= 1
