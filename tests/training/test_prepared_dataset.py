"""Opening, verifying and loading a prepared dataset (training/dataset.py)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from training.dataset import DatasetError, HashMismatchError, PreparedDataset, sha256_file

# The synthetic dataset's layout (tests/training/conftest.py).
INPUTS = ["FEED_API.MASSFLOW_SP", "BLEND.SPEED_SP"]
DISTURBANCES = ["FEED_API.HOPPER_MASS"]
MEASUREMENTS = ["FEED_API.MASSFLOW", "NIR.API_CONC", "PRESS.TABLET_WEIGHT"]
LEADING_NAN_ROWS = 3  # R002_s1's API setpoint has no held value on its first 3 rows
TABLET_EVERY_ROWS = 12  # at-line tablet weight every 60 s on a 5 s grid


def test_open_gives_tags_in_manifest_order_inputs_before_disturbances(prepared):
    dataset = PreparedDataset.open(prepared.path)
    assert dataset.input_tags == INPUTS + DISTURBANCES
    assert dataset.measurement_tags == MEASUREMENTS
    assert dataset.dt_s == 5.0
    assert dataset.splits["train"] == ["R001", "R002", "R002_s1", "R003"]
    assert dataset.manifest_sha256 == sha256_file(prepared.path / "manifest.json")


def test_changed_run_file_error_names_file_and_both_hashes(prepared):
    path = prepared.path / "runs" / "R004.parquet"
    frame = pd.read_parquet(path)
    frame.loc[10, "NIR.API_CONC"] += 0.1
    frame.to_parquet(path, index=False)
    expected = prepared.manifest["runs"]["R004"]["sha256"]
    actual = sha256_file(path)
    assert actual != expected
    with pytest.raises(HashMismatchError, match="runs/R004.parquet") as info:
        PreparedDataset.open(prepared.path)
    assert expected in str(info.value) and actual in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_run_file_changed_after_open_is_refused_when_loaded(prepared):
    """An export's monitor fit or a training's plots load runs minutes after `open` checked
    them; a `twin prepare` into the same folder in between was read as the hashed data."""
    dataset = PreparedDataset.open(prepared.path)
    path = prepared.path / "runs" / "R004.parquet"
    frame = pd.read_parquet(path)
    frame.loc[10, "NIR.API_CONC"] += 0.1
    frame.to_parquet(path, index=False)
    with pytest.raises(HashMismatchError, match=r"runs/R004.parquet: .*after the dataset was"):
        dataset.load_run("R004")
    dataset.load_run("R001")  # the files that did not change still load


def test_changed_rejects_file_is_caught_too(prepared):
    with open(prepared.path / "rejects.csv", "a") as handle:
        handle.write("historian.parquet,18,,NIR.API_CONC,,Bad,bad quality\n")
    with pytest.raises(HashMismatchError, match="rejects.csv"):
        PreparedDataset.open(prepared.path)


def test_missing_run_file_error_names_it(prepared):
    (prepared.path / "runs" / "R005.parquet").unlink()
    with pytest.raises(DatasetError, match=r"runs/R005.parquet: listed in the manifest"):
        PreparedDataset.open(prepared.path)


def test_folder_without_manifest_is_named(tmp_path):
    with pytest.raises(DatasetError, match="no manifest"):
        PreparedDataset.open(tmp_path)


def test_manifest_path_outside_the_folder_is_refused(prepared):
    manifest = dict(prepared.manifest, files={"../escape.csv": "0" * 64})
    (prepared.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        PreparedDataset.open(prepared.path)


def test_split_naming_an_unknown_run_is_refused(prepared):
    manifest = json.loads((prepared.path / "manifest.json").read_text())
    manifest["splits"]["val"].append("R999")
    (prepared.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="split 'val' names run 'R999'"):
        PreparedDataset.open(prepared.path)


def test_a_dataset_without_train_runs_is_refused_saying_why(prepared):
    # e.g. `twin generate sim.n_normal_runs=4` (all 4 extrapolation runs, so all test)
    manifest = json.loads((prepared.path / "manifest.json").read_text())
    manifest["splits"]["test"] += manifest["splits"]["train"]
    manifest["splits"]["train"] = []
    with pytest.raises(DatasetError, match=r"no run in the train split \(train 0, val 1"):
        PreparedDataset(prepared.path, manifest, "sha")


def test_unknown_split_lists_the_valid_ones(prepared):
    dataset = PreparedDataset.open(prepared.path)
    with pytest.raises(DatasetError, match="unknown split 'trian'.*train, val, test, fault"):
        dataset.run_ids("trian")


def test_normalisation_uses_the_manifest_train_statistics_checked_by_hand(make_dataset, float64):
    def edit(frames):
        frames["R004"].loc[20, ["NIR.API_CONC", "NIR.API_CONC__n"]] = [14.0, 1]

    synthetic = make_dataset(
        edit,
        normalisation={
            "NIR.API_CONC": {"mean": 10.0, "std": 2.0},
            "FEED_API.MASSFLOW_SP": {"mean": 16.0, "std": 8.0},
        },
    )
    run = PreparedDataset.open(synthetic.path).load_run("R004")  # a val run
    assert run.y.dtype == torch.float64
    assert run.y[20, MEASUREMENTS.index("NIR.API_CONC")].item() == (14.0 - 10.0) / 2.0
    assert run.u[20, INPUTS.index("FEED_API.MASSFLOW_SP")].item() == (20.0 - 16.0) / 8.0


def test_all_columns_are_normalised_with_train_stats(prepared, float64):
    dataset = PreparedDataset.open(prepared.path)
    stats = dataset.normalisation()
    train = pd.concat([prepared.frames[r] for r in ("R001", "R002", "R002_s1", "R003")])
    train_mean = train[INPUTS + DISTURBANCES].mean().to_numpy()
    torch.testing.assert_close(stats.u_mean, torch.tensor(train_mean))
    run = dataset.load_run("R005")
    raw = torch.tensor(prepared.frames["R005"][INPUTS + DISTURBANCES].to_numpy())
    torch.testing.assert_close(run.u * stats.u_std + stats.u_mean, raw)


def test_mask_matches_count_columns_and_masked_values_are_zero(prepared):
    run = PreparedDataset.open(prepared.path).load_run("R001")
    frame = prepared.frames["R001"]
    counts = torch.tensor(frame[[tag + "__n" for tag in MEASUREMENTS]].to_numpy())
    assert torch.equal(run.mask, counts > 0)
    assert 0 < int(run.mask.sum()) < run.mask.numel()
    assert torch.all(run.y[~run.mask] == 0)
    assert not torch.isnan(run.y).any()


def test_multi_rate_tablet_weight_is_masked_off_between_samples(prepared):
    run = PreparedDataset.open(prepared.path).load_run("R002")
    mask = run.mask[:, MEASUREMENTS.index("PRESS.TABLET_WEIGHT")]
    assert torch.equal(
        torch.nonzero(mask).flatten(), torch.arange(0, run.n_rows, TABLET_EVERY_ROWS)
    )


def test_leading_rows_without_a_held_input_are_dropped_and_counted(prepared, float64):
    dataset = PreparedDataset.open(prepared.path)
    run = dataset.load_run("R002_s1")
    assert run.first_row == LEADING_NAN_ROWS
    assert run.n_rows == 40 - LEADING_NAN_ROWS
    assert torch.isfinite(run.u).all()
    stats = dataset.normalisation()
    first_setpoint = run.u[0, 0] * stats.u_std[0] + stats.u_mean[0]
    torch.testing.assert_close(first_setpoint, torch.tensor(float(LEADING_NAN_ROWS)))
    assert run.time_s[0].item() == LEADING_NAN_ROWS * 5.0


def test_input_nan_after_its_first_value_error_names_row_and_tag(make_dataset):
    def edit(frames):
        frames["R001"].loc[33, "BLEND.SPEED_SP"] = np.nan

    dataset = PreparedDataset.open(make_dataset(edit).path)
    with pytest.raises(DatasetError, match="runs/R001.parquet row 33 tag BLEND.SPEED_SP"):
        dataset.load_run("R001")


def test_measurement_nan_with_a_sample_count_error_names_row_and_tag(make_dataset):
    def edit(frames):
        frames["R004"].loc[5, ["NIR.API_CONC", "NIR.API_CONC__n"]] = [np.nan, 2]

    dataset = PreparedDataset.open(make_dataset(edit).path)
    with pytest.raises(DatasetError, match="R004.parquet row 5 tag NIR.API_CONC: value nan"):
        dataset.load_run("R004")


def test_measurement_value_in_an_unsampled_cell_is_refused(make_dataset):
    def edit(frames):
        frames["R004"].loc[1, "PRESS.TABLET_WEIGHT"] = 251.0  # __n stays 0

    dataset = PreparedDataset.open(make_dataset(edit).path)
    with pytest.raises(DatasetError, match="row 1 tag PRESS.TABLET_WEIGHT.*must be NaN"):
        dataset.load_run("R004")


def test_missing_column_error_names_file_and_tag(make_dataset):
    def edit(frames):
        frames["R005"] = frames["R005"].drop(columns=["NIR.API_CONC__n"])

    dataset = PreparedDataset.open(make_dataset(edit).path)
    with pytest.raises(DatasetError, match=r"R005.parquet: missing columns \['NIR.API_CONC__n'\]"):
        dataset.load_run("R005")


def test_time_grid_with_a_gap_is_refused(make_dataset):
    def edit(frames):
        frames["R005"].loc[30:, "time_s"] += 60.0

    dataset = PreparedDataset.open(make_dataset(edit).path)
    with pytest.raises(DatasetError, match="R005.parquet row 30: time_s steps 65.0 s"):
        dataset.load_run("R005")


def test_tag_constant_over_train_is_centred_not_scaled(make_dataset, float64):
    synthetic = make_dataset(normalisation={"BLEND.SPEED_SP": {"mean": 600.0, "std": 0.0}})
    dataset = PreparedDataset.open(synthetic.path)
    assert dataset.constant_tags == ["BLEND.SPEED_SP"]
    column = INPUTS.index("BLEND.SPEED_SP")
    assert dataset.normalisation().u_std[column].item() == 1.0
    assert dataset.load_run("R001").u[-1, column].item() == 50.0  # 650 rpm - 600 rpm


def test_negative_std_is_refused_naming_the_tag(make_dataset):
    synthetic = make_dataset(normalisation={"NIR.API_CONC": {"mean": 12.0, "std": -1.0}})
    with pytest.raises(DatasetError, match="normalisation of tag NIR.API_CONC"):
        PreparedDataset.open(synthetic.path)
