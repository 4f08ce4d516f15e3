"""rejects.csv rows: one line per rejected historian row, with a reason a person can act on.

Called by validate.py once every row has its reason code. The `reason` column starts with the
code (the key of `counts.rejected_by_reason` in the manifest) and goes on with the detail:
"out_of_range: 75.2 kg/h outside [0.0, 60.0] kg/h". Messages are built per reason with
vectorised string operations, so a file with many rejects stays cheap.
"""

import numpy as np
import pandas as pd

from data_pipelines.timestamps import NAT, iso_utc

COLUMNS = ("file", "row", "timestamp", "tag", "value", "quality", "reason")


def build_rejects(samples, tables, dictionary, reasons: tuple[str, ...]) -> pd.DataFrame:
    """The rejects.csv table for every row whose reason code is not 0.

    Args:
        samples: validate.Samples (flat arrays over all files, reason codes set).
        tables: the HistorianTables the samples came from (for the cells' text).
        dictionary: the TagDictionary (units and ranges for out_of_range messages).
        reasons: validate.REASONS; code k is reasons[k - 1].

    Returns:
        DataFrame with COLUMNS, rows in file order; `timestamp` is ISO 8601 UTC, or the
        cell's text where it did not parse; `value` the number, or the cell's text.
    """
    idx = np.flatnonzero(samples.reason != 0)
    text = _cell_text(samples, tables, idx)
    names = np.array([t.file for t in tables], dtype=object)
    files = names[samples.file[idx]] if len(names) else np.array([], dtype=object)
    ns = samples.ns[idx]
    timestamp = np.where(ns != NAT, iso_utc(ns), text["timestamp"])
    value_num = pd.Series(samples.value[idx]).astype(str).where(~np.isnan(samples.value[idx]), "")
    value = np.where(pd.notna(text["value"]), text["value"], value_num.to_numpy(dtype=object))
    frame = pd.DataFrame(
        {
            "file": files,
            "row": samples.row[idx].astype(np.int64),
            "timestamp": timestamp,
            "tag": text["tag"],
            "value": value,
            "quality": text["quality"],
        }
    )
    frame["reason"] = _messages(samples, idx, frame, names, dictionary, reasons)
    return frame.reset_index(drop=True).loc[:, list(COLUMNS)]


def _cell_text(samples, tables, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Tag, quality, timestamp and value text of the rejected rows, from their files."""
    out = {
        key: np.full(len(idx), None, dtype=object)
        for key in ("tag", "quality", "timestamp", "value")
    }
    offsets = np.cumsum([0] + [len(t.frame) for t in tables])
    for i, table in enumerate(tables):
        pick = samples.file[idx] == i
        local = idx[pick] - offsets[i]
        f = table.frame
        for key, column in (
            ("tag", "tag"),
            ("quality", "quality"),
            ("timestamp", "timestamp_text"),
            ("value", "value_text"),
        ):
            out[key][pick] = f[column].iloc[local].to_numpy(dtype=object)
    for key in ("tag", "quality", "timestamp"):
        out[key] = pd.Series(out[key], dtype=object).fillna("").to_numpy(dtype=object)
    return out


def _messages(samples, idx, frame, names, dictionary, reasons) -> np.ndarray:
    """`<reason>: <detail>` per rejected row."""
    code = samples.reason[idx]
    ref = samples.ref[idx]
    out = np.full(len(idx), "", dtype=object)
    q = _quoted
    for k, reason in enumerate(reasons, start=1):
        m = code == k
        if not m.any():
            continue
        if reason == "unparseable_timestamp":
            detail = q(frame["timestamp"][m]) + " is not a timestamp"
        elif reason == "ambiguous_local_time":
            detail = "local time " + q(frame["timestamp"][m]) + " happens twice (DST ends)"
        elif reason == "nonexistent_local_time":
            detail = "local time " + q(frame["timestamp"][m]) + " does not exist (DST starts)"
        elif reason == "missing_tag":
            detail = pd.Series("no tag name in the row", index=frame.index[m])
        elif reason == "bad_quality":
            detail = "quality " + q(frame["quality"][m])
        elif reason == "non_numeric_value":
            detail = q(frame["value"][m]) + " is not a number"
        elif reason == "missing_value":
            detail = pd.Series("empty value with good quality", index=frame.index[m])
        elif reason == "duplicate_timestamp":
            first = ref[m]
            detail = (
                "tag already has a sample at this time in "
                + pd.Series(names[samples.file[first]], dtype=object)
                + " row "
                + pd.Series(samples.row[first]).astype(str)
            )
        elif reason == "time_backwards":
            detail = (
                "earlier than "
                + pd.Series(iso_utc(ref[m]), dtype=object)
                + ", already seen for this tag"
            )
        elif reason == "out_of_range":
            detail = _range_detail(samples, idx[m], frame["value"][m], dictionary)
        else:  # outside_runs
            detail = pd.Series("in no run of runs.csv", index=frame.index[m])
        out[m] = (reason + ": " + pd.Series(detail, dtype=object).astype(str)).to_numpy()
    return out


def _range_detail(samples, rows, value_text, dictionary) -> pd.Series:
    """ "75.2 kg/h outside [0.0, 60.0] kg/h" for each out-of-range row."""
    specs = [dictionary[name] for name in dictionary.names]
    units = np.array([spec.unit for spec in specs], dtype=object)
    bounds = np.array([f"[{spec.range_low}, {spec.range_high}] " for spec in specs], dtype=object)
    tag = samples.tag[rows]
    unit = pd.Series(units[tag], dtype=object)
    return (
        pd.Series(value_text, dtype=object).reset_index(drop=True)
        + " "
        + unit
        + " outside "
        + pd.Series(bounds[tag], dtype=object)
        + unit
    )


def _quoted(values) -> pd.Series:
    return "'" + pd.Series(values, dtype=object).astype(str) + "'"
