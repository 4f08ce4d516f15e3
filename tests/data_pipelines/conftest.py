"""Small historian exports written to tmp_path for the data pipeline tests.

The tag dictionary here is a four-tag line: one input, one disturbance, a 5 s NIR measurement
and a 60 s at-line weight, so multi-rate alignment shows up in a few hundred rows.
"""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

T0 = pd.Timestamp("2025-03-01T06:00:00Z")

SMALL_TAGS = {
    "FEED.SP": {
        "role": "input",
        "unit": "kg/h",
        "sample_period_s": 1.0,
        "range": [0.0, 10.0],
        "description": "feeder setpoint",
    },
    "HOPPER.MASS": {
        "role": "disturbance",
        "unit": "kg",
        "sample_period_s": 1.0,
        "range": [0.0, 30.0],
        "description": "hopper mass",
    },
    "NIR.CONC": {
        "role": "measurement",
        "unit": "%w/w",
        "sample_period_s": 5.0,
        "range": [0.0, 40.0],
        "description": "NIR API concentration",
    },
    "PRESS.WEIGHT": {
        "role": "measurement",
        "unit": "mg",
        "sample_period_s": 60.0,
        "range": [0.0, 1500.0],
        "description": "at-line tablet weight",
    },
}


def iso(ts: pd.Series | pd.DatetimeIndex) -> pd.Series:
    """Timestamps as the export writes them: ISO 8601, milliseconds, offset."""
    text = pd.Series(pd.DatetimeIndex(ts).strftime("%Y-%m-%dT%H:%M:%S.%f"))
    return text.str[:-3] + "+00:00"


def long_export(
    runs: list[dict], rng: np.random.Generator, *, period_s: dict | None = None
) -> pd.DataFrame:
    """A long-format export (timestamp as pd.Timestamp UTC, tag, value, quality) for runs.

    Each run dict has run_id, start (pd.Timestamp), duration_s, setpoint; tags are sampled at
    their dictionary period (or `period_s`), values inside their ranges.
    """
    periods = {name: spec["sample_period_s"] for name, spec in SMALL_TAGS.items()}
    periods.update(period_s or {})
    parts = []
    for run in runs:
        for name, period in periods.items():
            t = np.arange(0.0, run["duration_s"] + 1e-9, period)
            if name == "FEED.SP":  # a setpoint step half way through the run
                value = np.where(t < run["duration_s"] / 2, run["setpoint"], run["setpoint"] + 1)
            elif name == "HOPPER.MASS":
                value = 20.0 - 0.001 * t
            elif name == "NIR.CONC":
                value = 10.0 + rng.normal(0.0, 0.2, t.size)
            else:
                value = 250.0 + rng.normal(0.0, 2.0, t.size)
            parts.append(
                pd.DataFrame(
                    {
                        "timestamp": run["start"] + pd.to_timedelta(t, unit="s"),
                        "tag": name,
                        "value": value,
                        "quality": "Good",
                    }
                )
            )
    frame = pd.concat(parts, ignore_index=True)
    return frame.sort_values(["timestamp", "tag"], kind="stable").reset_index(drop=True)


def write_long_csv(frame: pd.DataFrame, path: Path) -> Path:
    """Write a long frame as the historian does (ISO timestamps with offset)."""
    out = frame.copy()
    if pd.api.types.is_datetime64_any_dtype(out["timestamp"]):
        out["timestamp"] = iso(out["timestamp"]).to_numpy()
    out.to_csv(path, index=False, lineterminator="\n")
    return path


def runs_table(runs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": [r["run_id"] for r in runs],
            "start": iso(pd.DatetimeIndex([r["start"] for r in runs])),
            "end": iso(
                pd.DatetimeIndex([r["start"] + pd.Timedelta(seconds=r["duration_s"]) for r in runs])
            ),
            "kind": [r.get("kind", "normal") for r in runs],
            "regime": [r.get("regime", "interpolation") for r in runs],
            "throughput_kg_h": 20.0,
            "api_fraction": 0.1,
            "blender_speed_rpm": 300.0,
        }
    )


def six_runs() -> list[dict]:
    """Four normal interpolation runs, one extrapolation run, one fault run; 10 min each."""
    kinds = [("normal", "interpolation")] * 4 + [
        ("normal", "extrapolation"),
        ("fault", "interpolation"),
    ]
    return [
        {
            "run_id": f"R{i + 1}",
            "start": T0 + pd.Timedelta(hours=i),
            "duration_s": 600.0,
            "setpoint": 2.0 + i,
            "kind": kind,
            "regime": regime,
        }
        for i, (kind, regime) in enumerate(kinds)
    ]


def write_export(
    raw: Path, frame: pd.DataFrame, runs: list[dict] | None, file_format: str = "csv"
) -> Path:
    """An export folder: historian.<format> (+ runs.csv when runs are given)."""
    raw.mkdir(parents=True, exist_ok=True)
    if file_format == "csv":
        write_long_csv(frame, raw / "historian.csv")
    else:
        frame.to_parquet(raw / "historian.parquet", index=False)
    if runs is not None:
        runs_table(runs).to_csv(raw / "runs.csv", index=False, lineterminator="\n")
    return raw


@pytest.fixture
def exports() -> SimpleNamespace:
    """The export-writing helpers of this file, for tests (conftest is not imported by name)."""
    return SimpleNamespace(
        T0=T0,
        iso=iso,
        long_export=long_export,
        write_long_csv=write_long_csv,
        runs_table=runs_table,
        six_runs=six_runs,
        write_export=write_export,
    )


@pytest.fixture
def small_tags() -> dict:
    return {name: dict(spec) for name, spec in SMALL_TAGS.items()}


@pytest.fixture
def data_config() -> dict:
    """The `data` config of the tests: cdc_default's keys, small values."""
    return {
        "dt_s": 5.0,
        "max_gap_s": 60.0,
        "timezone": "UTC",
        "split": {"train": 0.5, "val": 0.25, "test": 0.25, "seed": 0},
    }


@pytest.fixture
def six_run_export(tmp_path, np_rng) -> tuple[Path, pd.DataFrame, list[dict]]:
    """A clean long CSV export of six_runs() with runs.csv: (raw_dir, frame, runs)."""
    runs = six_runs()
    frame = long_export(runs, np_rng)
    return write_export(tmp_path / "raw", frame, runs), frame, runs


@pytest.fixture
def write_text(tmp_path):
    """Write a small file from literal text: write_text("historian.csv", "a,b\\n1,2\\n")."""

    def write(name: str, text: str, folder: str = "raw") -> Path:
        path = tmp_path / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return write
