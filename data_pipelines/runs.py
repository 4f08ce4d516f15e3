"""The run table: which stretch of the historian belongs to which run.

`runs.csv` (docs/data_contracts.md section 1) gives run boundaries and what kind of run each
was; validate.py uses it to assign samples to runs, dataset.py to split by run. A foreign
export (a real plant's file) has no run table: then the whole export is one normal run,
`run_0`, spanning its first to its last valid sample.
"""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from data_pipelines.errors import DataValidationError
from data_pipelines.timestamps import parse_timestamps

KINDS = ("normal", "fault")
REGIMES = ("interpolation", "extrapolation")
SPLITS = ("train", "val", "test", "fault")
DEFAULT_RUN_ID = "run_0"
# run ids become file names (runs/<run_id>.parquet), so they are kept to a safe alphabet
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def read_runs(path: Path, *, timezone: str, timestamp_format: str = "ISO8601") -> pd.DataFrame:
    """Read and check `runs.csv`.

    Args:
        path: the run table; columns run_id, start, end, and optionally kind (default
            "normal"), regime (default "interpolation"), split (train, val, test or fault:
            the run's split, decided by the plant's owner; empty or absent: assigned by
            `data.split`) and any setpoint columns.
        timezone: IANA zone of naive start/end times.
        timestamp_format: `data.timestamp_format`, as the historian's; a start or end it
            does not read is read as ISO 8601 (a run table written by hand).

    Returns:
        One row per run, sorted by start, with run_id (str), start_ns and end_ns (int64 UTC
        nanoseconds; a run holds samples with start <= t <= end, and where two runs touch
        the shared instant belongs to the later one), kind, regime, split ("" = assigned
        by the fractions), and the
        file's 1-based data row as `row`.

    Raises:
        DataValidationError: unreadable file, missing column, unparseable or DST-ambiguous
            start/end, end <= start, unknown kind, regime or split, duplicate or unsafe run_id,
            overlapping runs; each names the file and row.
    """
    name = path.name
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DataValidationError(f"{name}: cannot read the file: {err}") from err
    missing = [c for c in ("run_id", "start", "end") if c not in table.columns]
    if missing:
        raise DataValidationError(f"{name}: missing columns {missing}; found {list(table.columns)}")
    if table.empty:
        raise DataValidationError(
            f"{name}: no runs, the file has a header only; give one row per run, or remove "
            "the file to take the whole export as one run"
        )
    runs = pd.DataFrame(
        {"row": np.arange(1, len(table) + 1), "run_id": table["run_id"].str.strip()}
    )
    for column in ("start", "end"):
        cells = pa.array(table[column].str.strip().replace("", None))
        # dst_policy "reject": flagged here, so that the message fits a run boundary
        parsed = parse_timestamps(cells, file=name, timezone=timezone, dst_policy="reject",
                                  timestamp_format=timestamp_format)  # fmt: skip
        if timestamp_format != "ISO8601" and (parsed.error == 1).any():
            iso = parse_timestamps(cells, file=name, timezone=timezone, dst_policy="reject")
            use = (parsed.error == 1) & (iso.error != 1)
            parsed = parsed._replace(ns=np.where(use, iso.ns, parsed.ns),
                                     error=np.where(use, iso.error, parsed.error))  # fmt: skip
        bad = np.flatnonzero(parsed.error != 0)
        if bad.size:
            why = {
                2: f"is ambiguous in {timezone} (the hour repeats when DST ends); give it "
                "with a UTC offset",
                3: f"does not exist in {timezone} (clocks skip that hour when DST starts); "
                "give it with a UTC offset",
            }.get(int(parsed.error[bad[0]]), "is not a timestamp")
            if "before 1980" in str(parsed.text[bad[0]]):
                why = "is before 1980, which is read as the placeholder of a time never set"
            raise DataValidationError(
                f"{name} row {bad[0] + 1} run {runs['run_id'][bad[0]]}: {column} "
                f"{table[column][bad[0]]!r} {why}"
            )
        runs[f"{column}_ns"] = parsed.ns
    runs["kind"] = _choice(table, "kind", "normal", KINDS, name)
    runs["regime"] = _choice(table, "regime", "interpolation", REGIMES, name)
    runs["split"] = _choice(table, "split", "", ("", *SPLITS), name)
    _check_ids(runs, name)
    _check_intervals(runs, name)
    return runs.sort_values("start_ns", kind="stable").reset_index(drop=True)


def single_run(start_ns: int, end_ns: int) -> pd.DataFrame:
    """The run table of an export without runs.csv: one normal interpolation run."""
    return pd.DataFrame(
        {
            "row": [0],
            "run_id": [DEFAULT_RUN_ID],
            "start_ns": [start_ns],
            "end_ns": [end_ns],
            "kind": ["normal"],
            "regime": ["interpolation"],
            "split": [""],
        }
    )


def assign_runs(ns: np.ndarray, runs: pd.DataFrame) -> np.ndarray:
    """Index into `runs` (sorted by start) of the run holding each instant; -1 for none.

    Args:
        ns: int64 UTC nanoseconds, any order.
        runs: the table from read_runs or single_run.

    Returns:
        int64 array like `ns`.
    """
    starts = runs["start_ns"].to_numpy()
    ends = runs["end_ns"].to_numpy()
    index = np.searchsorted(starts, ns, side="right") - 1
    inside = (index >= 0) & (ns <= ends[np.clip(index, 0, None)])
    return np.where(inside, index, -1)


def _choice(table: pd.DataFrame, column: str, default: str, valid: tuple, file: str) -> list:
    if column not in table.columns:
        return [default] * len(table)
    values = table[column].str.strip().replace("", default)
    bad = np.flatnonzero(~values.isin(valid).to_numpy())
    if bad.size:
        raise DataValidationError(
            f"{file} row {bad[0] + 1}: {column} {values[bad[0]]!r} is not one of {list(valid)}"
        )
    return values.tolist()


def _check_ids(runs: pd.DataFrame, file: str) -> None:
    for row, run_id in zip(runs["row"], runs["run_id"], strict=True):
        if not _SAFE_ID.match(run_id):
            raise DataValidationError(
                f"{file} row {row}: run_id {run_id!r} must be letters, digits, '.', '_', '-'"
            )
    dupes = runs["run_id"].duplicated()
    if dupes.any():
        row = int(runs["row"][dupes].iloc[0])
        raise DataValidationError(
            f"{file} row {row}: run_id {runs['run_id'][row - 1]!r} appears twice"
        )


def _check_intervals(runs: pd.DataFrame, file: str) -> None:
    backwards = runs["end_ns"] <= runs["start_ns"]
    if backwards.any():
        row = int(runs["row"][backwards].iloc[0])
        raise DataValidationError(
            f"{file} row {row}: run {runs['run_id'][row - 1]} ends before it starts"
        )
    ordered = runs.sort_values("start_ns", kind="stable")
    # Runs may touch (one ends where the next starts); the shared instant goes to the later.
    overlap = ordered["start_ns"].to_numpy()[1:] < ordered["end_ns"].to_numpy()[:-1]
    if overlap.any():
        i = int(np.flatnonzero(overlap)[0])
        first, second = ordered.iloc[i], ordered.iloc[i + 1]
        raise DataValidationError(
            f"{file} rows {first['row']} and {second['row']}: runs {first['run_id']} and "
            f"{second['run_id']} overlap; a sample must belong to one run"
        )
