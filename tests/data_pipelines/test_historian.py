"""read_historian: long and wide, CSV and Parquet, time zones, file-level faults."""

import datetime
import decimal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines import DataValidationError, read_historian

UTC = {"timezone": "UTC"}


def _samples(table) -> pd.DataFrame:
    """The part of a long frame that must survive any layout: sorted, plain dtypes."""
    f = table.frame
    out = pd.DataFrame(
        {
            "timestamp": f["timestamp"],
            "tag": f["tag"].astype(str),
            "value": f["value"],
            "quality": f["quality"].astype(object),
        }
    )
    return out.sort_values(["timestamp", "tag"]).reset_index(drop=True)


def _to_wide(frame: pd.DataFrame) -> pd.DataFrame:
    wide = frame.pivot(index="timestamp", columns="tag", values="value")
    return wide.reset_index().rename_axis(columns=None)


def test_a_wide_header_that_is_a_dictionary_tag_with_brackets_is_that_tag(write_text):
    # PI writes attributes as `FIC101[PV]`: read as `TAG [unit]` it claimed the unit "PV"
    path = write_text(
        "historian.csv",
        "timestamp,FIC101[PV],FEED.SP [kg/h],TI 7 [degC]\n2025-03-01 06:00:00,1.5,2.0,40.1\n",
    )
    table = read_historian(path, tag_names=["FIC101[PV]", "FEED.SP", "TI 7 [degC]"], **UTC)
    assert table.frame["tag"].astype(str).tolist() == ["FIC101[PV]", "FEED.SP", "TI 7 [degC]"]
    assert [(c.tag, c.unit) for c in table.unit_claims] == [("FEED.SP", "kg/h")]
    # without the dictionary's names the brackets are units, as before
    claims = read_historian(path, **UTC).unit_claims
    assert [(c.tag, c.unit) for c in claims] == [("FIC101", "PV"), ("FEED.SP", "kg/h"),
                                                 ("TI 7", "degC")]  # fmt: skip


def test_long_csv_rows_are_numbered_from_one_after_the_header(write_text):
    path = write_text(
        "historian.csv",
        "timestamp,tag,value,quality\n"
        "2025-03-01T06:00:00.000+00:00,FEED.SP,2.0,Good\n"
        "2025-03-01T06:00:01.000+00:00,FEED.SP,,Bad\n",
    )
    table = read_historian(path, **UTC)
    assert table.layout == "long"
    assert table.frame["row"].tolist() == [1, 2]
    assert table.frame["value"].iloc[0] == 2.0 and np.isnan(table.frame["value"].iloc[1])
    assert table.frame["quality"].astype(str).tolist() == ["Good", "Bad"]
    assert str(table.frame["timestamp"].dtype) == "datetime64[ns, UTC]"


def test_wide_csv_with_unnamed_first_column_reads_quality_strings_and_unit_headers(write_text):
    path = write_text(
        "historian.csv",
        ",FEED.SP [kg/h],NIR.CONC\n2025-03-01 06:00:00,2.0,Bad\n2025-03-01 06:00:05,,10.5\n",
    )
    table = read_historian(path, **UTC)
    f = table.frame
    assert table.layout == "wide"
    assert f["tag"].astype(str).tolist() == ["FEED.SP", "NIR.CONC", "NIR.CONC"]
    assert f["row"].tolist() == [1, 1, 2]
    assert f["quality"].astype(object).tolist()[1] == "Bad"
    assert np.isnan(f["value"].iloc[1]) and f["value"].iloc[2] == 10.5
    assert table.empty_cells == 1
    assert [(c.tag, c.unit, c.where) for c in table.unit_claims] == [
        ("FEED.SP", "kg/h", "header column 2")
    ]


def test_long_to_wide_round_trip_gives_the_same_frame(tmp_path, exports, np_rng):
    runs = exports.six_runs()[:1]
    frame = exports.long_export(runs, np_rng)
    long_path = exports.write_long_csv(frame, tmp_path / "long.csv")
    wide = _to_wide(frame)
    wide["timestamp"] = exports.iso(wide["timestamp"]).to_numpy()
    wide_path = tmp_path / "wide.csv"
    wide.to_csv(wide_path, index=False)
    from_long, from_wide = read_historian(long_path, **UTC), read_historian(wide_path, **UTC)
    # wide has no quality column: compare what both layouts carry
    pd.testing.assert_frame_equal(
        _samples(from_long).drop(columns="quality"), _samples(from_wide).drop(columns="quality")
    )
    assert from_wide.empty_cells == wide.shape[0] * (wide.shape[1] - 1) - len(frame)


def test_wide_to_long_round_trip_gives_the_same_frame(tmp_path, exports):
    wide = pd.DataFrame(
        {
            "timestamp": ["2025-03-01T06:00:00+00:00", "2025-03-01T06:00:05+00:00"],
            "FEED.SP": [2.0, 2.5],
            "NIR.CONC": ["Bad", "11.0"],
        }
    )
    wide.to_csv(tmp_path / "wide.csv", index=False)
    from_wide = read_historian(tmp_path / "wide.csv", **UTC)
    long = _samples(from_wide)
    long["value"] = long["value"].astype(object).where(long["quality"].isna(), "")
    long["timestamp"] = exports.iso(long["timestamp"]).to_numpy()
    long.to_csv(tmp_path / "long.csv", index=False)
    back = read_historian(tmp_path / "long.csv", **UTC)
    pd.testing.assert_frame_equal(_samples(from_wide), _samples(back))


def test_csv_and_parquet_give_the_same_long_frame(tmp_path, exports, np_rng):
    frame = exports.long_export(exports.six_runs()[:1], np_rng)
    csv = read_historian(exports.write_long_csv(frame, tmp_path / "h.csv"), **UTC)
    frame.to_parquet(tmp_path / "h.parquet", index=False)
    parquet = read_historian(tmp_path / "h.parquet", **UTC)
    pd.testing.assert_frame_equal(_samples(csv), _samples(parquet))


def test_offset_timestamps_are_converted_to_utc(write_text):
    path = write_text(
        "historian.csv",
        "timestamp,tag,value\n"
        "2025-03-01T07:00:00+01:00,FEED.SP,1\n"
        "2025-03-01T06:00:00Z,FEED.SP,2\n",
    )
    ts = read_historian(path, **UTC).frame["timestamp"]
    assert (ts == pd.Timestamp("2025-03-01T06:00:00Z")).all()


def test_naive_timestamps_are_local_times_of_the_configured_zone(write_text):
    path = write_text(
        "historian.csv",
        "timestamp,tag,value\n2025-01-15 07:00:00,FEED.SP,1\n2025-07-15 08:00:00,FEED.SP,2\n",
    )
    ts = read_historian(path, timezone="Europe/Berlin").frame["timestamp"]
    assert ts.tolist() == [pd.Timestamp("2025-01-15T06:00Z"), pd.Timestamp("2025-07-15T06:00Z")]


def test_ambiguous_local_time_raises_naming_file_and_row(write_text):
    path = write_text(
        "historian.csv",
        "timestamp,tag,value\n2025-10-26 01:30:00,FEED.SP,1\n2025-10-26 02:30:00,FEED.SP,2\n",
    )
    with pytest.raises(DataValidationError, match=r"historian.csv row 2: .*ambiguous"):
        read_historian(path, timezone="Europe/Berlin")


def test_nonexistent_local_time_is_flagged_when_policy_is_reject(write_text):
    path = write_text(
        "historian.csv",
        "timestamp,tag,value\n2025-03-30 02:30:00,FEED.SP,1\n2025-03-30 03:30:00,FEED.SP,2\n",
    )
    with pytest.raises(DataValidationError, match=r"row 1: .*does not exist"):
        read_historian(path, timezone="Europe/Berlin")
    f = read_historian(path, timezone="Europe/Berlin", dst_policy="reject").frame
    assert f["timestamp_error"].astype(object).tolist()[0] == "nonexistent_local_time"
    assert f["timestamp"].iloc[1] == pd.Timestamp("2025-03-30T01:30Z")


def test_parquet_timestamp_types_aware_and_naive_are_both_handled(tmp_path):
    instants = pd.to_datetime(["2025-01-15T06:00:00Z", "2025-01-15T06:00:01Z"])
    utc_values = instants.tz_convert(None).to_numpy()
    local_values = instants.tz_convert("Europe/Berlin").tz_localize(None).to_numpy()
    for name, column in (
        ("aware", pa.array(utc_values, pa.timestamp("ns", tz="UTC"))),
        ("naive", pa.array(local_values, pa.timestamp("ns"))),
    ):
        table = pa.table({"timestamp": column, "tag": ["FEED.SP"] * 2, "value": [1.0, 2.0]})
        pq.write_table(table, tmp_path / f"{name}.parquet")
        read = read_historian(tmp_path / f"{name}.parquet", timezone="Europe/Berlin")
        assert read.frame["timestamp"].tolist() == list(instants), name


def test_missing_timestamp_column_is_fatal(write_text):
    path = write_text("historian.csv", "when,tag,value\n2025-03-01,FEED.SP,1\n")
    with pytest.raises(DataValidationError, match=r"historian.csv: no timestamp column"):
        read_historian(path, **UTC)


def test_unreadable_file_is_fatal_and_names_the_file(write_text):
    path = write_text("historian.parquet", "this is not parquet")
    with pytest.raises(DataValidationError, match=r"historian.parquet: cannot read"):
        read_historian(path, **UTC)


def test_one_bad_timestamp_does_not_change_how_the_others_are_read(write_text):
    # All-good text is parsed by one arrow cast; one bad string sends the file through the
    # per-string path. Both must give the same instants.
    good = [
        "2025-03-01T07:00:00.123+01:00",
        "2025-03-01T06:00:00Z",
        "2025-03-01 06:00:00.5+00:00",
        "2025-03-01T01:00:00.000000001-05:00",
    ]
    rows = "".join(f"{t},FEED.SP,{i}\n" for i, t in enumerate(good))
    clean = read_historian(write_text("a.csv", "timestamp,tag,value\n" + rows), **UTC)
    mixed = read_historian(
        write_text("b.csv", "timestamp,tag,value\n" + rows + "not a time,FEED.SP,9\n"), **UTC
    )
    assert mixed.frame["timestamp"].iloc[:4].tolist() == clean.frame["timestamp"].tolist()
    assert mixed.frame["timestamp_error"].astype(object).tolist()[4] == "unparseable_timestamp"
    assert clean.frame["timestamp"].iloc[3].value == pd.Timestamp("2025-03-01T06:00Z").value + 1


def test_an_offset_after_a_space_is_an_offset_not_a_local_time(write_text):
    # " +01:00", " Z" and a format's "%z" took the naive path: pandas applied the offset,
    # then the instant was localised in the configured zone again, 1 h off, silently
    berlin = {"timezone": "Europe/Berlin"}
    spaced = ["2025-03-01T06:00:00 +01:00", "2025-03-01T05:00:00 Z", "2025-03-01 06:00:00 +0100"]
    rows = "".join(f"{t},FEED.SP,{i}\n" for i, t in enumerate(spaced))
    ts = read_historian(write_text("a.csv", "timestamp,tag,value\n" + rows), **berlin)
    assert (ts.frame["timestamp"] == pd.Timestamp("2025-03-01T05:00:00Z")).all()
    custom = write_text("b.csv", "timestamp,tag,value\n01.03.2025 06:00:00 +0100,FEED.SP,1\n")
    read = read_historian(custom, timestamp_format="%d.%m.%Y %H:%M:%S %z", **berlin)
    assert read.frame["timestamp"].tolist() == [pd.Timestamp("2025-03-01T05:00:00Z")]
    # a zone name the pattern cannot see as an offset is refused, not localised again
    named = write_text("c.csv", "timestamp,tag,value\n01.03.2025 06:00:00 CET,FEED.SP,1\n")
    with pytest.raises(DataValidationError, match=r"c.csv: timestamps such as '01.03.2025 "
                                                   r"06:00:00 CET' carry a UTC offset"):
        read_historian(named, timestamp_format="%d.%m.%Y %H:%M:%S %Z", **berlin)


def test_a_time_nanoseconds_cannot_hold_is_unparseable_not_a_crash(write_text, tmp_path):
    # "9999-12-31" (an end-of-time marker) raised OutOfBoundsDatetime out of prepare, and a
    # Parquet "0001-01-01" ArrowInvalid, naming no file or row
    text = write_text("a.csv", "timestamp,tag,value\n2025-03-01T06:00:00Z,FEED.SP,1\n"
                               "9999-12-31T00:00:00Z,FEED.SP,2\n0001-01-01 00:00:00,FEED.SP,3\n")
    frame = read_historian(text, timezone="Europe/Berlin").frame
    assert frame["timestamp_error"].astype(object).tolist()[1:] == ["unparseable_timestamp"] * 2
    assert frame["timestamp_text"].astype(object).tolist()[1:] == [
        "9999-12-31T00:00:00Z", "0001-01-01 00:00:00"]  # fmt: skip
    first = datetime.datetime(2025, 3, 1, 6)
    for name, column in (
        ("us", pa.array([first, datetime.datetime(1, 1, 1), None], pa.timestamp("us"))),
        ("date", pa.array([first.date(), datetime.date(9999, 12, 31), None], pa.date32())),
    ):
        table = pa.table({"timestamp": column, "tag": ["FEED.SP"] * 3, "value": [1.0, 2.0, 3.0]})
        pq.write_table(table, tmp_path / f"{name}.parquet")
        read = read_historian(tmp_path / f"{name}.parquet", **UTC).frame
        assert read["timestamp_error"].astype(object).tolist()[1:] == [
            "unparseable_timestamp"] * 2, name  # fmt: skip
        assert read["timestamp_text"].astype(object).tolist()[1][:10] in ("0001-01-01",
                                                                          "9999-12-31"), name


def test_rows_after_a_blank_line_keep_their_line_numbers(write_text):
    # arrow skipped the blank line, so rejects.csv named the line above each later row
    path = write_text("historian.csv", "timestamp,tag,value\n2025-03-01T06:00:00Z,FEED.SP,1\n"
                                       "\n,,\n2025-03-01T06:00:01Z,FEED.SP,2\n")  # fmt: skip
    frame = read_historian(path, **UTC).frame
    assert frame["row"].tolist() == [1, 4]  # line = row + 1
    assert frame["value"].tolist() == [1.0, 2.0]


def test_a_comma_ending_every_line_is_no_column(write_text, tmp_path):
    # beside an unnamed timestamp column it gave "duplicate column names ['']"
    path = write_text("historian.csv", ",FEED.SP,LC.M,\n2025-03-01T06:00:00Z,1,5,\n")
    frame = read_historian(path, **UTC).frame
    assert frame["tag"].astype(str).tolist() == ["FEED.SP", "LC.M"]
    value = pa.array([decimal.Decimal("1.25")], pa.decimal128(9, 2))
    table = pa.table({"timestamp": ["2025-03-01T06:00:00Z"], "tag": ["FEED.SP"], "value": value})
    pq.write_table(table, tmp_path / "decimal.parquet")  # was "neither number nor text"
    assert read_historian(tmp_path / "decimal.parquet", **UTC).frame["value"].tolist() == [1.25]


def test_a_long_column_neither_read_nor_ignored_is_refused_and_a_named_quality_is_read(
    write_text,
):
    # IP.21's STATUS, AVEVA's OPCQuality: under any name but `quality` a quality column was
    # left unread, and every sample it marked Bad taken as good
    path = write_text("historian.csv", "timestamp,tag,value,status\n"
                                       "2025-03-01T06:00:00Z,FEED.SP,1.5,Bad\n"
                                       "2025-03-01T06:00:05Z,FEED.SP,1.6,Good\n")  # fmt: skip
    with pytest.raises(DataValidationError, match=r"historian.csv: columns \['status'\] are not "
                       r"read in the long layout .*data.quality_column=<name>.*ignore_columns"):
        read_historian(path, **UTC)
    named = read_historian(path, quality_column="Status", **UTC).frame
    assert named["quality"].astype(object).tolist() == ["Bad", "Good"]
    ignored = read_historian(path, ignore_columns=["status"], **UTC).frame
    assert ignored["quality"].isna().all() and ignored["value"].tolist() == [1.5, 1.6]
    with pytest.raises(DataValidationError, match=r"no quality column 'OPCQuality'"):
        read_historian(path, quality_column="OPCQuality", **UTC)


def test_a_dst_refusal_names_the_row_counted_across_blank_lines(write_text):
    # the row after two blank lines was named two rows too early (the ",,," line)
    path = write_text("historian.csv", "timestamp,tag,value\n2025-10-26 01:59:56,FEED.SP,1\n"
                                       "\n\n,,\n2025-10-26 02:00:00,FEED.SP,2\n")  # fmt: skip
    with pytest.raises(DataValidationError, match=r"historian.csv row 5: local time "
                                                  r"'2025-10-26 02:00:00' is ambiguous"):
        read_historian(path, timezone="Europe/Berlin")


def test_an_instant_before_1980_is_a_placeholder_not_a_sample(write_text, tmp_path):
    # a Unix epoch 0 in the file made a one-row run in 1970 whose input value was held
    # into the real run, 55 years later, and moved the tag's normalisation mean
    path = write_text("historian.csv", "timestamp,tag,value\n1970-01-01T00:00:00Z,FEED.SP,9\n"
                                       "1899-12-30 00:00:00,FEED.SP,8\n"
                                       "1980-01-01T00:00:00Z,FEED.SP,2\n"
                                       "2025-03-01T06:00:00Z,FEED.SP,1\n")  # fmt: skip
    frame = read_historian(path, **UTC).frame
    assert frame["timestamp_error"].astype(object).tolist()[:2] == ["unparseable_timestamp"] * 2
    assert frame["timestamp_text"].astype(object).tolist()[:2] == [
        "1970-01-01T00:00:00.000+00:00 (before 1980: a placeholder)",
        "1899-12-30T00:00:00.000+00:00 (before 1980: a placeholder)"]  # fmt: skip
    assert frame["timestamp_error"].isna().tolist()[2:] == [True, True]
    table = pa.table({"timestamp": pa.array([0, 1740808800], pa.timestamp("s", tz="UTC")),
                      "tag": ["FEED.SP"] * 2, "value": [9.0, 1.0]})  # fmt: skip
    pq.write_table(table, tmp_path / "epoch.parquet")
    read = read_historian(tmp_path / "epoch.parquet", **UTC).frame
    assert read["timestamp_error"].astype(object).tolist() == ["unparseable_timestamp", np.nan]


def test_a_cell_of_spaces_is_an_empty_cell(write_text):
    # a padded export's blank quality was a bad one ("    "), its blank wide cell a text value
    long = write_text("historian.csv", "timestamp,tag,value,quality\n"
                                       "2025-03-01T06:00:00Z,FEED.SP,1.5,    \n"
                                       "2025-03-01T06:00:05Z,FEED.SP,   ,Good\n")  # fmt: skip
    frame = read_historian(long, **UTC).frame
    assert frame["value_text"].isna().all() and np.isnan(frame["value"].iloc[1])
    wide = write_text("wide.csv", "timestamp,FEED.SP,TI\n2025-03-01T06:00:00Z, ,40.1\n")
    table = read_historian(wide, **UTC)
    assert table.frame["tag"].astype(str).tolist() == ["TI"] and table.empty_cells == 1


@pytest.mark.parametrize(("content", "hint"), [
    ("timestamp,tag,value\n".encode("utf-16"), "the file is UTF-16, Excel's 'Unicode text'"),
    ("timestamp,tag,value [µS]\n2025-03-01T06:00:00Z,FEED.SP,1\n".encode("cp1252"),
     "the file is not UTF-8"),
    (b"timestamp,tag,value\n" + b"2025-03-01T06:00:00Z,FEED.SP,1\n" * 1500
     + "2025-03-01T06:00:00Z,Gest\u00f6rt,1\n".encode("cp1252"), "row 1501 is not UTF-8"),
    # within the header's first 8 KB read, Python's decoder fails, not arrow's
    (b"timestamp,tag,value\n2025-03-01T06:00:00Z,FEED.SP,1\n"
     + "2025-03-01T06:00:00Z,Gest\u00f6rt,1\n".encode("cp1252"), "row 2 is not UTF-8"),
], ids=["utf-16", "cp1252-header", "cp1252-row", "cp1252-early-row"])  # fmt: skip
def test_a_csv_in_another_encoding_is_named_as_such(tmp_path, content, hint):
    # the refusal named a byte or a column count, not what to do
    path = tmp_path / "historian.csv"
    path.write_bytes(content)
    with pytest.raises(DataValidationError, match=rf"cannot read the file: .*\({hint}.*"
                                                  r"save it as comma-separated CSV UTF-8"):
        read_historian(path, **UTC)


def test_a_tagname_column_and_a_pandas_index_are_the_long_layout(write_text, tmp_path):
    # AVEVA's `DateTime,TagName,Value,Quality` was read as a wide file with a tag "TagName";
    # a frame with an unnamed DatetimeIndex, written by pandas, had "no timestamp column"
    path = write_text("historian.csv", "DateTime,TagName,Value,Quality\n"
                                       "2025-03-01 06:00:00,FEED.SP,1.5,Good\n")  # fmt: skip
    frame = read_historian(path, **UTC).frame
    assert frame["tag"].astype(str).tolist() == ["FEED.SP"] and frame["value"].tolist() == [1.5]
    indexed = pd.DataFrame({"tag": ["FEED.SP"], "value": [2.0]},
                           index=pd.DatetimeIndex(["2025-03-01 06:00:00"], tz="UTC"))
    indexed.to_parquet(tmp_path / "historian.parquet")
    read = read_historian(tmp_path / "historian.parquet", **UTC).frame
    assert read["timestamp"].tolist() == [pd.Timestamp("2025-03-01 06:00:00", tz="UTC")]


def test_a_row_index_pandas_wrote_is_not_a_column_to_refuse(tmp_path):
    # to_csv's default index=True and a concatenated frame's to_parquet add an index column
    frame = pd.DataFrame({"timestamp": ["2025-03-01T06:00:00Z", "2025-03-01T06:00:05Z"],
                          "tag": ["FEED.SP"] * 2, "value": [1.0, 2.0], "quality": ["Good"] * 2})
    frame.to_csv(tmp_path / "historian.csv")  # header ",timestamp,tag,value,quality"
    assert read_historian(tmp_path / "historian.csv", **UTC).frame["value"].tolist() == [1, 2]
    pd.concat([frame, frame.iloc[:1]]).iloc[:2].to_parquet(tmp_path / "historian.parquet")
    read = read_historian(tmp_path / "historian.parquet", **UTC).frame
    assert read["value"].tolist() == [1.0, 2.0]
    frame.set_index("timestamp").pivot(columns="tag", values="value").reset_index().to_csv(
        tmp_path / "wide.csv")  # a wide file with its index too
    assert read_historian(tmp_path / "wide.csv", **UTC).frame["tag"].astype(str).tolist() == [
        "FEED.SP", "FEED.SP"]  # fmt: skip


def test_a_utf8_character_cut_by_the_first_read_is_no_encoding_problem(tmp_path):
    # the hint decoded the first 4096 bytes whole: a "µ" across byte 4096 made it "not UTF-8"
    header = "timestamp,tag,value,quality\n"
    pad = "2025-03-01T06:00:00Z,FEED.SP,1,Good\n"
    text = header + pad * ((4095 - len(header)) // len(pad))
    text += "x" * (4095 - len(text.encode())) + "\u00b5\n" + "a,b,c,d,e\n"
    path = tmp_path / "historian.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"cannot read the file") as refused:
        read_historian(path, **UTC)
    assert "UTF-8" not in str(refused.value)
    # a wide header over 4 KB (240 tags in degC) with the cut inside it: the first "°"
    # (2 bytes) at bytes 4095-4096
    header = "timestamp,A" + "x" * 4082 + " [\u00b0C]," + ",".join(
        f"T{i:03d} [\u00b0C]" for i in range(40)) + "\n"  # fmt: skip
    assert header.encode().index("\u00b0".encode()) == 4095
    path.write_text(header + "2025-03-01T06:00:00Z,1\n" + "a," * 500 + "\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"cannot read the file") as refused:
        read_historian(path, **UTC)
    assert "UTF-8" not in str(refused.value)
