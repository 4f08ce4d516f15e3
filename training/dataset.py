"""Prepared dataset -> verified tensors: where training picks up what `twin prepare` wrote.

data_pipelines writes one Parquet file per run segment and a `manifest.json`
(docs/data_contracts.md, section 3). `PreparedDataset.open` reads the manifest and checks the
SHA-256 of every file it lists, so a model is never trained on data other than the data the
manifest (and the MLflow run that records its hash) names. `load_split` turns the runs of a
split into `RunTensors` in the manifest's column order: u = inputs then disturbances,
y = measurements, both normalised with the train statistics, and the mask `<TAG>__n > 0`.
windows.py cuts these tensors into training and evaluation windows.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
COUNT_SUFFIX = "__n"
_MANIFEST_KEYS = (
    "dt_s",
    "inputs",
    "disturbances",
    "measurements",
    "normalisation",
    "splits",
    "runs",
    "files",
)
# A train std this small relative to the mean is a constant signal (a setpoint never moved in
# the train runs), not a scale: dividing by it would blow float32 rounding up to O(1) values.
_CONSTANT_REL_STD = 1e-9
# time_s is written as k * dt_s in float64; a grid step further than this from dt_s is not
# rounding but a gap or a resampling error.
_GRID_REL_TOL = 1e-6
_HASH_CHUNK_BYTES = 1 << 20


class DatasetError(ValueError):
    """A prepared dataset breaks its contract (docs/data_contracts.md, section 3).

    The message names the file, run, row or tag at fault and what was expected.
    """


class HashMismatchError(DatasetError):
    """A file's SHA-256 differs from the one the manifest recorded."""


class Normalisation(NamedTuple):
    """Train-split statistics in the model's column order; x_norm = (x - mean) / std.

    A tag that was constant over the train runs (train std ~ 0) gets std = 1, so it is only
    centred; `PreparedDataset.constant_tags` lists such tags.

    Attributes:
        u_mean, u_std: (n_inputs,) for inputs then disturbances, in the tags' units.
        y_mean, y_std: (n_measurements,) for the measurements, in the tags' units.
    """

    u_mean: Tensor
    u_std: Tensor
    y_mean: Tensor
    y_std: Tensor


@dataclass(frozen=True)
class RunTensors:
    """One run segment on the uniform grid, normalised and ready to be windowed.

    Rows before the first row where every input and disturbance holds a value are dropped
    (a held input has no value until its first good sample); `first_row` counts them, so row
    k here is row `first_row + k` of the Parquet file.

    Attributes:
        run_id: the segment's id in the manifest, e.g. "R012" or "R012_s1".
        file: the Parquet file, relative to the dataset folder.
        first_row: number of leading file rows dropped.
        time_s: (n_rows,) float64, seconds since the segment start.
        u: (n_rows, n_inputs) normalised inputs then disturbances; always finite.
        y: (n_rows, n_measurements) normalised measurements; 0 where `mask` is False.
        mask: (n_rows, n_measurements) bool, True where `<TAG>__n > 0`.
    """

    run_id: str
    file: str
    first_row: int
    time_s: Tensor
    u: Tensor
    y: Tensor
    mask: Tensor

    @property
    def n_rows(self) -> int:
        return int(self.u.shape[0])


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class PreparedDataset:
    """A verified prepared dataset: its manifest plus loaders for the runs of each split.

    Build it with `PreparedDataset.open(path)`; the constructor trusts its arguments.
    """

    def __init__(self, root: Path, manifest: dict, manifest_sha256: str):
        self.root = root
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.input_tags: list[str] = [*manifest["inputs"], *manifest["disturbances"]]
        self.measurement_tags: list[str] = list(manifest["measurements"])
        self.dt_s = float(manifest["dt_s"])
        splits = manifest.get("splits", {})
        if not splits.get("train"):  # the statistics below are the train runs'
            counts = ", ".join(f"{name} {len(ids)}" for name, ids in splits.items())
            raise DatasetError(
                f"{root}: no run in the train split ({counts or 'no splits'}), so the dataset "
                "has no normalisation statistics: prepare an export with normal interpolation "
                "runs (runs.csv kind, regime or split; `twin generate` makes "
                "sim.n_extrapolation_runs of its sim.n_normal_runs extrapolation runs)"
            )
        self._stats = {
            tag: _effective_stats(tag, manifest["normalisation"])
            for tag in (*self.input_tags, *self.measurement_tags)
        }

    @classmethod
    def open(cls, path: str | Path) -> "PreparedDataset":
        """Read `manifest.json`, check its structure and the SHA-256 of every listed file.

        Args:
            path: the prepared dataset folder (the one holding `manifest.json`).

        Returns:
            The opened dataset; no run is loaded yet.

        Raises:
            DatasetError: no or unreadable manifest, a missing key, an unknown schema
                version, a split naming an unknown run, a tag without statistics, a missing
                file, or a path outside the folder.
            HashMismatchError: a file's SHA-256 differs from the manifest's (the message gives
                the file, the expected and the actual hash).
        """
        root = Path(path)
        manifest_path = root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise DatasetError(
                f"{manifest_path}: no manifest; is {root} a prepared dataset "
                "(written by `twin prepare`)?"
            )
        raw = manifest_path.read_bytes()
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{manifest_path}: not valid JSON ({exc})") from exc
        _check_manifest(manifest, manifest_path)
        _verify_files(root, manifest)
        return cls(root, manifest, hashlib.sha256(raw).hexdigest())

    @property
    def splits(self) -> dict[str, list[str]]:
        """Run ids per split, in manifest order."""
        return {name: list(runs) for name, runs in self.manifest["splits"].items()}

    @property
    def constant_tags(self) -> list[str]:
        """Tags whose train std is ~0; they are centred but not scaled."""
        return [tag for tag, (_, _, constant) in self._stats.items() if constant]

    def run_ids(self, split: str) -> list[str]:
        """Run ids of `split`. Raises DatasetError for an unknown split, listing the valid ones."""
        splits = self.manifest["splits"]
        if split not in splits:
            raise DatasetError(f"unknown split {split!r}; the manifest has: {', '.join(splits)}")
        return list(splits[split])

    def normalisation(self, dtype: torch.dtype | None = None) -> Normalisation:
        """The train statistics as tensors (dtype: torch's default when None)."""
        dtype = dtype or torch.get_default_dtype()

        def column(tags: list[str], field: int) -> Tensor:
            return torch.tensor([self._stats[tag][field] for tag in tags], dtype=dtype)

        return Normalisation(
            column(self.input_tags, 0),
            column(self.input_tags, 1),
            column(self.measurement_tags, 0),
            column(self.measurement_tags, 1),
        )

    def load_split(self, split: str, dtype: torch.dtype | None = None) -> list[RunTensors]:
        """Load every run of `split` in manifest order; see `load_run`."""
        return [self.load_run(run_id, dtype) for run_id in self.run_ids(split)]

    def load_run(self, run_id: str, dtype: torch.dtype | None = None) -> RunTensors:
        """Load one run segment, check it against the contract and normalise it.

        Args:
            run_id: a key of the manifest's `runs`.
            dtype: dtype of u and y (torch's default when None); time_s stays float64.

        Returns:
            The segment's `RunTensors`, leading rows without a held input dropped.

        Raises:
            DatasetError: unknown run; unreadable file; missing column (names the tags);
                row count differing from the manifest; a time grid that is not uniform in
                dt_s; an input NaN after the input's first value; a measurement whose value
                and `__n` disagree (NaN with `__n > 0`, a value with `__n == 0`, `__n < 0`).
                Each message names the file and, where it applies, row and tag.
        """
        if run_id not in self.manifest["runs"]:
            raise DatasetError(f"unknown run {run_id!r}: not in the manifest's runs")
        entry = self.manifest["runs"][run_id]
        columns = _read_columns(self.root, entry["file"], entry["sha256"], self.input_tags,
                                self.measurement_tags)  # fmt: skip
        name = entry["file"]
        time_s = columns["time_s"]
        if "n_rows" in entry and len(time_s) != int(entry["n_rows"]):
            raise DatasetError(
                f"{name} (run {run_id}): {len(time_s)} rows, the manifest says {entry['n_rows']}"
            )
        _check_grid(name, time_s, self.dt_s)
        u_raw = np.stack([columns[tag] for tag in self.input_tags], axis=1)
        first_row = _first_held_row(name, u_raw, self.input_tags)
        y_raw = np.stack([columns[tag] for tag in self.measurement_tags], axis=1)
        counts = np.stack([columns[tag + COUNT_SUFFIX] for tag in self.measurement_tags], axis=1)
        mask = _measurement_mask(name, y_raw, counts, self.measurement_tags)
        stats = self.normalisation(torch.float64)
        u = (u_raw[first_row:] - stats.u_mean.numpy()) / stats.u_std.numpy()
        y = (y_raw[first_row:] - stats.y_mean.numpy()) / stats.y_std.numpy()
        y = np.where(mask[first_row:], y, 0.0)
        dtype = dtype or torch.get_default_dtype()
        return RunTensors(
            run_id=run_id,
            file=name,
            first_row=first_row,
            time_s=torch.from_numpy(np.ascontiguousarray(time_s[first_row:])),
            u=torch.from_numpy(u).to(dtype),
            y=torch.from_numpy(y).to(dtype),
            mask=torch.from_numpy(np.ascontiguousarray(mask[first_row:])),
        )


def _check_manifest(manifest: object, manifest_path: Path) -> None:
    """Structure checks that later code relies on; raises DatasetError naming what is wrong."""
    if not isinstance(manifest, dict):
        raise DatasetError(f"{manifest_path}: expected a JSON object, got {type(manifest)}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DatasetError(
            f"{manifest_path}: schema_version {version!r}, this code reads {SCHEMA_VERSION}"
        )
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise DatasetError(f"{manifest_path}: missing keys {missing}")
    roles = ("inputs", "disturbances", "measurements")
    tags = [tag for role in roles for tag in manifest[role]]
    repeated = sorted({tag for tag in tags if tags.count(tag) > 1})
    if repeated:
        raise DatasetError(
            f"{manifest_path}: tags listed under more than one role or twice: {repeated}"
        )
    if not manifest["measurements"]:
        raise DatasetError(f"{manifest_path}: no measurements; there is nothing to train on")
    for tag in tags:
        if tag not in manifest["normalisation"]:
            raise DatasetError(f"{manifest_path}: tag {tag} has no normalisation statistics")
    for split, run_ids in manifest["splits"].items():
        for run_id in run_ids:
            if run_id not in manifest["runs"]:
                raise DatasetError(
                    f"{manifest_path}: split {split!r} names run {run_id!r}, "
                    "which is not in the manifest's runs"
                )
    for run_id, entry in manifest["runs"].items():
        if "file" not in entry or "sha256" not in entry:
            raise DatasetError(f"{manifest_path}: run {run_id!r} lacks 'file' or 'sha256'")


def _effective_stats(tag: str, normalisation: dict) -> tuple[float, float, bool]:
    """(mean, std used for scaling, constant?) of one tag; raises DatasetError if unusable."""
    entry = normalisation[tag]
    try:
        mean, std = float(entry["mean"]), float(entry["std"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(
            f"normalisation of tag {tag}: expected numbers 'mean' and 'std', got {entry!r}"
        ) from exc
    if not (np.isfinite(mean) and np.isfinite(std)) or std < 0:
        raise DatasetError(
            f"normalisation of tag {tag}: mean {mean}, std {std}; expected a "
            "finite mean and a finite std >= 0"
        )
    constant = std <= _CONSTANT_REL_STD * max(abs(mean), 1.0)
    return mean, (1.0 if constant else std), constant


def _resolve(root: Path, relative: str) -> Path:
    """Join a manifest path to the dataset folder; refuses paths that leave the folder."""
    parts = PurePosixPath(relative)
    if parts.is_absolute() or ".." in parts.parts:
        raise DatasetError(f"manifest path {relative!r} points outside the dataset folder")
    return root.joinpath(*parts.parts)


def _verify_files(root: Path, manifest: dict) -> None:
    """Check the SHA-256 of every file in `files` and of every run's file, sorted by path."""
    expected: dict[str, str] = dict(manifest["files"])
    for run_id, entry in manifest["runs"].items():
        listed = expected.setdefault(entry["file"], entry["sha256"])
        if listed != entry["sha256"]:
            raise DatasetError(
                f"manifest lists two hashes for {entry['file']} (run {run_id}): "
                f"{listed} in 'files', {entry['sha256']} in 'runs'"
            )
    for relative in sorted(expected):
        path = _resolve(root, relative)
        if not path.is_file():
            raise DatasetError(f"{relative}: listed in the manifest but missing from {root}")
        actual = sha256_file(path)
        if actual != expected[relative]:
            raise HashMismatchError(
                f"{relative}: SHA-256 mismatch, manifest expects "
                f"{expected[relative]}, file has {actual}; the file changed "
                "after `twin prepare` wrote the manifest"
            )


def verified_bytes(root: Path, relative: str, sha256: str) -> bytes:
    """A dataset file's bytes, read once and checked against the manifest's `sha256`.

    `open` checked every file, but a `twin prepare` into the same folder since then (minutes
    later: a plot, an export's monitor fit, the fault labels of an evaluation) would
    otherwise be read as the hashed data.

    Raises:
        DatasetError: the file cannot be read; HashMismatchError: its bytes changed.
    """
    try:
        content = _resolve(root, relative).read_bytes()
    except OSError as exc:
        raise DatasetError(f"{relative}: unreadable file ({exc})") from exc
    actual = hashlib.sha256(content).hexdigest()
    if actual != sha256:
        raise HashMismatchError(
            f"{relative}: SHA-256 mismatch, manifest expects {sha256}, file has {actual}; the "
            "file changed after the dataset was opened (a `twin prepare` into the same folder?)"
        )
    return content


def _read_columns(
    root: Path, relative: str, sha256: str, input_tags: list[str], measurement_tags: list[str]
) -> dict[str, np.ndarray]:
    """The columns training needs, as numpy arrays (floats as float64, counts as int64), from
    the file's bytes as the manifest hashed them (`verified_bytes`)."""
    wanted = [
        "time_s",
        *input_tags,
        *measurement_tags,
        *(tag + COUNT_SUFFIX for tag in measurement_tags),
    ]
    content = verified_bytes(root, relative, sha256)
    try:
        names = set(pq.read_schema(pa.BufferReader(content)).names)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DatasetError(f"{relative}: unreadable Parquet file ({exc})") from exc
    missing = [name for name in wanted if name not in names]
    if missing:
        raise DatasetError(f"{relative}: missing columns {missing}")
    try:
        table = pq.read_table(pa.BufferReader(content), columns=wanted)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{relative}: unreadable Parquet file ({exc})") from exc
    columns = {}
    for name in wanted:
        # to_numpy turns nulls into NaN for floats; a null count would come back as float NaN.
        values = table.column(name).to_numpy(zero_copy_only=False)
        if name.endswith(COUNT_SUFFIX):
            if not np.issubdtype(values.dtype, np.integer):
                raise DatasetError(
                    f"{relative}: column {name} is {values.dtype}, expected an integer sample count"
                )
            columns[name] = values.astype(np.int64)
        else:
            columns[name] = values.astype(np.float64)
    return columns


def _check_grid(name: str, time_s: np.ndarray, dt_s: float) -> None:
    """Raise DatasetError unless time_s steps by dt_s everywhere."""
    if len(time_s) < 2:
        return
    steps = np.diff(time_s)
    bad = np.flatnonzero(~(np.abs(steps - dt_s) <= _GRID_REL_TOL * dt_s))
    if bad.size:
        row = int(bad[0]) + 1
        raise DatasetError(
            f"{name} row {row}: time_s steps {steps[bad[0]]} s from the row "
            f"before, expected the manifest's dt_s = {dt_s} s"
        )


def _first_held_row(name: str, u_raw: np.ndarray, input_tags: list[str]) -> int:
    """First row where every input and disturbance is finite (len(u_raw) if none).

    Raises:
        DatasetError: an input is NaN or infinite after that row (a zero-order-held input
            never loses its value within a segment), naming row and tag.
    """
    finite = np.isfinite(u_raw)
    complete = finite.all(axis=1)
    if not complete.any():
        return len(u_raw)
    first = int(np.argmax(complete))
    bad_rows, bad_cols = np.nonzero(~finite[first:])
    if bad_rows.size:
        row, tag = first + int(bad_rows[0]), input_tags[int(bad_cols[0])]
        raise DatasetError(
            f"{name} row {row} tag {tag}: input is {u_raw[row, bad_cols[0]]} "
            f"after holding a value from row {first}; inputs and disturbances "
            "are zero-order held and cannot go missing within a segment"
        )
    return first


def _measurement_mask(
    name: str, y_raw: np.ndarray, counts: np.ndarray, measurement_tags: list[str]
) -> np.ndarray:
    """mask = counts > 0, after checking that values and counts agree cell by cell.

    Raises:
        DatasetError: a negative count, a non-finite value with a count > 0, or a value
            where the count is 0, naming row and tag.
    """
    mask = counts > 0
    problems = (
        (counts < 0, "negative sample count {count}"),
        (mask & ~np.isfinite(y_raw), "value {value} although {tag}__n = {count}"),
        (
            ~mask & ~np.isnan(y_raw),
            "value {value} although {tag}__n = {count} (an unsampled cell must be NaN)",
        ),
    )
    for cells, template in problems:
        rows, cols = np.nonzero(cells)
        if rows.size:
            row, col = int(rows[0]), int(cols[0])
            tag = measurement_tags[col]
            what = template.format(value=y_raw[row, col], tag=tag, count=counts[row, col])
            raise DatasetError(f"{name} row {row} tag {tag}: {what}")
    return mask
