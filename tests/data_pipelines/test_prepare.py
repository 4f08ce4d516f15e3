"""prepare_dataset end to end: config checks, formats, time zones, rejects, a real export."""

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from data_pipelines import DataConfig, DataValidationError, TagDictionary, prepare_dataset
from data_pipelines.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
# tests/data/bibmon_real_process/README.md: where it comes from, and its licence
BIBMON_GZ = REPO / "tests" / "data" / "bibmon_real_process" / "real_process_data.csv.gz"
BIBMON_SHA256 = "d360b9e7e0d9e1f7f824e9f0c4f7817c0205eaf3ada3089a4521bb57c30fa308"


def _prepare(raw, out, tags, data):
    return prepare_dataset(raw, out, tags=tags, data=data, plant_name="test_line")


def _run_files(out: Path, manifest: dict) -> dict[str, bytes]:
    return {seg: (out / entry["file"]).read_bytes() for seg, entry in manifest["runs"].items()}


def test_unknown_data_key_raises_value_error_listing_the_valid_keys(tmp_path, small_tags):
    with pytest.raises(ValueError, match=r"unknown keys \['dt'\]; valid keys: .*'dt_s'"):
        _prepare(tmp_path, tmp_path / "out", small_tags, {"dt": 5.0})
    with pytest.raises(ValueError, match=r"data.split: unknown keys \['validation'\]"):
        _prepare(tmp_path, tmp_path / "out", small_tags, {"split": {"validation": 0.2}})
    # null became the column name "None"
    with pytest.raises(ValueError, match=r"data.quality_column: expected a column name, got "
                                         r"None; a long export without a quality column"):
        _prepare(tmp_path, tmp_path / "out", small_tags, {"quality_column": None})


def test_a_config_value_that_is_not_a_number_is_refused_naming_its_key():
    # bare ValueError / TypeError from float() named nothing; a seed of 1.9 ran as seed 1
    tag = {"role": "input", "unit": "kg/h", "sample_period_s": 1.0, "range": [0.0, 10.0]}
    for entry, message in (
        ({**tag, "sample_period_s": "1 s"}, r"sample_period_s: expected a number, got '1 s'"),
        ({**tag, "sample_period_s": None}, r"tag SP: sample_period_s: expected a number, got No"),
        ({**tag, "range": [0.0, "10 kg/h"]}, r"tag SP: range: expected a number, got '10 kg/h'"),
        ({**tag, "max_hold_s": "30 s"}, r"tag SP: max_hold_s: expected a number, got '30 s'"),
        (
            {**tag, "max_hold_s": 0.5},
            r"tag SP: max_hold_s must be finite and >= its sample_period_s \(1 s\), got 0.5",
        ),
        ({**tag, "max_hold_s": "inf"}, r"tag SP: max_hold_s must be finite"),
        (
            {**tag, "role": "measurement", "max_hold_s": 30},
            r"tag SP: max_hold_s applies to held tags \(roles \['input', 'disturbance'\]\); a "
            r"measurement is never held",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            TagDictionary.from_mapping({"SP": entry})
    for split, message in (
        ({"train": "70%"}, r"data.split.train: expected a number, got '70%'"),
        ({"seed": "x"}, r"data.split.seed: expected a number, got 'x'"),
        ({"seed": 1.9}, r"data.split.seed: expected a whole number, got 1.9"),
        (None, r"data.split: expected a mapping \(train, val, test, seed\), got None"),
    ):
        with pytest.raises(ConfigError, match=message):
            DataConfig.from_mapping({"split": split})
    assert DataConfig.from_mapping({"split": {"seed": "3"}}).split["seed"] == 3


def test_shipped_data_config_and_plant_dictionary_are_accepted():
    data = yaml.safe_load((REPO / "configs/data/cdc_default.yaml").read_text())
    config = DataConfig.from_mapping(data)
    assert (config.raw_dir, config.out_dir, config.dt_s) == ("data/raw", "data/prepared", 5.0)
    plant = yaml.safe_load((REPO / "configs/plant/cdc_line.yaml").read_text())
    dictionary = TagDictionary.from_mapping(plant["tags"])
    assert len(dictionary.with_role("input")) == 5 and "NIR.API_CONC" in dictionary


def test_csv_and_parquet_exports_give_the_same_prepared_dataset(
    six_run_export, tmp_path, small_tags, data_config, exports
):
    raw, frame, runs = six_run_export
    exports.write_export(tmp_path / "raw_pq", frame, runs, file_format="parquet")
    csv = _prepare(raw, tmp_path / "out_csv", small_tags, data_config)
    parquet = _prepare(tmp_path / "raw_pq", tmp_path / "out_pq", small_tags, data_config)
    assert _run_files(tmp_path / "out_csv", csv) == _run_files(tmp_path / "out_pq", parquet)
    for key in ("normalisation", "splits", "runs", "counts"):
        assert csv[key] == parquet[key], key


def test_same_instants_in_plus_one_hour_and_in_utc_give_identical_output(
    six_run_export, tmp_path, small_tags, data_config
):
    raw, _, _ = six_run_export
    shifted = tmp_path / "raw_cet"
    shifted.mkdir()
    for name in ("historian.csv", "runs.csv"):
        table = pd.read_csv(raw / name, dtype=str, keep_default_na=False)
        for column in {"timestamp", "start", "end"} & set(table.columns):
            local = pd.to_datetime(table[column], utc=True).dt.tz_convert("Etc/GMT-1")
            table[column] = local.dt.strftime("%Y-%m-%dT%H:%M:%S.%f").str[:-3] + "+01:00"
        table.to_csv(shifted / name, index=False, lineterminator="\n")
    assert "T07:00:00.000+01:00" in (shifted / "historian.csv").read_text()[:200]
    utc = _prepare(raw, tmp_path / "out_utc", small_tags, data_config)
    cet = _prepare(shifted, tmp_path / "out_cet", small_tags, data_config)
    assert _run_files(tmp_path / "out_utc", utc) == _run_files(tmp_path / "out_cet", cet)
    assert (tmp_path / "out_utc/rejects.csv").read_bytes() == (
        tmp_path / "out_cet/rejects.csv"
    ).read_bytes()
    assert utc["runs"] == cet["runs"] and utc["normalisation"] == cet["normalisation"]


def test_naive_local_timestamps_in_the_configured_zone_match_the_utc_export(
    six_run_export, tmp_path, small_tags, data_config
):
    raw, _, _ = six_run_export
    naive = tmp_path / "raw_naive"
    naive.mkdir()
    for name in ("historian.csv", "runs.csv"):
        table = pd.read_csv(raw / name, dtype=str, keep_default_na=False)
        for column in {"timestamp", "start", "end"} & set(table.columns):
            local = pd.to_datetime(table[column], utc=True).dt.tz_convert("Europe/Berlin")
            table[column] = local.dt.strftime("%Y-%m-%d %H:%M:%S.%f")
        table.to_csv(naive / name, index=False, lineterminator="\n")
    utc = _prepare(raw, tmp_path / "out_utc", small_tags, data_config)
    berlin = _prepare(
        naive, tmp_path / "out_naive", small_tags, {**data_config, "timezone": "Europe/Berlin"}
    )
    assert _run_files(tmp_path / "out_utc", utc) == _run_files(tmp_path / "out_naive", berlin)


def test_rejected_rows_go_to_rejects_csv_and_leave_a_zero_count_cell(
    six_run_export, tmp_path, small_tags, data_config, exports
):
    raw, frame, runs = six_run_export
    frame = frame.copy()
    nir = np.flatnonzero((frame["tag"] == "NIR.CONC").to_numpy())
    frame.loc[nir[3], ["value", "quality"]] = [np.nan, "Bad"]  # 15 s into R1
    frame.loc[nir[4], "value"] = 99.0  # 20 s: out of range
    exports.write_export(tmp_path / "raw2", frame, runs)
    out = tmp_path / "out"
    manifest = _prepare(tmp_path / "raw2", out, small_tags, data_config)
    rejects = pd.read_csv(out / "rejects.csv")
    assert rejects["reason"].tolist() == [
        "bad_quality: quality 'Bad'",
        "out_of_range: 99.0 %w/w outside [0.0, 40.0] %w/w",
    ]
    assert rejects["row"].tolist() == [nir[3] + 1, nir[4] + 1]
    assert manifest["counts"]["rows_rejected"] == 2
    r1 = pd.read_parquet(out / manifest["runs"]["R1"]["file"]).set_index("time_s")
    assert r1.loc[15.0, "NIR.CONC__n"] == 0 and np.isnan(r1.loc[15.0, "NIR.CONC"])
    assert r1.loc[20.0, "NIR.CONC__n"] == 0 and r1.loc[25.0, "NIR.CONC__n"] == 1


def test_events_and_fault_labels_are_copied_and_hashed(
    six_run_export, tmp_path, small_tags, data_config
):
    raw, _, _ = six_run_export
    (raw / "events.csv").write_text(
        "timestamp,run_id,event,unit,tag,value\n2025-03-01T06:05:00Z,R1,refill_start,API,,\n"
    )
    (raw / "fault_labels.csv").write_text(
        "run_id,fault_kind,onset,end,magnitude,"
        "affected_unit,affected_tag\nR6,nir_fouling,"
        "2025-03-01T11:05:00Z,2025-03-01T11:10:00Z,0.5,NIR,"
        "NIR.CONC\n"
    )
    manifest = _prepare(raw, tmp_path / "out", small_tags, data_config)
    for name in ("events.csv", "fault_labels.csv"):
        assert (tmp_path / "out" / name).read_bytes() == (raw / name).read_bytes()
        assert manifest["files"][name] == manifest["source"]["files"][name]


def test_no_historian_file_and_a_doubled_export_are_fatal(
    six_run_export, tmp_path, small_tags, data_config, exports
):
    raw, frame, runs = six_run_export
    with pytest.raises(DataValidationError, match=r"no historian file matches .*historian.csv"):
        _prepare(raw, tmp_path / "out", small_tags, {**data_config, "historian_glob": "x*"})
    exports.write_export(raw, frame, None, file_format="parquet")
    with pytest.raises(DataValidationError, match=r"\['historian'\] exist both as CSV and"):
        _prepare(raw, tmp_path / "out", small_tags, data_config)


def test_real_bibmon_export_counts_quality_strings_as_its_readme_says(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    export = gzip.decompress(BIBMON_GZ.read_bytes())
    assert hashlib.sha256(export).hexdigest() == BIBMON_SHA256
    (raw / "real_process_data.csv").write_bytes(export)
    tags = {
        f"tag{i}": {
            "role": "measurement",
            "unit": "-",
            "sample_period_s": 300.0,
            "range": [-1.0e3, 1.0e3],
        }
        for i in range(108)
    }
    data = {"historian_glob": "real_process_data.csv", "dt_s": 300.0, "max_gap_s": 900.0}
    manifest = prepare_dataset(raw, tmp_path / "out", tags=tags, data=data, plant_name="bibmon")
    counts = manifest["counts"]
    assert counts["rows_in"] == 3169 * 108 and counts["empty_cells"] == 0
    assert counts["rows_rejected"] == 156 + 14 + 1 + 326 + 1
    assert counts["rejected_by_reason"]["bad_quality"] == counts["rows_rejected"]
    rejects = pd.read_csv(tmp_path / "out" / "rejects.csv")
    by_tag = rejects.groupby(["tag", "quality"]).size().to_dict()
    assert by_tag == {
        ("tag2", "Inp OutRange"): 156,
        ("tag34", "Bad"): 14,
        ("tag36", "Scan Timeout"): 1,
        ("tag70", "Bad"): 326,
        ("tag72", "Scan Timeout"): 1,
    }
    assert rejects["reason"].str.startswith("bad_quality: quality '").all()
    assert len(manifest["constant_tags"]) == 14 and "tag13" in manifest["constant_tags"]
    run = pd.read_parquet(tmp_path / "out" / manifest["runs"]["run_0"]["file"])
    assert len(run) == 3169 and run["tag2__n"].sum() == 3169 - 156
    source = pd.read_csv(raw / "real_process_data.csv", usecols=[0, 101])
    np.testing.assert_array_equal(run["tag100"].to_numpy(), source["tag100"].to_numpy())


def test_an_input_lost_for_70_min_of_the_real_export_ends_its_hold_after_max_hold_s(tmp_path):
    """tag34 reads "Bad" for 14 samples in a row (rows 1546-1559, 5-min grid). As an input
    with max_hold_s 15 min, its last good value (row 1545) stands for rows 1546-1548; rows
    1549-1559 have none, and the run splits at row 1549 so that training starts again at
    row 1560. Nothing else changes: every other tag's samples stay in the two segments."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "real_process_data.csv").write_bytes(gzip.decompress(BIBMON_GZ.read_bytes()))
    measurement = {"role": "measurement", "unit": "-", "sample_period_s": 300.0,
                   "range": [-1.0e3, 1.0e3]}  # fmt: skip
    tags = {f"tag{i}": dict(measurement) for i in range(108)}
    tags["tag34"] = {**measurement, "role": "input", "max_hold_s": 900.0}
    data = {"historian_glob": "real_process_data.csv", "dt_s": 300.0, "max_gap_s": 900.0}
    manifest = prepare_dataset(raw, tmp_path / "out", tags=tags, data=data, plant_name="bibmon")
    assert manifest["tags"]["tag34"]["max_hold_s"] == 900.0
    n_rows = {k: v["n_rows"] for k, v in manifest["runs"].items()}
    assert n_rows == {"run_0": 1549, "run_0_s1": 1620}
    first, second = (pd.read_parquet(tmp_path / "out" / manifest["runs"][k]["file"])
                     for k in ("run_0", "run_0_s1"))  # fmt: skip
    assert first["tag34"].notna().all()
    assert second["tag34"].isna().to_numpy().nonzero()[0].tolist() == list(range(11))
    assert first["tag100__n"].sum() + second["tag100__n"].sum() == 3169
    assert [w for w in manifest["warnings"] if "max_hold_s" in w] == [
        "run run_0 tag tag34: 11 grid points without a value, its last valid sample older than "
        "max_hold_s = 900 s (up to 4200 s old): left NaN, not held, and the run split where "
        "the value went stale"
    ]


def test_a_wide_export_headed_by_pi_attribute_tags_prepares(tmp_path):
    """A dictionary tag `FIC101[PV]` heading a wide column is that tag, not FIC101 in unit
    "PV" (which stopped prepare as an unknown tag); `TI7 [degC]` still claims its unit."""
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = "".join(f"2025-03-01T06:00:{s:02d}Z,{1.0 + s / 10:.1f},{40 + s / 100:.2f}\n"
                   for s in range(20))  # fmt: skip
    (raw / "historian.csv").write_text("timestamp,FIC101[PV],TI7 [degC]\n" + rows)
    tags = {"FIC101[PV]": {"role": "input", "unit": "kg/h", "sample_period_s": 1.0,
                           "range": [0.0, 10.0]},
            "TI7": {"role": "measurement", "unit": "degC", "sample_period_s": 1.0,
                    "range": [0.0, 100.0]}}  # fmt: skip
    manifest = _prepare(raw, tmp_path / "out", tags, {"dt_s": 5.0})
    run = pd.read_parquet(tmp_path / "out" / manifest["runs"]["run_0"]["file"])
    assert run["FIC101[PV]"].tolist() == [1.0, 1.5, 2.0, 2.5, 2.9]
    assert manifest["counts"]["rows_valid"] == 40
    tags["TI7"]["unit"] = "K"
    with pytest.raises(DataValidationError, match=r"tag TI7: unit 'degC' but the tag diction"):
        _prepare(raw, tmp_path / "out2", tags, {"dt_s": 5.0})


def test_data_pipelines_never_imports_torch_or_hybrid_twin():
    code = (
        "import sys, data_pipelines, data_pipelines.prepare; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'hybrid_twin', 'lightning', 'hydra', 'mlflow')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
