"""A small prepared dataset on disk, written exactly as docs/data_contracts.md section 3 says.

Seven run segments on a 5 s grid, with values that identify where they came from, so a test
can trace any window back to its file and rows:

- FEED_API.MASSFLOW_SP (input) = the row number in the segment's file;
- FEED_API.HOPPER_MASS (disturbance) = 10 * the segment's code (last field of RUNS);
- BLEND.SPEED_SP (input) = 600 rpm, stepped to 650 rpm half-way through R001;
- FEED_API.MASSFLOW (1 s load cell): 5 samples per cell, a few cells with none;
- NIR.API_CONC (5 s): 1 sample per cell, every 7th cell missed;
- PRESS.TABLET_WEIGHT (60 s at-line): 1 sample on rows 0, 12, 24, ... only.

R002 was split by a gap into R002 and R002_s1; R002_s1's API setpoint has no held value on its
first LEADING_NAN_ROWS rows. R003 is too short for a window of the sizes the tests use.
Tests restate the few numbers they check against, since a conftest is not importable.
"""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest

DT_S = 5.0
INPUTS = ["FEED_API.MASSFLOW_SP", "BLEND.SPEED_SP"]
DISTURBANCES = ["FEED_API.HOPPER_MASS"]
MEASUREMENTS = ["FEED_API.MASSFLOW", "NIR.API_CONC", "PRESS.TABLET_WEIGHT"]
TAGS = {  # as in configs/plant/cdc_line.yaml
    "FEED_API.MASSFLOW_SP": {
        "role": "input",
        "unit": "kg/h",
        "sample_period_s": 1.0,
        "range": [0.0, 10.0],
    },
    "BLEND.SPEED_SP": {
        "role": "input",
        "unit": "rpm",
        "sample_period_s": 1.0,
        "range": [0.0, 1200.0],
    },
    "FEED_API.HOPPER_MASS": {
        "role": "disturbance",
        "unit": "kg",
        "sample_period_s": 1.0,
        "range": [0.0, 30.0],
    },
    "FEED_API.MASSFLOW": {
        "role": "measurement",
        "unit": "kg/h",
        "sample_period_s": 1.0,
        "range": [0.0, 15.0],
    },
    "NIR.API_CONC": {
        "role": "measurement",
        "unit": "%w/w",
        "sample_period_s": 5.0,
        "range": [0.0, 40.0],
    },
    "PRESS.TABLET_WEIGHT": {
        "role": "measurement",
        "unit": "mg",
        "sample_period_s": 60.0,
        "range": [0.0, 1500.0],
    },
}
# run id: (split, rows, source run, code)
RUNS = {
    "R001": ("train", 80, "R001", 1),
    "R002": ("train", 60, "R002", 2),
    "R002_s1": ("train", 40, "R002", 3),
    "R003": ("train", 8, "R003", 4),
    "R004": ("val", 50, "R004", 5),
    "R005": ("test", 47, "R005", 6),
    "R006": ("fault", 30, "R006", 7),
}
LEADING_NAN_ROWS = 3
TABLET_EVERY_ROWS = 12  # 60 s sample period / 5 s grid


class SyntheticDataset(NamedTuple):
    path: Path
    frames: dict[str, pd.DataFrame]  # the raw run files as written
    manifest: dict


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def synthetic_frames(seed: int) -> dict[str, pd.DataFrame]:
    """The run segments as the data contract lays them out (before writing)."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2025-03-01T06:00:00", tz="UTC")
    frames = {}
    for offset_h, (run_id, (_, rows, _, code)) in enumerate(RUNS.items()):
        row = np.arange(rows)
        time_s = row * DT_S
        frame = pd.DataFrame(
            {
                "time_s": time_s.astype(np.float64),
                "timestamp": start + pd.Timedelta(hours=offset_h) + pd.to_timedelta(time_s, "s"),
                "FEED_API.MASSFLOW_SP": row.astype(np.float64),
                "BLEND.SPEED_SP": np.where((run_id == "R001") & (row >= rows // 2), 650.0, 600.0),
                "FEED_API.HOPPER_MASS": np.full(rows, 10.0 * code),
            }
        )
        counts = {
            "FEED_API.MASSFLOW": np.where(rng.random(rows) < 0.1, 0, 5),
            "NIR.API_CONC": np.where(row % 7 == 6, 0, 1),
            "PRESS.TABLET_WEIGHT": np.where(row % TABLET_EVERY_ROWS == 0, 1, 0),
        }
        values = {
            "FEED_API.MASSFLOW": 3.0 + 0.2 * np.sin(row / 5.0) + 0.01 * rng.standard_normal(rows),
            "NIR.API_CONC": 12.0 + 0.5 * rng.standard_normal(rows),
            "PRESS.TABLET_WEIGHT": 250.0 + 2.0 * rng.standard_normal(rows),
        }
        for tag in MEASUREMENTS:
            frame[tag] = np.where(counts[tag] > 0, values[tag], np.nan)
        for tag in MEASUREMENTS:
            frame[tag + "__n"] = counts[tag].astype(np.int16)
        frames[run_id] = frame
    frames["R002_s1"].loc[: LEADING_NAN_ROWS - 1, "FEED_API.MASSFLOW_SP"] = np.nan
    return frames


def _train_stats(frames: dict[str, pd.DataFrame]) -> dict[str, dict[str, float]]:
    train = pd.concat([frames[r] for r, spec in RUNS.items() if spec[0] == "train"])
    return {
        tag: {"mean": float(train[tag].mean()), "std": float(train[tag].std(ddof=0))}
        for tag in TAGS
    }


def write_prepared_dataset(
    root: Path, frames: dict[str, pd.DataFrame], normalisation: dict | None = None
) -> dict:
    """Write runs/, rejects.csv, events.csv, fault_labels.csv and manifest.json to root."""
    (root / "runs").mkdir(parents=True)
    files, runs = {}, {}
    for run_id, frame in frames.items():
        relative = f"runs/{run_id}.parquet"
        frame.to_parquet(root / relative, index=False)
        files[relative] = _sha256(root / relative)
        split, rows, source, _ = RUNS[run_id]
        runs[run_id] = {
            "file": relative,
            "sha256": files[relative],
            "n_rows": len(frame),
            "start": frame["timestamp"].iloc[0].isoformat(),
            "end": frame["timestamp"].iloc[-1].isoformat(),
            "kind": "fault" if split == "fault" else "normal",
            "regime": "interpolation",
            "split": split,
            "source_run": source,
        }
    (root / "rejects.csv").write_text(
        "file,row,timestamp,tag,value,quality,reason\n"
        "historian.parquet,17,2025-03-01T06:01:25.000+00:00,NIR.API_CONC,,Bad,bad quality\n"
    )
    (root / "events.csv").write_text("timestamp,run_id,event,unit,tag,value\n")
    (root / "fault_labels.csv").write_text(
        "run_id,fault_kind,onset,end,magnitude,affected_unit,affected_tag\n"
        "R006,nir_fouling,2025-03-01T12:01:00+00:00,2025-03-01T12:02:00+00:00,0.5,NIR,"
        "NIR.API_CONC\n"
    )
    for name in ("rejects.csv", "events.csv", "fault_labels.csv"):
        files[name] = _sha256(root / name)
    stats = _train_stats(frames)
    stats.update(normalisation or {})
    manifest = {
        "schema_version": 1,
        "plant": "cdc_line",
        "dt_s": DT_S,
        "tags": TAGS,
        "inputs": INPUTS,
        "disturbances": DISTURBANCES,
        "measurements": MEASUREMENTS,
        "normalisation": stats,
        "splits": {
            split: [r for r, spec in RUNS.items() if spec[0] == split]
            for split in ("train", "val", "test", "fault")
        },
        "runs": runs,
        "counts": {
            "rows_in": 5000,
            "rows_valid": 4999,
            "rows_rejected": 1,
            "rejected_by_reason": {"bad quality": 1},
        },
        "files": files,
        "source": {"dir": "data/raw", "files": {"historian.parquet": "0" * 64}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


@pytest.fixture
def make_dataset(tmp_path: Path, seed: int) -> Callable[..., SyntheticDataset]:
    """Build a variant: edit(frames) changes the raw runs, normalisation overrides stats."""
    counter = iter(range(1000))

    def build(
        edit: Callable[[dict], None] | None = None, normalisation: dict | None = None
    ) -> SyntheticDataset:
        frames = synthetic_frames(seed)
        if edit is not None:
            edit(frames)
        root = tmp_path / f"prepared_{next(counter)}"
        manifest = write_prepared_dataset(root, frames, normalisation)
        return SyntheticDataset(root, frames, manifest)

    return build


@pytest.fixture
def prepared(make_dataset) -> SyntheticDataset:
    """The default synthetic prepared dataset."""
    return make_dataset()


# -- A tiny dataset of the real CDC line, for training tests (TwinModel needs every tag) ----

TINY_SIM = {  # 4 normal runs of 15 min: train 2, val 1, test 1 (181 rows of 5 s each)
    "n_normal_runs": 4,
    "n_extrapolation_runs": 0,
    "n_fault_runs_per_kind": 0,
    "run_hours": 0.25,
    "n_setpoint_changes": 1,
}


@pytest.fixture(scope="session")
def tiny_cdc_dataset(tmp_path_factory) -> Path:
    """A prepared dataset simulated by plant_sim and written by `prepare_dataset` (~1 s).

    Returns:
        The prepared folder (holding manifest.json), shared by the session: do not modify.
    """
    import yaml

    from data_pipelines import prepare_dataset
    from data_pipelines.plant_sim import write_historian_export
    from training.config_dir import SHIPPED_CONFIG_DIR

    def load(relative: str) -> dict:
        return yaml.safe_load((SHIPPED_CONFIG_DIR / relative).read_text())

    root = tmp_path_factory.mktemp("tiny_cdc")
    tags = load("plant/cdc_line.yaml")["tags"]
    sim = {**load("sim/cdc_default.yaml"), **TINY_SIM}
    write_historian_export(root / "raw", tags=tags, sim=sim, seed=0)
    data = {**load("data/cdc_default.yaml"), "raw_dir": str(root / "raw")}
    data["out_dir"] = str(root / "prepared")
    prepare_dataset(root / "raw", root / "prepared", tags=tags, data=data, plant_name="cdc_line")
    return root / "prepared"


@pytest.fixture(scope="session")
def tiny_tanks_dataset(tmp_path_factory) -> Path:
    """The first 120 rows of both Cascaded Tanks records (real measurements,
    tests/data/cascaded_tanks_head.csv), exported and prepared as `make tanks` does."""
    import yaml

    from data_pipelines.cascaded_tanks import write_export
    from data_pipelines.prepare import prepare_dataset
    from training.config_dir import SHIPPED_CONFIG_DIR

    folder = tmp_path_factory.mktemp("tanks")
    head = Path(__file__).resolve().parents[1] / "data" / "cascaded_tanks_head.csv"
    write_export(head, folder / "raw")
    plant = yaml.safe_load((SHIPPED_CONFIG_DIR / "plant" / "cascaded_tanks.yaml").read_text())
    data = yaml.safe_load((SHIPPED_CONFIG_DIR / "data" / "cascaded_tanks.yaml").read_text())
    prepare_dataset(folder / "raw", folder / "prepared", tags=plant["tags"], data=data)
    return folder / "prepared"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module's tests (`pytest.mark.usefixtures`): their
    batches are tiny, and a second thread only contends on a shared machine (a hybrid step
    took 10x longer with 2 threads under load)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
