"""The prepared dataset: split by run, normalisation on train, one Parquet per run segment.

Last stage of `twin prepare` (read_historian -> validate -> align_runs -> write_dataset). It
writes what docs/data_contracts.md section 3 fixes: `runs/<segment_id>.parquet`,
`rejects.csv`, the copied `events.csv` / `fault_labels.csv`, and `manifest.json` with the
SHA-256 of every file. The same input gives byte-identical output: Parquet is written with
fixed options and no pandas metadata, the manifest with sorted keys and no wall-clock time.
"""

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.align import Segment
from data_pipelines.errors import DataValidationError
from data_pipelines.tags import TagDictionary
from data_pipelines.timestamps import iso_utc

SPLITS = ("train", "val", "test", "fault")
RUNS_DIR = "runs"
# Names this stage owns inside out_dir; only these and run files are replaced or removed
# (after the new manifest is in place; a reader never takes a file the manifest does not list).
OWNED = ("rejects.csv", "events.csv", "fault_labels.csv", "manifest.json")
# The folder a prepare writes into before its files replace the dataset's (`write_dataset`).
STAGING_PREFIX = ".writing-"


def split_runs(runs: pd.DataFrame, *, fractions: dict, seed: int) -> dict[str, str]:
    """Assign every run, as a whole, to train / val / test / fault.

    A run whose runs.csv `split` is set goes there. Otherwise fault runs go to "fault" and
    normal extrapolation runs to "test", whatever the fractions. Normal interpolation runs
    are shuffled with `seed` (numpy default_rng) in run-table order and cut by the
    fractions: n_val = round(n * val), n_test = round(n * test) (halves round up), train
    gets the rest and at least one run when there is one.

    Args:
        runs: run table (run_id, kind, regime, optional split), sorted by start.
        fractions: {"train", "val", "test"} summing to 1.
        seed: seed of the shuffle.

    Returns:
        {run_id: split}.
    """
    split = {}
    pool = []
    explicit = runs["split"] if "split" in runs else [""] * len(runs)
    for run_id, kind, regime, chosen in zip(
        runs["run_id"], runs["kind"], runs["regime"], explicit, strict=True
    ):
        if chosen:  # runs.csv says where the run goes (e.g. a benchmark's validation record)
            split[run_id] = chosen
        elif kind == "fault":
            split[run_id] = "fault"
        elif regime == "extrapolation":
            split[run_id] = "test"
        else:
            pool.append(run_id)
    n = len(pool)
    # + 1e-9: n * 0.35 at n = 90 is 31.499999999999996 in floating point, a half all the same
    n_val = math.floor(n * fractions["val"] + 0.5 + 1e-9)
    n_test = math.floor(n * fractions["test"] + 0.5 + 1e-9)
    while n and n - n_val - n_test < 1:  # a dataset with runs always has one to train on
        if n_test:
            n_test -= 1
        else:
            n_val -= 1
    shuffled = [pool[i] for i in np.random.default_rng(seed).permutation(n)]
    n_train = n - n_val - n_test
    for i, run_id in enumerate(shuffled):
        split[run_id] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return split


def _trained_rows(frame: pd.DataFrame, held: list[str]) -> pd.DataFrame:
    """The rows training uses: from the first where every held tag has a value (none if no
    row has them all)."""
    complete = frame[held].notna().all(axis=1).to_numpy() if held else np.ones(len(frame), bool)
    return frame.iloc[int(np.argmax(complete)) if complete.any() else len(frame):]


def normalisation(
    segments: list[Segment],
    split: dict[str, str],
    dictionary: TagDictionary,
    *,
    std_floor_fraction: float,
) -> tuple[dict, list[str]]:
    """Mean and std of each tag's grid values over the train segments only, from each
    segment's first row where every held tag (input, disturbance) has a value: training
    starts there (training/dataset.py), and a segment where one never has is not trained on.

    The std (population, ddof=0) is floored at `std_floor_fraction` * (range_high -
    range_low), so a constant tag does not divide by zero when normalised; a tag with a
    zero-width range is floored at 1.0.

    Returns:
        ({TAG: {"mean", "std"}}, warnings). A tag without any train value gets null mean
        and std and a warning.
    """
    train = [_trained_rows(s.frame, dictionary.held) for s in segments
             if split[s.run_id] == "train"]  # fmt: skip
    stats, warnings = {}, []
    for name in dictionary.column_order:
        values = np.concatenate([f[name].to_numpy() for f in train]) if train else np.zeros(0)
        values = values[~np.isnan(values)]
        if not values.size:
            stats[name] = {"mean": None, "std": None}
            warnings.append(f"tag {name}: no value in the train split, no normalisation")
            continue
        spec = dictionary[name]
        floor = std_floor_fraction * (spec.range_high - spec.range_low) or 1.0
        stats[name] = {"mean": float(values.mean()), "std": max(float(values.std()), floor)}
    return stats, warnings


def write_dataset(
    out_dir: Path,
    segments: list[Segment],
    *,
    split: dict[str, str],
    rejects: pd.DataFrame,
    copies: dict[str, Path],
    manifest: dict,
) -> dict:
    """Write run files, rejects.csv, copies and manifest.json; hash every file.

    Args:
        out_dir: created if missing; earlier run files and the OWNED names are replaced once
            every new file is written: a failure while writing leaves the dataset there as it
            was; one during the moves that follow (a second) leaves one that `open` refuses
            (its hashes), never one read silently.
        segments: from align_runs.
        split: {run_id: split} from split_runs.
        rejects: rejects.csv rows.
        copies: {name in out_dir: source path} copied byte for byte (events, fault labels).
        manifest: the fields prepare already knows; "runs", "splits", "files" are added.

    Returns:
        The manifest as written.

    Raises:
        DataValidationError: two segments would write the same file (a run id that looks
            like another run's later segment, e.g. "A_s1" beside a split run "A").
    """
    runs_dir = out_dir / RUNS_DIR
    runs_dir.mkdir(parents=True, exist_ok=True)
    with _writer_lock(out_dir) as locked:
        # Every file is written into a staging folder first, the run files into one inside
        # runs/ (it may link to another disk, where a rename cannot reach), then moved in,
        # the manifest last, and stale files removed only then: a prepare stopped half way
        # (a full disk, Ctrl-C) emptied the folder of the last good dataset.
        staging = out_dir / f"{STAGING_PREFIX}{os.getpid()}"
        staged_runs = runs_dir / f"{STAGING_PREFIX}{os.getpid()}"
        if locked:  # no other writer: staging folders left are of writers killed outright
            for folder in (out_dir, runs_dir):
                for stale in folder.glob(STAGING_PREFIX + "*"):
                    shutil.rmtree(stale)
        try:
            staging.mkdir()
            staged_runs.mkdir()
            try:
                text = _write_files(staging, staged_runs, segments, split, rejects, copies,
                                    manifest)  # fmt: skip
            except OSError as error:
                raise DataValidationError(
                    f"{out_dir}: the prepared dataset could not be written ({error}); the one "
                    "there before is left as it was"
                ) from error
            new_runs = sorted(staged_runs.iterdir())
            new_files = sorted(p for p in staging.iterdir() if p.name != "manifest.json")
            try:
                for path in new_runs:
                    os.replace(path, runs_dir / path.name)
                for path in new_files:
                    os.replace(path, out_dir / path.name)
                os.replace(staging / "manifest.json", out_dir / "manifest.json")
            except OSError as error:
                raise DataValidationError(
                    f"{out_dir}: moving the new dataset in failed ({error}); the folder now "
                    "mixes old and new files, which the manifest's hashes refuse: run `twin "
                    "prepare` again"
                ) from error
            kept = {path.name for path in new_runs}
            for stale in runs_dir.glob("*.parquet"):
                if stale.name not in kept:
                    stale.unlink()
            for name in set(OWNED) - {path.name for path in new_files} - {"manifest.json"}:
                (out_dir / name).unlink(missing_ok=True)  # e.g. events.csv of an earlier raw
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(staged_runs, ignore_errors=True)
    return json.loads(text)


def _write_files(out_dir: Path, runs_out: Path, segments: list[Segment], split: dict[str, str],
                 rejects: pd.DataFrame, copies: dict[str, Path], manifest: dict) -> str:
    """Every file of the dataset into `out_dir`, the run files into `runs_out`, manifest.json
    last; returns its text."""
    runs = _write_runs(runs_out, segments, split)
    files = {entry["file"]: entry["sha256"] for entry in runs.values()}
    rejects.to_csv(out_dir / "rejects.csv", index=False, lineterminator="\n")
    files["rejects.csv"] = sha256_file(out_dir / "rejects.csv")
    for name, source in sorted(copies.items()):
        shutil.copyfile(source, out_dir / name)
        files[name] = sha256_file(out_dir / name)
    splits = {name: sorted(s for s, e in runs.items() if e["split"] == name) for name in SPLITS}
    manifest = {**manifest, "runs": runs, "files": files, "splits": splits}
    text = json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False) + "\n"
    (out_dir / "manifest.json").write_text(text, encoding="utf-8")
    return text


@contextmanager
def _writer_lock(out_dir: Path) -> Iterator[bool]:
    """One writer of `out_dir` at a time (a lock on the folder itself, released when the
    process ends however it ends): two prepares into one folder deleted each other's run
    files. A second writer waits for the first; readers are not held. Yields whether it
    holds the lock."""
    if fcntl is None:  # not POSIX: no lock
        yield False
        return
    handle = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(handle)  # releases the lock


def _write_runs(runs_out: Path, segments: list[Segment], split: dict[str, str]) -> dict:
    """One Parquet file per segment into `runs_out`; returns the manifest's "runs" entries
    (their files under RUNS_DIR)."""
    runs = {}
    for seg in segments:
        if seg.segment_id in runs:
            raise DataValidationError(f"run segment id {seg.segment_id} is not unique")
        name = f"{seg.segment_id}.parquet"
        write_parquet(seg.frame, runs_out / name)
        start, end = iso_utc(np.array([seg.start_ns, seg.end_ns]))
        runs[seg.segment_id] = {
            "file": f"{RUNS_DIR}/{name}",
            "sha256": sha256_file(runs_out / name),
            "n_rows": len(seg.frame),
            "start": start,
            "end": end,
            "kind": seg.kind,
            "regime": seg.regime,
            "split": split[seg.run_id],
            "source_run": seg.run_id,
        }
    return runs


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write a frame so that the same frame always gives the same bytes.

    The table is built column by column, without pandas schema metadata (which records
    library versions); the arrow types (timestamp[ns, UTC], float64, int16) carry
    everything a reader needs.
    """
    columns = {}
    for name, column in frame.items():
        if isinstance(column.dtype, pd.DatetimeTZDtype):
            # built from UTC nanoseconds: pyarrow's pandas path warns under pandas 3.1
            ns = column.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[ns]")
            columns[name] = pa.array(ns, pa.timestamp("ns", tz="UTC"))
        else:
            columns[name] = pa.array(column.to_numpy())
    table = pa.table(columns)
    pq.write_table(table, path, compression="zstd", write_statistics=True)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
