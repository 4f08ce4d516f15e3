"""Plant files at the edges: all rows bad, null Parquet columns, padded headers, stray
categories, a lone quality string, an empty runs.csv. Each once crashed or misread."""

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines import (
    DataConfig,
    DataValidationError,
    TagDictionary,
    prepare_dataset,
    read_historian,
    read_runs,
    validate,
)
from data_pipelines.timestamps import parse_timestamps

HEADER = "timestamp,tag,value,quality\n"


def _validate(path, tags, **kwargs):
    table = read_historian(path, timezone="UTC")
    return validate([table], TagDictionary.from_mapping(tags), **kwargs)


def _reasons(result) -> dict[int, str]:
    return dict(zip(result.rejects["row"], result.rejects["reason"], strict=True))


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
