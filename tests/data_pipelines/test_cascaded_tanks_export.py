"""The Cascaded Tanks CSV as a historian export, and the run table's `split` column."""

from pathlib import Path

import pandas as pd
import pytest

from data_pipelines.cascaded_tanks import write_export
from data_pipelines.errors import DataValidationError
from data_pipelines.runs import read_runs

HEAD_CSV = Path(__file__).resolve().parents[1] / "data" / "cascaded_tanks_head.csv"


def test_export_holds_both_records_as_tags_with_their_splits(tmp_path):
    paths = write_export(HEAD_CSV, tmp_path)
    historian = pd.read_csv(paths["historian"])
    source = pd.read_csv(HEAD_CSV)
    assert list(historian.columns) == ["timestamp", "PUMP.VOLTAGE [V]", "TANK2.LEVEL [V]"]
    assert len(historian) == 2 * len(source)
    assert historian["TANK2.LEVEL [V]"].tolist() == [*source["yEst"], *source["yVal"]]
    assert historian["timestamp"][1] == "2016-01-01T00:00:04.000+00:00"  # Ts = 4 s
    runs = read_runs(paths["runs"], timezone="UTC")
    assert runs["run_id"].tolist() == ["estimation", "validation"]
    assert runs["split"].tolist() == ["train", "test"]


def test_publisher_copy_with_quoted_header_and_trailing_commas_reads_the_same(tmp_path):
    lines = HEAD_CSV.read_text().splitlines()
    header = ",".join(f'"{name}"' for name in lines[0].split(",")) + ","
    (tmp_path / "publisher.csv").write_text(
        "\n".join([header, *(f"{line}," for line in lines[1:])])
    )
    plain = write_export(HEAD_CSV, tmp_path / "plain")["historian"].read_text()
    quoted = write_export(tmp_path / "publisher.csv", tmp_path / "quoted")["historian"]
    assert quoted.read_text() == plain


def test_non_numeric_value_names_the_row_and_column(tmp_path):
    lines = HEAD_CSV.read_text().splitlines()
    fields = lines[3].split(",")
    fields[2] = "n/a"  # yEst of data row 3
    lines[3] = ",".join(fields)
    (tmp_path / "bad.csv").write_text("\n".join(lines))
    with pytest.raises(DataValidationError, match=r"bad.csv row 3 column yEst: 'n/a'"):
        write_export(tmp_path / "bad.csv", tmp_path / "out")


def test_runs_csv_split_outside_the_known_ones_names_the_row(tmp_path):
    (tmp_path / "runs.csv").write_text(
        "run_id,start,end,split\n"
        "a,2025-01-01T00:00:00Z,2025-01-01T01:00:00Z,train\n"
        "b,2025-01-01T02:00:00Z,2025-01-01T03:00:00Z,holdout\n"
    )
    with pytest.raises(DataValidationError, match=r"runs.csv row 2: split 'holdout' is not one"):
        read_runs(tmp_path / "runs.csv", timezone="UTC")


def test_a_start_with_another_offset_is_written_in_utc_in_both_files(tmp_path):
    paths = write_export(HEAD_CSV, tmp_path, start="2016-01-01T02:00:00+02:00")
    historian = pd.read_csv(paths["historian"])
    # was 02:00:00.000+00:00 in the historian beside 02:00:00+02:00 in runs.csv: 0 rows matched
    assert historian["timestamp"][0] == "2016-01-01T00:00:00.000+00:00"
    runs = read_runs(paths["runs"], timezone="UTC")
    assert runs["start_ns"][0] == pd.Timestamp("2016-01-01T00:00:00Z").value
    with pytest.raises(DataValidationError, match=r"start '2016-01-01T00:00:00': give the "
                                                  r"instant with its UTC offset"):  # fmt: skip
        write_export(HEAD_CSV, tmp_path / "naive", start="2016-01-01T00:00:00")
    with pytest.raises(DataValidationError, match=r"start '1970-01-01T00:00:00Z': before 1980"):
        write_export(HEAD_CSV, tmp_path / "epoch", start="1970-01-01T00:00:00Z")


def test_a_sample_time_under_a_second_keeps_its_milliseconds(tmp_path):
    lines = HEAD_CSV.read_text().splitlines()
    columns = lines[0].split(",")
    fields = lines[1].split(",")
    fields[columns.index("Ts")] = "0.5"
    lines[1] = ",".join(fields)
    (tmp_path / "half.csv").write_text("\n".join(lines))
    historian = pd.read_csv(write_export(tmp_path / "half.csv", tmp_path / "out")["historian"])
    assert historian["timestamp"][:3].tolist() == [  # were 00.000, 00.000, 01.000
        "2016-01-01T00:00:00.000+00:00",
        "2016-01-01T00:00:00.500+00:00",
        "2016-01-01T00:00:01.000+00:00",
    ]


def test_run_times_are_read_with_the_historians_timestamp_format_or_as_iso(tmp_path):
    # data.timestamp_format applied to the historian only: "01.03.2025 06:00:00" in runs.csv
    # was "not a timestamp"
    path = tmp_path / "runs.csv"
    path.write_text("run_id,start,end\nr1,01.03.2025 06:00:00,01.03.2025 07:00:00\n"
                    "r2,2025-03-01T08:00:00Z,2025-03-01T09:00:00Z\n")  # fmt: skip
    runs = read_runs(path, timezone="UTC", timestamp_format="%d.%m.%Y %H:%M:%S")
    starts = pd.to_datetime(runs["start_ns"], utc=True).dt.strftime("%H:%M").tolist()
    assert runs["run_id"].tolist() == ["r1", "r2"] and starts == ["06:00", "08:00"]
    with pytest.raises(DataValidationError, match=r"runs.csv row 1 run r1: start "
                                                  r"'01.03.2025 06:00:00' is not a timestamp"):
        read_runs(path, timezone="UTC")
    path.write_text("run_id,start,end\nr1,1975-03-01T06:00:00Z,1975-03-01T07:00:00Z\n")
    with pytest.raises(DataValidationError, match=r"start '1975-03-01T06:00:00Z' is before 1980"):
        read_runs(path, timezone="UTC")
