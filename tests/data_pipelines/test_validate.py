"""validate and its file-level checks: each fault triggered by a small bad file, and plant
files at the edges (all rows bad, null Parquet columns, padded headers, stray categories, a
lone quality string, an empty runs.csv), each of which once crashed or misread."""

import importlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines import (
    DataConfig,
    DataValidationError,
    RowAccountingError,
    TagDictionary,
    prepare_dataset,
    read_historian,
    read_runs,
    validate,
)
from data_pipelines.timestamps import parse_timestamps

# `data_pipelines.validate` is the re-exported function; the module is reached by name.
validate_module = importlib.import_module("data_pipelines.validate")
HEADER = "timestamp,tag,value,quality\n"


def _validate(path, tags, **kwargs):
    table = read_historian(path, timezone="UTC")
    return validate([table], TagDictionary.from_mapping(tags), **kwargs)


def _reasons(result) -> dict[int, str]:
    return dict(zip(result.rejects["row"], result.rejects["reason"], strict=True))


def test_unknown_tag_error_names_file_row_tag_and_close_matches(write_text, small_tags):
    path = write_text(
        "historian.csv",
        HEADER + "2025-03-01T06:00:00Z,FEED.SP,1,Good\n2025-03-01T06:00:00Z,NIR.CONK,1,Good\n",
    )
    with pytest.raises(
        DataValidationError, match=r"historian.csv row 2 tag 'NIR.CONK': unknown tag.*NIR.CONC"
    ):
        _validate(path, small_tags)
    # a tag written in other case: difflib's ratio is case-sensitive and suggested nothing
    lower = write_text("lower.csv", HEADER + "2025-03-01T06:00:00Z,nir.conc,1,Good\n")
    with pytest.raises(DataValidationError, match=r"tag 'nir.conc': unknown tag.*'NIR.CONC'"):
        _validate(lower, small_tags)


def test_wrong_unit_in_the_exports_tag_dictionary_is_fatal(
    write_text, small_tags, data_config, tmp_path
):
    write_text("historian.csv", HEADER + "2025-03-01T06:00:00Z,FEED.SP,1,Good\n")
    write_text(
        "tag_dictionary.csv",
        "tag,role,unit,sample_period_s,range_low,range_high,"
        "description\nFEED.SP,input,kg/h,1,0,10,x\nNIR.CONC,measurement,%,5,0,40,x\n",
    )
    with pytest.raises(
        DataValidationError, match=r"tag_dictionary.csv row 2 tag NIR.CONC: unit '%'.*'%w/w'"
    ):
        prepare_dataset(tmp_path / "raw", tmp_path / "out", tags=small_tags, data=data_config)


def test_wrong_unit_in_a_long_unit_column_is_fatal_and_names_the_row(write_text, small_tags):
    path = write_text(
        "historian.csv",
        "timestamp,tag,value,unit\n"
        "2025-03-01T06:00:00Z,FEED.SP,1,kg/h\n2025-03-01T06:00:01Z,FEED.SP,1,kg/h\n"
        "2025-03-01T06:00:00Z,HOPPER.MASS,1,kg\n"
        "2025-03-01T06:00:00Z,PRESS.WEIGHT,250,g\n",
    )
    table = read_historian(path, timezone="UTC")
    with pytest.raises(
        DataValidationError, match=r"historian.csv row 4 tag PRESS.WEIGHT: unit 'g'.*'mg'"
    ):
        validate_module.check_units(table.unit_claims, TagDictionary.from_mapping(small_tags))


def test_wrong_unit_in_a_wide_header_is_fatal(write_text, small_tags):
    path = write_text(
        "historian.csv", "timestamp,FEED.SP [kg/h],HOPPER.MASS [lb]\n2025-03-01T06:00:00Z,1,2\n"
    )
    table = read_historian(path, timezone="UTC")
    with pytest.raises(
        DataValidationError, match=r"header column 3 tag HOPPER.MASS: unit 'lb'.*'kg'"
    ):
        validate_module.check_units(table.unit_claims, TagDictionary.from_mapping(small_tags))


def test_unparseable_timestamp_is_rejected_with_its_row_and_text(write_text, small_tags):
    rows = [f"2025-03-01T06:00:{s:02d}Z,FEED.SP,1,Good\n" for s in range(5)]
    rows[3] = "01/03/2025 6am,FEED.SP,1,Good\n"
    path = write_text("historian.csv", HEADER + "".join(rows))
    result = _validate(path, small_tags, max_bad_timestamp_fraction=0.5)
    assert _reasons(result) == {4: "unparseable_timestamp: '01/03/2025 6am' is not a timestamp"}
    assert result.rejects["timestamp"].tolist() == ["01/03/2025 6am"]


def test_too_many_unparseable_timestamps_make_the_file_untrusted(write_text, small_tags):
    path = write_text(
        "historian.csv", HEADER + "2025-03-01T06:00:00Z,FEED.SP,1,Good\nyesterday,FEED.SP,1,Good\n"
    )
    with pytest.raises(DataValidationError, match=r"historian.csv: 1 of 2 rows .* row 2"):
        _validate(path, small_tags)


def test_duplicate_timestamp_keeps_the_first_and_rejects_the_later_row(write_text, small_tags):
    path = write_text(
        "historian.csv",
        HEADER + "2025-03-01T06:00:00Z,FEED.SP,1,Good\n"
        "2025-03-01T06:00:00Z,HOPPER.MASS,1,Good\n"
        "2025-03-01T06:00:01Z,FEED.SP,1,Good\n"
        "2025-03-01T07:00:00+01:00,FEED.SP,2,Good\n",
    )
    result = _validate(path, small_tags)
    assert _reasons(result) == {
        4: "duplicate_timestamp: tag already has a sample at this time in historian.csv row 1"
    }
    assert result.rejects["tag"].tolist() == ["FEED.SP"]


def test_bad_quality_placeholder_does_not_make_the_good_sample_a_duplicate(write_text, small_tags):
    path = write_text(
        "historian.csv",
        HEADER + "2025-03-01T06:00:00Z,FEED.SP,,Bad\n2025-03-01T06:00:00Z,FEED.SP,1,Good\n",
    )
    result = _validate(path, small_tags)
    assert _reasons(result) == {1: "bad_quality: quality 'Bad'"}


def test_a_padded_quality_string_is_its_word(write_text, small_tags):
    path = write_text(
        "historian.csv",
        HEADER + "2025-03-01T06:00:00Z,FEED.SP,1,Good \n2025-03-01T06:00:05Z,FEED.SP,2, Good\n"
        "2025-03-01T06:00:10Z,FEED.SP,3,Bad \n2025-03-01T06:00:15Z,FEED.SP,4,   \n",
    )
    result = _validate(path, small_tags)
    # a quality of padding alone is an empty one, which is good (it was 'bad_quality')
    assert _reasons(result) == {3: "bad_quality: quality 'Bad '"}


def test_time_going_backwards_within_a_tag_is_rejected(write_text, small_tags):
    path = write_text(
        "historian.csv",
        HEADER + "2025-03-01T06:00:00Z,FEED.SP,1,Good\n"
        "2025-03-01T06:00:10Z,FEED.SP,1,Good\n"
        "2025-03-01T06:00:05Z,HOPPER.MASS,1,Good\n"
        "2025-03-01T06:00:05Z,FEED.SP,1,Good\n",
    )
    result = _validate(path, small_tags)
    assert _reasons(result) == {
        4: "time_backwards: earlier than 2025-03-01T06:00:10.000+00:00, already seen for this tag"
    }


def test_out_of_range_value_is_rejected_with_units_and_bounds(write_text, small_tags):
    path = write_text(
        "historian.csv",
        HEADER + "2025-03-01T06:00:00Z,FEED.SP,1,Good\n"
        "2025-03-01T06:00:01Z,FEED.SP,10,Good\n2025-03-01T06:00:02Z,FEED.SP,12.5,Good\n"
        "2025-03-01T06:00:03Z,FEED.SP,-0.1,Good\n",
    )
    result = _validate(path, small_tags)
    assert _reasons(result) == {
        3: "out_of_range: 12.5 kg/h outside [0.0, 10.0] kg/h",
        4: "out_of_range: -0.1 kg/h outside [0.0, 10.0] kg/h",
    }
    with pytest.raises(DataValidationError, match=r"row 3 tag FEED.SP: 12.5 kg/h outside"):
        _validate(path, small_tags, out_of_range="raise")


def test_quality_strings_non_numeric_and_missing_values_are_rejected(write_text, small_tags):
    path = write_text(
        "historian.csv",
        HEADER + "2025-03-01T06:00:00Z,FEED.SP,1,Good\n"
        "2025-03-01T06:00:01Z,FEED.SP,,Scan Timeout\n"
        "2025-03-01T06:00:02Z,FEED.SP,1;5,Good\n"
        "2025-03-01T06:00:03Z,FEED.SP,,Good\n"
        "2025-03-01T06:00:04Z,FEED.SP,3,\n",
    )
    result = _validate(path, small_tags)
    assert _reasons(result) == {
        2: "bad_quality: quality 'Scan Timeout'",
        3: "non_numeric_value: '1;5' is not a number",
        4: "missing_value: empty value with good quality",
    }
    assert result.counts["rows_valid"] == 2  # an empty quality counts as good


def test_rows_outside_every_run_are_rejected(write_text, small_tags):
    path = write_text(
        "historian.csv",
        HEADER + "2025-03-01T06:00:00Z,FEED.SP,1,Good\n2025-03-01T08:00:00Z,FEED.SP,1,Good\n",
    )
    runs = read_runs(
        write_text("runs.csv", "run_id,start,end\nR1,2025-03-01T06:00:00Z,2025-03-01T07:00:00Z\n"),
        timezone="UTC",
    )
    result = _validate(path, small_tags, runs=runs)
    assert _reasons(result) == {2: "outside_runs: in no run of runs.csv"}


def test_overlapping_runs_are_fatal(write_text):
    path = write_text(
        "runs.csv",
        "run_id,start,end\nR1,2025-03-01T06:00Z,2025-03-01T07:00Z\n"
        "R2,2025-03-01T06:30Z,2025-03-01T08:00Z\n",
    )
    with pytest.raises(DataValidationError, match=r"runs.csv rows 1 and 2: runs R1 and R2"):
        read_runs(path, timezone="UTC")


def test_counts_add_up_and_every_reason_is_counted(write_text, small_tags):
    path = write_text(
        "historian.csv",
        HEADER + "2025-03-01T06:00:00Z,FEED.SP,1,Good\n"
        "2025-03-01T06:00:00Z,FEED.SP,1,Good\n2025-03-01T06:00:01Z,FEED.SP,99,Good\n"
        "2025-03-01T06:00:02Z,NIR.CONC,,Bad\n2025-03-01T06:00:03Z,NIR.CONC,12,Good\n",
    )
    counts = _validate(path, small_tags).counts
    assert counts["rows_in"] == 5 == counts["rows_valid"] + counts["rows_rejected"]
    nonzero = {k: v for k, v in counts["rejected_by_reason"].items() if v}
    assert nonzero == {"duplicate_timestamp": 1, "out_of_range": 1, "bad_quality": 1}


def test_a_row_lost_between_validation_and_rejects_raises(write_text, small_tags, monkeypatch):
    path = write_text(
        "historian.csv",
        HEADER + "2025-03-01T06:00:00Z,FEED.SP,,Bad\n2025-03-01T06:00:01Z,FEED.SP,1,Good\n",
    )
    real = validate_module.build_rejects
    monkeypatch.setattr(validate_module, "build_rejects", lambda *args: real(*args).iloc[:0])
    with pytest.raises(RowAccountingError, match="rows do not add up"):
        _validate(path, small_tags)


def test_constant_tags_are_reported(write_text, small_tags):
    path = write_text(
        "historian.csv",
        HEADER
        + "".join(
            f"2025-03-01T06:00:0{s}Z,FEED.SP,2.5,Good\n2025-03-01T06:00:0{s}Z,HOPPER.MASS,{s},Good\n"
            for s in range(4)
        ),
    )
    result = _validate(path, small_tags)
    assert result.constant_tags == ["FEED.SP"]
    assert "tag FEED.SP: constant, all 4 valid samples equal 2.5" in result.warnings
    assert "tag NIR.CONC: no valid sample in the export" in result.warnings


def test_valid_frame_keeps_file_values_and_utc_times(write_text, small_tags):
    path = write_text("historian.csv", HEADER + "2025-03-01T07:00:00+01:00,NIR.CONC,12.25,Good\n")
    valid = _validate(path, small_tags).valid
    assert valid["timestamp"].tolist() == [pd.Timestamp("2025-03-01T06:00Z")]
    np.testing.assert_array_equal(valid["value"].to_numpy(), [12.25])


def test_dst_ambiguous_local_times_are_rejected_when_policy_is_reject(write_text, small_tags):
    path = write_text(
        "historian.csv",
        "timestamp,tag,value\n2025-10-26 01:30:00,FEED.SP,1\n2025-10-26 02:30:00,FEED.SP,2\n",
    )
    table = read_historian(path, timezone="Europe/Berlin", dst_policy="reject")
    result = validate([table], TagDictionary.from_mapping(small_tags))
    assert _reasons(result) == {
        2: "ambiguous_local_time: local time '2025-10-26 02:30:00' happens twice (DST ends)"
    }


def test_a_long_file_without_a_value_column_is_fatal(write_text):
    path = write_text("historian.csv", "timestamp,tag,val\n2025-03-01T06:00:00Z,FEED.SP,1\n")
    with pytest.raises(DataValidationError, match=r"historian.csv: a `tag` column but no"):
        read_historian(path, timezone="UTC")


def test_an_export_whose_every_row_is_bad_writes_every_row_to_rejects(write_text, small_tags):
    path = write_text(
        "historian.csv",
        HEADER + "2025-03-01T06:00:00Z,FEED.SP,,Bad\n2025-03-01T06:00:00Z,NIR.CONC,,Bad\n",
    )
    result = _validate(path, small_tags)
    assert result.counts["rows_in"] == 2 == result.counts["rows_rejected"]
    assert set(_reasons(result)) == {1, 2}


def test_without_runs_csv_the_run_and_its_grid_start_at_the_first_valid_sample(
    write_text, small_tags, tmp_path
):
    # Samples at :01 and :06 with dt 5 s: the grid is :01, :06, not multiples of 5 s since 1970.
    write_text(
        "historian.csv",
        HEADER + "2025-03-01T06:00:01Z,FEED.SP,1,Good\n2025-03-01T06:00:06Z,FEED.SP,2,Good\n",
    )
    data = {"dt_s": 5.0, "max_gap_s": 60.0, "timezone": "UTC"}
    manifest = prepare_dataset(tmp_path / "raw", tmp_path / "out", tags=small_tags, data=data)
    (run,) = manifest["runs"].values()
    assert run["start"] == "2025-03-01T06:00:01.000+00:00"
    grid = pd.read_parquet(tmp_path / "out" / run["file"])
    assert grid["FEED.SP"].tolist()[:2] == [1.0, 2.0]


def test_null_typed_parquet_columns_are_empty_cells_not_errors(tmp_path, small_tags):
    # pandas writes a column of None only as Parquet's null type.
    long = pd.DataFrame({"timestamp": ["2025-03-01T06:00:00Z"], "tag": ["FEED.SP"], "value": [1.0]})
    long["quality"] = None
    pq.write_table(pa.Table.from_pandas(long, preserve_index=False), tmp_path / "long.parquet")
    table = read_historian(tmp_path / "long.parquet", timezone="UTC")
    assert table.frame["quality"].isna().all()
    result = validate([table], TagDictionary.from_mapping(small_tags))
    assert result.counts["rows_valid"] == 1  # no quality is good quality

    wide = pa.table(
        {
            "timestamp": ["2025-03-01T06:00:00Z", "2025-03-01T06:00:01Z"],
            "FEED.SP": [1.0, 2.0],
            "NIR.CONC": pa.nulls(2),
        }
    )
    pq.write_table(wide, tmp_path / "wide.parquet")
    table = read_historian(tmp_path / "wide.parquet", timezone="UTC")
    assert table.frame["tag"].astype(str).tolist() == ["FEED.SP", "FEED.SP"]
    assert table.empty_cells == 2


def test_a_tag_category_no_row_holds_is_not_an_unknown_tag(tmp_path, small_tags):
    frame = pd.DataFrame(
        {
            "timestamp": ["2025-03-01T06:00:00Z"],
            "tag": pd.Categorical(["FEED.SP"], categories=["FEED.SP", "OLD.TAG"]),
            "value": [1.0],
        }
    )
    frame.to_parquet(tmp_path / "historian.parquet", index=False)
    assert _validate(tmp_path / "historian.parquet", small_tags).counts["rows_valid"] == 1


def test_a_trailing_comma_on_every_wide_line_is_not_a_tag(write_text, small_tags):
    path = write_text(
        "historian.csv", "timestamp,FEED.SP,\n2025-03-01T06:00:00Z,1,\n2025-03-01T06:00:01Z,2,\n"
    )
    result = _validate(path, small_tags)
    assert result.counts["rows_valid"] == 2


def test_an_unknown_tag_is_still_named_with_the_row_that_holds_it(write_text, small_tags):
    path = write_text(
        "historian.csv",
        HEADER + "2025-03-01T06:00:00Z,FEED.SP,1,Good\n2025-03-01T06:00:01Z,FEED.SPX,1,Good\n",
    )
    with pytest.raises(DataValidationError, match=r"historian.csv row 2 tag 'FEED.SPX'"):
        _validate(path, small_tags)


def test_a_long_header_with_spaces_after_the_commas_is_read_as_long(write_text, small_tags):
    path = write_text(
        "historian.csv",
        "timestamp, tag, value, quality\n2025-03-01T06:00:00Z,FEED.SP,1,Bad\n",
    )
    table = read_historian(path, timezone="UTC")
    assert table.layout == "long"
    assert _reasons(validate([table], TagDictionary.from_mapping(small_tags))) == {
        1: "bad_quality: quality 'Bad'"
    }


def test_the_text_nan_is_a_non_numeric_value_however_the_column_parses(write_text, small_tags):
    # Alone, arrow casts "nan" to NaN; beside "x" it would not: one reason for both.
    for other in ("1", "x"):
        path = write_text(
            "historian.csv",
            HEADER
            + f"2025-03-01T06:00:00Z,FEED.SP,nan,Good\n2025-03-01T06:00:01Z,FEED.SP,{other},Good\n",
        )
        assert (
            _reasons(_validate(path, small_tags))[1] == "non_numeric_value: 'nan' is not a number"
        )


def test_a_unit_claim_names_the_header_column_it_is_in(write_text, small_tags):
    path = write_text("historian.csv", "FEED.SP [g/h],timestamp\n1,2025-03-01T06:00:00Z\n")
    table = read_historian(path, timezone="UTC")
    assert [(c.where, c.tag, c.unit) for c in table.unit_claims] == [
        ("header column 1", "FEED.SP", "g/h")
    ]


def test_a_date_without_a_time_is_a_local_date_not_an_offset():
    berlin = {"file": "f", "timezone": "Europe/Berlin"}
    alone = parse_timestamps(pa.array(["2025-03-01"]), **berlin)
    beside_a_bad_cell = parse_timestamps(pa.array(["2025-03-01", "bad"]), **berlin)
    midnight_in_berlin = pd.Timestamp("2025-02-28T23:00Z").value
    assert alone.ns[0] == beside_a_bad_cell.ns[0] == midnight_in_berlin
    with_offset = parse_timestamps(pa.array(["2025-03-01T06:00:00-05"]), **berlin)
    assert with_offset.ns[0] == pd.Timestamp("2025-03-01T11:00Z").value


def test_good_quality_given_as_one_string_is_that_string_not_its_letters():
    assert DataConfig.from_mapping({"good_quality": "Good"}).good_quality == ("Good",)
    assert DataConfig.from_mapping({"good_quality": ["Good", "OK"]}).good_quality == (
        "Good",
        "OK",
    )
    with pytest.raises(ValueError, match="data.good_quality must be a list"):
        DataConfig.from_mapping({"good_quality": 1})


def test_a_runs_csv_with_a_header_only_is_refused_by_name(write_text):
    path = write_text("runs.csv", "run_id,start,end\n")
    with pytest.raises(DataValidationError, match=r"runs.csv: no runs, the file has a header"):
        read_runs(path, timezone="UTC")


def test_a_run_boundary_in_the_dst_gap_asks_for_an_offset(write_text):
    path = write_text("runs.csv", "run_id,start,end\nA,2025-03-30T02:30:00,2025-03-30T05:00:00\n")
    with pytest.raises(
        DataValidationError,
        match=r"runs.csv row 1 run A: start '2025-03-30T02:30:00' does not exist in "
        r"Europe/Berlin .* give it with a UTC offset",
    ):
        read_runs(path, timezone="Europe/Berlin")


def test_a_unit_in_other_code_points_of_the_same_characters_is_that_unit(write_text, small_tags):
    # the micro sign (U+00B5) against Greek mu (U+03BC): refused with two strings alike
    tags = {**small_tags, "COND": {**small_tags["FEED.SP"], "unit": "\u00b5S/cm"}}
    path = write_text("historian.csv", "timestamp,COND [\u03bcS/cm]\n2025-03-01T06:00:00Z,1\n")
    table = read_historian(path, timezone="UTC")
    validate_module.check_units(table.unit_claims, TagDictionary.from_mapping(tags))
    other = write_text("other.csv", "timestamp,COND [mS/cm]\n2025-03-01T06:00:00Z,1\n")
    with pytest.raises(DataValidationError, match=r"tag COND: unit 'mS/cm'"):
        validate_module.check_units(read_historian(other, timezone="UTC").unit_claims,
                                    TagDictionary.from_mapping(tags))  # fmt: skip


def test_a_file_exported_newest_first_is_refused_saying_so(write_text, small_tags):
    # every sample but each tag's first went to rejects.csv as time_backwards (6 -> 2 valid)
    rows = [f"2025-03-01T06:00:{s:02d}Z,{tag},1,Good\n" for s in (15, 10, 5)
            for tag in ("FEED.SP", "HOPPER.MASS")]  # fmt: skip
    path = write_text("historian.csv", HEADER + "".join(rows))
    with pytest.raises(DataValidationError, match=r"historian.csv: 4 of 6 samples are earlier "
                       r"than one before them .*first at row 3.*export it oldest first"):
        _validate(path, small_tags)
