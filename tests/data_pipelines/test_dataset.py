"""Split by run, normalisation on train only, deterministic files and their hashes."""

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_pipelines import prepare_dataset, split_runs
from data_pipelines.errors import DataValidationError


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prepare(raw, out, tags, data):
    return prepare_dataset(raw, out, tags=tags, data=data, plant_name="test_line")


def test_split_is_by_run_never_by_sample(six_run_export, tmp_path, small_tags, data_config):
    raw, _, runs = six_run_export
    data_config["max_gap_s"] = 100.0
    manifest = _prepare(raw, tmp_path / "out", small_tags, data_config)
    listed = [seg for split in manifest["splits"].values() for seg in split]
    assert sorted(listed) == sorted(manifest["runs"])  # each segment in exactly one split
    by_run = {}
    for seg_id, entry in manifest["runs"].items():
        assert seg_id in manifest["splits"][entry["split"]]
        by_run.setdefault(entry["source_run"], set()).add(entry["split"])
    assert all(len(splits) == 1 for splits in by_run.values())
    assert sorted(by_run) == [r["run_id"] for r in runs]


def test_fault_runs_only_in_fault_and_extrapolation_runs_only_in_test(exports):
    runs = exports.runs_table(exports.six_runs())
    for seed in range(10):
        split = split_runs(runs, fractions={"train": 0.5, "val": 0.25, "test": 0.25}, seed=seed)
        assert split["R6"] == "fault" and split["R5"] == "test"
        assert [r for r, s in split.items() if s == "fault"] == ["R6"]
        normal = [split[r] for r in ("R1", "R2", "R3", "R4")]
        assert sorted(normal) == ["test", "train", "train", "val"]


def test_split_is_seeded_and_a_single_run_goes_to_train(exports):
    runs = exports.runs_table(exports.six_runs())
    fractions = {"train": 0.5, "val": 0.25, "test": 0.25}
    splits = [split_runs(runs, fractions=fractions, seed=s) for s in range(6)]
    assert splits[0] == split_runs(runs, fractions=fractions, seed=0)
    assert len({tuple(sorted(s.items())) for s in splits}) > 1
    one = runs.iloc[:1]
    assert split_runs(one, fractions=fractions, seed=0) == {"R1": "train"}


def test_normalisation_uses_train_runs_only(
    six_run_export, tmp_path, small_tags, data_config, exports
):
    raw, frame, runs = six_run_export
    first = _prepare(raw, tmp_path / "out1", small_tags, data_config)
    train = first["splits"]["train"]
    frames = [pd.read_parquet(tmp_path / "out1" / first["runs"][r]["file"]) for r in train]
    nir = pd.concat(frames)["NIR.CONC"].dropna()
    assert np.isclose(first["normalisation"]["NIR.CONC"]["mean"], nir.mean(), rtol=1e-12)
    assert np.isclose(first["normalisation"]["NIR.CONC"]["std"], nir.std(ddof=0), rtol=1e-12)
    # change every test and val run: the statistics must not move
    held_out = {
        first["runs"][r]["source_run"] for r in first["splits"]["test"] + first["splits"]["val"]
    }
    changed = frame.copy()
    edges = [r["start"] for r in runs] + [runs[-1]["start"] + pd.Timedelta(hours=1)]
    run_of = pd.cut(
        changed["timestamp"], bins=edges, right=False, labels=[r["run_id"] for r in runs]
    )
    changed.loc[run_of.isin(held_out).to_numpy(), "value"] *= 1.5
    exports.write_export(tmp_path / "raw2", changed, runs)
    second = _prepare(tmp_path / "raw2", tmp_path / "out2", small_tags, data_config)
    assert second["normalisation"] == first["normalisation"]
    assert second["splits"] == first["splits"]
    test_run = first["splits"]["test"][0]
    assert second["runs"][test_run]["sha256"] != first["runs"][test_run]["sha256"]


def test_constant_tag_std_is_floored_at_a_fraction_of_its_range(
    six_run_export, tmp_path, small_tags, data_config, exports
):
    raw, frame, runs = six_run_export
    frame = frame.copy()
    frame.loc[frame["tag"] == "HOPPER.MASS", "value"] = 20.0
    exports.write_export(tmp_path / "raw2", frame, runs)
    data_config["std_floor_fraction"] = 1e-3
    manifest = _prepare(tmp_path / "raw2", tmp_path / "out", small_tags, data_config)
    assert manifest["normalisation"]["HOPPER.MASS"] == {"mean": 20.0, "std": 1e-3 * 30.0}
    assert manifest["constant_tags"] == ["HOPPER.MASS"]


def test_manifest_hashes_match_the_files_and_counts_add_up(
    six_run_export, tmp_path, small_tags, data_config
):
    raw, frame, _ = six_run_export
    out = tmp_path / "out"
    manifest = _prepare(raw, out, small_tags, data_config)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted([*manifest["files"], "manifest.json"])
    for relative, digest in manifest["files"].items():
        assert _sha256(out / relative) == digest, relative
    for entry in manifest["runs"].values():
        assert manifest["files"][entry["file"]] == entry["sha256"]
        assert len(pd.read_parquet(out / entry["file"])) == entry["n_rows"]
    for name, digest in manifest["source"]["files"].items():
        assert _sha256(raw / name) == digest
    counts = manifest["counts"]
    assert counts["rows_in"] == len(frame) == counts["rows_valid"] + counts["rows_rejected"]


def test_same_input_gives_byte_identical_output(six_run_export, tmp_path, small_tags, data_config):
    raw, _, _ = six_run_export
    _prepare(raw, tmp_path / "a", small_tags, data_config)
    _prepare(raw, tmp_path / "b", small_tags, data_config)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.*"))
    assert files_a == files_b
    for relative in files_a:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes()


def test_a_second_prepare_leaves_no_stale_run_file(
    six_run_export, tmp_path, small_tags, data_config
):
    raw, _, _ = six_run_export
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "OLD_s1.parquet").write_bytes(b"stale")
    manifest = _prepare(raw, out, small_tags, data_config)
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        f"{seg}.parquet" for seg in manifest["runs"]
    )


def test_a_prepare_that_cannot_write_leaves_the_dataset_there_as_it_was(
    six_run_export, tmp_path, small_tags, data_config
):
    # a full disk (or Ctrl-C) half way emptied the folder of the last good dataset
    resource = pytest.importorskip("resource")  # POSIX
    raw, _, _ = six_run_export
    out = tmp_path / "out"
    _prepare(raw, out, small_tags, data_config)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))  # no file past 1 KB: a full disk
    try:
        with pytest.raises(DataValidationError, match=r"could not be written \(.*File too large"
                           r".*the one there before is left as it was"):  # fmt: skip
            _prepare(raw, out, small_tags, {**data_config, "dt_s": 10.0})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_a_runs_folder_on_another_disk_is_written_through_its_link(
    six_run_export, tmp_path, small_tags, data_config
):
    # runs/ as a link to a bigger disk: staged beside the dataset, the run files could not
    # be renamed across disks, after the old ones were deleted
    raw, _, _ = six_run_export
    out, elsewhere = tmp_path / "out", Path("/dev/shm") / f"twin_runs_{os.getpid()}"
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's folder")
    elsewhere.mkdir()
    try:
        out.mkdir()
        (out / "runs").symlink_to(elsewhere)
        for dt_s in (5.0, 10.0):
            manifest = _prepare(raw, out, small_tags, {**data_config, "dt_s": dt_s})
            for relative, sha256 in manifest["files"].items():
                assert _sha256(out / relative) == sha256, relative
            assert sorted(p.name for p in elsewhere.iterdir()) == sorted(
                f"{seg}.parquet" for seg in manifest["runs"]
            )
    finally:
        shutil.rmtree(elsewhere)


def test_prepares_into_one_folder_at_once_leave_one_whole_dataset(
    six_run_export, tmp_path, small_tags, data_config
):
    # each deleted the other's run files: one failed on a missing file, or the manifest of
    # one listed the other's files
    raw, _, _ = six_run_export
    out = tmp_path / "out"
    errors = []

    def prepare(dt_s):
        try:
            for _ in range(3):
                _prepare(raw, out, small_tags, {**data_config, "dt_s": dt_s})
        except Exception as error:  # noqa: BLE001 - any failure is the finding
            errors.append(error)

    threads = [threading.Thread(target=prepare, args=(dt_s,)) for dt_s in (5.0, 10.0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    manifest = json.loads((out / "manifest.json").read_text())
    for relative, sha256 in manifest["files"].items():
        assert _sha256(out / relative) == sha256, relative
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        f"{seg}.parquet" for seg in manifest["runs"]
    )


def test_run_file_columns_and_types_follow_the_contract(
    six_run_export, tmp_path, small_tags, data_config
):
    raw, _, _ = six_run_export
    manifest = _prepare(raw, tmp_path / "out", small_tags, data_config)
    frame = pd.read_parquet(tmp_path / "out" / manifest["runs"]["R1"]["file"])
    assert list(frame.columns) == [
        "time_s",
        "timestamp",
        *manifest["inputs"],
        *manifest["disturbances"],
        *manifest["measurements"],
        *[f"{m}__n" for m in manifest["measurements"]],
    ]
    assert str(frame["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert frame["NIR.CONC__n"].dtype == np.int16 and frame["FEED.SP"].dtype == np.float64
    assert len(frame) == 121 and manifest["runs"]["R1"]["start"] == "2025-03-01T06:00:00.000+00:00"


def test_halves_round_up_as_documented_despite_floating_point():
    runs = pd.DataFrame({"run_id": [f"R{i:02d}" for i in range(90)], "kind": "normal",
                         "regime": "interpolation"})  # fmt: skip
    split = split_runs(runs, fractions={"train": 0.3, "val": 0.35, "test": 0.35}, seed=0)
    sizes = {name: list(split.values()).count(name) for name in ("train", "val", "test")}
    assert sizes == {"train": 26, "val": 32, "test": 32}  # 90 x 0.35 = 31.5: 32 (was 31)


def test_a_run_without_a_valid_sample_takes_no_place_in_the_split(
    six_run_export, tmp_path, small_tags, data_config, exports
):
    raw, frame, runs = six_run_export
    frame = frame.copy()
    in_r1 = (frame["timestamp"] >= runs[0]["start"]) & (frame["timestamp"] < runs[1]["start"])
    frame.loc[in_r1, "quality"] = "Bad"
    exports.write_export(tmp_path / "raw2", frame, runs)
    manifest = _prepare(tmp_path / "raw2", tmp_path / "out", small_tags, data_config)
    assert "R1" not in {entry["source_run"] for entry in manifest["runs"].values()}
    # the others split as if R1 were not there (it could take train's only place)
    others = exports.runs_table([r for r in runs if r["run_id"] != "R1"])
    expected = split_runs(others, fractions={"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)
    assert {e["source_run"]: e["split"] for e in manifest["runs"].values()} == expected


def test_normalisation_counts_the_rows_training_uses():
    from data_pipelines.align import Segment
    from data_pipelines.dataset import normalisation
    from data_pipelines.tags import TagDictionary

    tags = {"FEED.SP": {"role": "input", "unit": "kg/h", "sample_period_s": 1, "range": [0, 10]},
            "NIR.CONC": {"role": "measurement", "unit": "%", "sample_period_s": 1,
                         "range": [0, 100]}}  # fmt: skip
    frame = pd.DataFrame({"FEED.SP": [np.nan, np.nan, 3.0, 3.0], "NIR.CONC": [90.0, 90, 10, 12]})
    never = pd.DataFrame({"FEED.SP": [np.nan] * 2, "NIR.CONC": [50.0, 50.0]})
    segments = [Segment("A", "A", "normal", "interpolation", 0, 0, frame),
                Segment("B", "B", "normal", "interpolation", 0, 0, never)]  # fmt: skip
    dictionary = TagDictionary.from_mapping(tags)
    stats, _ = normalisation(segments, {"A": "train", "B": "train"}, dictionary,
                             std_floor_fraction=1e-6)  # fmt: skip
    # training starts where every held tag has a value, and skips B: rows 2-3 of A alone
    assert stats["NIR.CONC"] == {"mean": 11.0, "std": 1.0}
    assert stats["FEED.SP"] == {"mean": 3.0, "std": 1e-6 * 10}
