"""Alignment: valid multi-rate samples -> one uniform grid of `dt_s` seconds per run segment.

Third stage of `twin prepare` (read_historian -> validate -> align_runs -> write_dataset).
A run's grid is anchored at the run's start: t_k = start + k * dt. On it

- inputs and disturbances are zero-order held: the last valid value at or before t_k, from
  anywhere earlier in the same run (NaN before the tag's first valid sample in the run, and
  where that value is older than the tag's `max_hold_s`, when the dictionary sets one);
- a measurement is the mean of its valid samples in (t_k - dt, t_k], NaN where there is none,
  never interpolated; `<TAG>__n` counts the samples averaged (0 = not sampled or rejected).

A stretch longer than `max_gap_s` with no valid sample of any tag splits the run into
segments `<run_id>`, `<run_id>_s1`, ...; each segment's grid covers the cells from its first
to its last sample. A held tag's value growing older than its `max_hold_s` splits the run too,
at the first grid point where it has none: a segment's held tags, once all have a value, keep
it to the segment's end (training starts there, training/dataset.py). Everything is numpy
over whole columns; loops run over runs and tags only.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from data_pipelines.errors import DataValidationError
from data_pipelines.tags import TagDictionary

COUNT_SUFFIX = "__n"
_INT16_MAX = np.iinfo(np.int16).max


@dataclass
class Segment:
    """One gap-free stretch of a run on the uniform grid.

    Attributes:
        segment_id: `<run_id>` for the first segment, `<run_id>_s<i>` for later ones.
        run_id: the run it comes from.
        kind: the run's kind ("normal" or "fault").
        regime: the run's regime ("interpolation" or "extrapolation").
        start_ns: UTC nanoseconds of the first grid point.
        end_ns: UTC nanoseconds of the last grid point.
        frame: the run file's table: time_s (float64, s since start_ns), timestamp
            (datetime64[ns, UTC]), one float64 column per tag in dictionary.column_order,
            then `<TAG>__n` (int16) per measurement. Shape (n_grid, 2 + n_tags + n_meas).
    """

    segment_id: str
    run_id: str
    kind: str
    regime: str
    start_ns: int
    end_ns: int
    frame: pd.DataFrame


def align_runs(
    valid: pd.DataFrame,
    runs: pd.DataFrame,
    dictionary: TagDictionary,
    *,
    dt_s: float,
    max_gap_s: float,
) -> tuple[list[Segment], list[str]]:
    """Put every run's valid samples on its uniform grid, split at long gaps.

    Args:
        valid: validate.ValidationResult.valid: timestamp, tag, value, run (index into runs).
        runs: the run table (run_id, start_ns, end_ns, kind, regime), sorted by start.
        dictionary: roles decide hold versus mean.
        dt_s: grid step in seconds (> 0).
        max_gap_s: a longer stretch without any valid sample splits the run (>= dt_s).

    Returns:
        (segments in run order, warnings): a run without valid samples gives no segment
        and a warning; a held tag left without a value by its max_hold_s, a warning per run
        and tag (how many grid points, the longest stretch).

    Raises:
        DataValidationError: a measurement with more than 32767 samples in one cell, which
            the int16 count column cannot hold (dt_s too long for that tag's rate).
    """
    dt_ns = int(round(dt_s * 1e9))
    n_tags = len(dictionary)
    ns = pd.DatetimeIndex(valid["timestamp"]).as_unit("ns").asi8
    key = valid["run"].to_numpy(dtype=np.int64) * n_tags + valid["tag"].cat.codes.to_numpy()
    order = np.lexsort((ns, key))
    ns, key = ns[order], key[order]
    value = valid["value"].to_numpy(dtype=np.float64)[order]
    # bounds[r * n_tags + j] is where run r, tag j starts in the sorted arrays
    bounds = np.searchsorted(key, np.arange(len(runs) * n_tags + 1))
    segments, warnings = [], []
    for r, run in enumerate(runs.itertuples(index=False)):
        groups = bounds[r * n_tags : (r + 1) * n_tags + 1]
        if groups[0] == groups[-1]:
            warnings.append(f"run {run.run_id}: no valid sample, no run file written")
            continue
        run_segments, run_warnings = _align_run(
            run, ns, value, groups, dictionary, dt_ns, int(round(max_gap_s * 1e9))
        )
        segments += run_segments
        warnings += run_warnings
    return segments, warnings


def grid_cell(ns: np.ndarray, anchor_ns: int, dt_ns: int) -> np.ndarray:
    """Index k of the grid cell (t_k - dt, t_k] holding each instant: ceil((t - anchor) / dt).

    Integer arithmetic on nanoseconds, so a sample exactly on t_k lands in cell k, not k + 1.
    """
    return -((anchor_ns - ns) // dt_ns)


def _align_run(run, ns, value, groups, dictionary, dt_ns, max_gap_ns):
    """One run: find its segments, then fill the grid tag by tag; (segments, warnings)."""
    anchor = int(run.start_ns)
    times = np.sort(ns[groups[0] : groups[-1]])  # repeats are harmless: their diff is 0
    cuts = np.flatnonzero(np.diff(times) > max_gap_ns)
    first = grid_cell(times[np.r_[0, cuts + 1]], anchor, dt_ns)
    last = grid_cell(times[np.r_[cuts, len(times) - 1]], anchor, dt_ns)
    max_age = {name: int(round(dictionary[name].max_hold_s * 1e9)) for name in dictionary.held
               if dictionary[name].max_hold_s is not None}  # fmt: skip
    stale_from = [
        _first_stale_cell(ns[groups[j] : groups[j + 1]], max_age[name], anchor, dt_ns)
        for j, name in enumerate(dictionary.names) if name in max_age
    ]  # fmt: skip
    first, last = _split_at(first, last, np.concatenate([np.zeros(0, np.int64), *stale_from]))
    lengths = last - first + 1
    warnings: list[str] = []
    offsets = np.r_[0, np.cumsum(lengths)]
    total = int(offsets[-1])
    # The grid of all segments back to back: cell numbers k, then instants.
    grid_k = np.repeat(first - offsets[:-1], lengths) + np.arange(total)
    grid_ns = anchor + grid_k * dt_ns
    columns, counts = {}, {}
    for j, name in enumerate(dictionary.names):
        t, v = ns[groups[j] : groups[j + 1]], value[groups[j] : groups[j + 1]]
        if dictionary[name].role == "measurement":
            columns[name], counts[name] = _cell_means(t, v, anchor, dt_ns, first, offsets, total)
            if counts[name].max(initial=0) > _INT16_MAX:
                raise DataValidationError(
                    f"run {run.run_id} tag {name}: {counts[name].max()} samples in one "
                    f"{dt_ns / 1e9} s cell, more than the int16 count column holds"
                )
        else:
            last_sample = _last_sample(t, grid_ns)
            columns[name] = _hold(v, last_sample, max_age.get(name))
            if name in max_age:
                warnings += _stale_warning(run.run_id, name, last_sample, max_age[name])
    segments = [
        _segment(
            run,
            i,
            grid_ns[offsets[i] : offsets[i + 1]],
            columns,
            counts,
            dictionary,
            slice(offsets[i], offsets[i + 1]),
            dt_ns,
        )
        for i in range(len(lengths))
    ]
    return segments, warnings


def _first_stale_cell(t: np.ndarray, max_age_ns: int, anchor: int, dt_ns: int) -> np.ndarray:
    """Grid cells where a held tag sampled at `t` (sorted) first has a value older than
    max_age_ns: the first grid point after t + max_age_ns, where it comes before the tag's
    next sample (after its last sample: always; the caller keeps cells inside segments)."""
    k = (t + max_age_ns - anchor) // dt_ns + 1
    next_sample = np.r_[t[1:], np.iinfo(np.int64).max]
    return k[anchor + k * dt_ns < next_sample]


def _split_at(first: np.ndarray, last: np.ndarray, cells: np.ndarray):
    """Segments (first, last cell each) split so that each of `cells` inside one (after
    its first cell) starts a segment of its own."""
    inside = np.zeros(len(cells), dtype=bool)
    for lo, hi in zip(first, last, strict=True):
        inside |= (cells > lo) & (cells <= hi)
    starts = np.unique(cells[inside])
    # segments are disjoint and in order: sorted starts and sorted ends pair up
    return np.sort(np.r_[first, starts]), np.sort(np.r_[last, starts - 1])


def _last_sample(t: np.ndarray, grid_ns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each grid instant, the index of the last sample at or before it (-1: none yet)
    and that sample's age in ns (-1: none); t sorted."""
    idx = np.searchsorted(t, grid_ns, side="right") - 1
    age_ns = np.where(idx >= 0, grid_ns - t[np.clip(idx, 0, None)], -1) if len(t) else idx
    return idx, age_ns


def _hold(v: np.ndarray, last, max_age_ns: int | None) -> np.ndarray:
    """Zero-order hold: the last sample at or before each grid instant (`last` from
    `_last_sample`); NaN before the first sample and where it is older than max_age_ns
    (None: no limit)."""
    idx, age_ns = last
    if not len(v):
        return np.full(len(idx), np.nan)
    fresh = idx >= 0 if max_age_ns is None else (idx >= 0) & (age_ns <= max_age_ns)
    return np.where(fresh, v[np.clip(idx, 0, None)], np.nan)


def _stale_warning(run_id: str, name: str, last, max_age_ns: int) -> list[str]:
    """One warning naming how many grid points a held tag has no value for because its
    last sample is older than its max_hold_s, and the oldest such sample's age."""
    idx, age_ns = last
    stale = (idx >= 0) & (age_ns > max_age_ns)
    if not stale.any():
        return []
    longest = age_ns[stale].max() / 1e9
    return [
        f"run {run_id} tag {name}: {int(stale.sum())} grid points without a value, its last "
        f"valid sample older than max_hold_s = {max_age_ns / 1e9:g} s (up to {longest:g} s "
        "old): left NaN, not held, and the run split where the value went stale"
    ]


def _cell_means(t, v, anchor, dt_ns, first, offsets, total) -> tuple[np.ndarray, np.ndarray]:
    """Mean and count of the samples in each grid cell; NaN mean where the count is 0."""
    k = grid_cell(t, anchor, dt_ns)
    # Every sample lies in some segment by construction (segments span all sample times).
    seg = np.searchsorted(first, k, side="right") - 1
    pos = offsets[seg] + (k - first[seg])
    count = np.bincount(pos, minlength=total)
    total_value = np.bincount(pos, weights=v, minlength=total)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total_value / count, np.nan)
    return mean, count


def _segment(run, i, grid_ns, columns, counts, dictionary, part, dt_ns) -> Segment:
    n = len(grid_ns)
    data = {
        "time_s": np.arange(n, dtype=np.float64) * (dt_ns / 1e9),
        "timestamp": pd.Series(grid_ns.view("M8[ns]")).dt.tz_localize("UTC"),
    }
    for name in dictionary.column_order:
        data[name] = columns[name][part]
    for name in dictionary.with_role("measurement"):
        data[name + COUNT_SUFFIX] = counts[name][part].astype(np.int16)
    segment_id = run.run_id if i == 0 else f"{run.run_id}_s{i}"
    return Segment(
        segment_id,
        run.run_id,
        run.kind,
        run.regime,
        int(grid_ns[0]),
        int(grid_ns[-1]),
        pd.DataFrame(data),
    )
