"""`twin prepare`: historian export folder -> prepared dataset folder.

The entry point of data_pipelines, called by training/data_stages.py with plain dicts (no
Hydra here). It chains the stages: read_historian -> validate -> align_runs -> split_runs ->
normalisation -> write_dataset, and checks the `data` config (configs/data/cdc_default.yaml)
before anything is read, so a misspelt key fails at once with the valid keys listed.
"""

import math
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import pandas as pd

from data_pipelines.align import align_runs
from data_pipelines.dataset import normalisation, sha256_file, split_runs, write_dataset
from data_pipelines.errors import ConfigError, DataValidationError, config_number
from data_pipelines.historian import (
    SUFFIXES,
    HistorianTable,
    read_historian,
    read_tag_dictionary_units,
)
from data_pipelines.runs import read_runs
from data_pipelines.tags import TagDictionary
from data_pipelines.timestamps import DST_POLICIES
from data_pipelines.validate import OUT_OF_RANGE_POLICIES, check_units, validate

SCHEMA_VERSION = 1
SIDE_FILES = ("tag_dictionary.csv", "runs.csv", "events.csv", "fault_labels.csv")
COPIED = ("events.csv", "fault_labels.csv")  # copied and hashed; never read


@dataclass(frozen=True)
class DataConfig:
    """The `data` config group; see configs/data/cdc_default.yaml for each key's meaning."""

    raw_dir: str = "data/raw"
    out_dir: str = "data/prepared"
    historian_glob: str = "historian.*"
    dt_s: float = 5.0
    max_gap_s: float = 60.0
    timezone: str = "UTC"
    dst_policy: str = "raise"
    timestamp_format: str = "ISO8601"
    good_quality: tuple[str, ...] = ("Good",)
    quality_column: str = "quality"
    ignore_columns: tuple[str, ...] = ()
    out_of_range: str = "reject"
    max_bad_timestamp_fraction: float = 0.01
    std_floor_fraction: float = 1.0e-3
    split: dict = field(
        default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15, "seed": 0}
    )

    @classmethod
    def from_mapping(cls, data: Mapping) -> "DataConfig":
        """Check a plain `data` mapping and fill in defaults for keys it leaves out.

        Raises:
            ConfigError (a ValueError): unknown key (the valid ones are listed), or a value
                out of its domain.
        """
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(f"data config: unknown keys {unknown}; valid keys: {valid}")
        values = dict(data)
        for f in fields(cls):  # YAML writes 5 for 5.0; the manifest should not care
            if f.type is float and f.name in values:
                values[f.name] = _number(f.name, values[f.name])
        if "good_quality" in values:
            values["good_quality"] = _strings(values["good_quality"], "good_quality",
                                              "quality strings")  # fmt: skip
        if "ignore_columns" in values:
            names = _strings(values["ignore_columns"], "ignore_columns", "column names")
            values["ignore_columns"] = tuple(name.strip() for name in names)
        if "quality_column" in values:
            column = values["quality_column"]
            if not isinstance(column, str) or not column.strip():
                raise ConfigError(
                    f"data.quality_column: expected a column name, got {column!r}; a long "
                    "export without a quality column needs none (every sample is good)"
                )
            values["quality_column"] = column.strip()
        if "split" in values:
            values["split"] = _check_split(values["split"])
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Raise ConfigError for values outside their domain."""
        if not (self.dt_s > 0 and math.isfinite(self.dt_s)):
            raise ConfigError(f"data.dt_s must be > 0, got {self.dt_s}")
        if not self.max_gap_s >= self.dt_s:
            raise ConfigError(
                f"data.max_gap_s ({self.max_gap_s}) must be >= data.dt_s "
                f"({self.dt_s}), or every grid step would be a gap"
            )
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as err:
            raise ConfigError(f"data.timezone {self.timezone!r} is not an IANA zone") from err
        for key, value, allowed in (
            ("dst_policy", self.dst_policy, DST_POLICIES),
            ("out_of_range", self.out_of_range, OUT_OF_RANGE_POLICIES),
        ):
            if value not in allowed:
                raise ConfigError(f"data.{key} {value!r} is not one of {list(allowed)}")
        if not 0 <= self.max_bad_timestamp_fraction <= 1:
            raise ConfigError("data.max_bad_timestamp_fraction must be in [0, 1]")
        if not self.std_floor_fraction > 0:
            raise ConfigError("data.std_floor_fraction must be > 0")

    def as_manifest(self) -> dict:
        """The settings that shape the dataset, for the manifest (paths left out)."""
        out = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("raw_dir", "out_dir")
        }
        return {**out, "good_quality": list(self.good_quality),
                "ignore_columns": list(self.ignore_columns), "split": dict(self.split)}  # fmt: skip


def prepare_dataset(
    raw_dir: Path, out_dir: Path, *, tags: Mapping, data: Mapping, plant_name: str | None = None
) -> dict:
    """Validate, align and split a historian export into the prepared dataset.

    Args:
        raw_dir: the export folder: historian file(s) matching data.historian_glob (long or
            wide, CSV or Parquet), optional tag_dictionary.csv, runs.csv, events.csv,
            fault_labels.csv (docs/data_contracts.md section 1).
        out_dir: where runs/<segment>.parquet, rejects.csv and manifest.json go.
        tags: the `tags:` mapping of configs/plant/<plant>.yaml.
        data: the `data` config group (configs/data/cdc_default.yaml) as a plain dict.
        plant_name: recorded in the manifest as "plant".

    Returns:
        The manifest as written to out_dir/manifest.json.

    Raises:
        ConfigError: unknown `data` key or bad value, malformed tag dictionary.
        DataValidationError: a file that cannot be trusted (see validate.py), naming the
            file, the 1-based data row and the tag.
    """
    config = DataConfig.from_mapping(data)
    dictionary = TagDictionary.from_mapping(tags)
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    historian_files = find_historian_files(raw_dir, config.historian_glob)
    side = {name: raw_dir / name for name in SIDE_FILES if (raw_dir / name).is_file()}
    tables, runs = _read_export(historian_files, side, config, dictionary)
    result = validate(
        tables,
        dictionary,
        runs=runs,
        good_quality=config.good_quality,
        out_of_range=config.out_of_range,
        max_bad_timestamp_fraction=config.max_bad_timestamp_fraction,
    )
    segments, align_warnings = align_runs(
        result.valid, result.runs, dictionary, dt_s=config.dt_s, max_gap_s=config.max_gap_s
    )
    # a run without a valid sample has no segment: it takes no place in the split (it could
    # have taken train's only one)
    with_data = result.runs[result.runs["run_id"].isin({seg.run_id for seg in segments})]
    split = split_runs(with_data, fractions=config.split, seed=int(config.split["seed"]))
    stats, stat_warnings = normalisation(
        segments, split, dictionary, std_floor_fraction=config.std_floor_fraction
    )
    header = {
        "schema_version": SCHEMA_VERSION,
        "plant": plant_name,
        "dt_s": config.dt_s,
        "data": config.as_manifest(),
        "tags": {name: dictionary[name].as_manifest() for name in dictionary.names},
        "inputs": dictionary.with_role("input"),
        "disturbances": dictionary.with_role("disturbance"),
        "measurements": dictionary.with_role("measurement"),
        "normalisation": stats,
        "counts": {**result.counts, "empty_cells": sum(t.empty_cells for t in tables)},
        "constant_tags": result.constant_tags,
        "warnings": result.warnings + align_warnings + stat_warnings,
        "source": {
            "dir": raw_dir.as_posix(),
            "files": {p.name: sha256_file(p) for p in [*historian_files, *side.values()]},
        },
    }
    copies = {name: side[name] for name in COPIED if name in side}
    return write_dataset(
        out_dir, segments, split=split, rejects=result.rejects, copies=copies, manifest=header
    )


def _read_export(
    historian_files: list[Path], side: dict[str, Path], config: DataConfig, dictionary
) -> tuple[list[HistorianTable], pd.DataFrame | None]:
    """Read the historian files and the run table; every unit claim checked on the way."""
    if "tag_dictionary.csv" in side:
        check_units(read_tag_dictionary_units(side["tag_dictionary.csv"]), dictionary)
    tables = []
    for path in historian_files:
        tables.append(
            read_historian(
                path,
                timezone=config.timezone,
                dst_policy=config.dst_policy,
                timestamp_format=config.timestamp_format,
                tag_names=dictionary.names,
                quality_column=config.quality_column,
                ignore_columns=config.ignore_columns,
            )
        )
        check_units(tables[-1].unit_claims, dictionary)
    runs = None
    if "runs.csv" in side:
        runs = read_runs(side["runs.csv"], timezone=config.timezone,
                         timestamp_format=config.timestamp_format)  # fmt: skip
    return tables, runs


def find_historian_files(raw_dir: Path, pattern: str) -> list[Path]:
    """The historian files in `raw_dir`: names matching `pattern` with a CSV/Parquet suffix.

    Side files (tag_dictionary.csv, runs.csv, ...) never count, so a pattern like "*.csv"
    is safe. Files are returned sorted by name: their order is "file order" across files.

    Raises:
        DataValidationError: raw_dir missing, nothing matches, or the same export appears
            twice (historian.csv and historian.parquet), which would duplicate every row.
    """
    if not raw_dir.is_dir():
        raise DataValidationError(f"historian export folder {raw_dir} does not exist")
    found = sorted(
        p
        for p in raw_dir.glob(pattern)
        if p.is_file() and p.suffix.lower() in SUFFIXES and p.name not in SIDE_FILES
    )
    if not found:
        present = sorted(p.name for p in raw_dir.iterdir())[:20]
        raise DataValidationError(
            f"{raw_dir}: no historian file matches data.historian_glob={pattern!r} with a "
            f"suffix in {SUFFIXES}; the folder holds {present}"
        )
    stems = [p.stem for p in found]
    twins = sorted({s for s in stems if stems.count(s) > 1})
    if twins:
        raise DataValidationError(
            f"{raw_dir}: {twins} exist both as CSV and Parquet; keep one, or narrow "
            "data.historian_glob"
        )
    return found


def _strings(value: object, key: str, what: str) -> tuple[str, ...]:
    """A list of strings from the config (`data.<key>`); a lone string is one of them."""
    # Iterating a string would accept its letters: 'Good' would reject every 'Good' row.
    if isinstance(value, str):
        return (value,)
    if value is None or isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise ConfigError(f"data.{key} must be a list of {what}, got {value!r}")
    return tuple(str(item) for item in value)


def _check_split(split: object) -> dict:
    if not isinstance(split, Mapping):
        raise ConfigError(f"data.split: expected a mapping (train, val, test, seed), got {split!r}")
    valid = ("train", "val", "test", "seed")
    unknown = sorted(set(split) - set(valid))
    if unknown:
        raise ConfigError(f"data.split: unknown keys {unknown}; valid keys: {list(valid)}")
    out = {"train": 0.7, "val": 0.15, "test": 0.15, "seed": 0, **split}
    fractions = [config_number(out[k], f"data.split.{k}") for k in ("train", "val", "test")]
    if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ConfigError(f"data.split fractions must be >= 0 and sum to 1, got {fractions}")
    seed = config_number(out["seed"], "data.split.seed")
    if seed != int(seed):  # 1.9 ran as seed 1
        raise ConfigError(f"data.split.seed: expected a whole number, got {out['seed']!r}")
    return {
        "train": fractions[0],
        "val": fractions[1],
        "test": fractions[2],
        "seed": int(seed),
    }


def _number(key: str, value) -> float:
    return config_number(value, f"data.{key}")
