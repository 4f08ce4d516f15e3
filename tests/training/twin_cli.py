"""Runs the `twin` command in a subprocess, as a user would, against a given MLflow store; and
builds the small dataset the twin-file tests (export, serving) train and export on."""

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

TWIN = Path(sys.executable).with_name("twin")
# `twin train` sizes for the tiny_cdc_dataset fixture: 12-row windows after 6 past rows,
# epochs of 2 batches of 4, one thread; each test module adds its epochs and model.
TINY_SIZES = [
    "datamodule.window_steps=12",
    "datamodule.past_steps=6",
    "datamodule.eval_window_steps=24",
    "datamodule.batch_size=4",
    "datamodule.windows_per_epoch=8",
    "num_threads=1",
]


def run_twin(
    cwd: Path, tracking_uri: str, *args: str, env: dict[str, str] | None = None,
    timeout: float = 1200,
) -> subprocess.CompletedProcess:  # fmt: skip
    """`twin <args>` in cwd with MLFLOW_TRACKING_URI set (plus `env`) and the shipped configs;
    never raises on a failing command (tests assert on its return code and output)."""
    env = {**os.environ, **(env or {}), "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("TWIN_CONFIG_DIR", None)
    return subprocess.run(
        [str(TWIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )  # export compiles three AOTInductor programs: minutes on two busy cores


# fit_monitor needs every tag sampled >= 30 times on the fit runs: the at-line assays (60 s,
# 300 s) are sampled every 30 s in the export dataset so that one 30-min run is enough.
AT_LINE_PERIOD_S = 30


def build_export_dataset(root: Path) -> Path:
    """4 normal runs of 30 min (train 2, val 1, test 1), at-line tags every 30 s, prepared
    under root/prepared (returned); the raw export goes to root/raw."""
    import yaml

    from data_pipelines import prepare_dataset
    from data_pipelines.plant_sim import write_historian_export
    from training.config_dir import SHIPPED_CONFIG_DIR

    def load(relative: str) -> dict:
        return yaml.safe_load((SHIPPED_CONFIG_DIR / relative).read_text())

    tags = load("plant/cdc_line.yaml")["tags"]
    for tag in ("PRESS.TABLET_WEIGHT", "PRESS.TABLET_API"):
        tags[tag] = {**tags[tag], "sample_period_s": AT_LINE_PERIOD_S}
    sim = {
        **load("sim/cdc_default.yaml"),
        "n_normal_runs": 4,
        "n_extrapolation_runs": 0,
        "n_fault_runs_per_kind": 0,
        "run_hours": 0.5,
        "n_setpoint_changes": 1,
    }
    write_historian_export(root / "raw", tags=tags, sim=sim, seed=0)
    data = {**load("data/cdc_default.yaml"), "raw_dir": str(root / "raw")}
    data["out_dir"] = str(root / "prepared")
    prepare_dataset(root / "raw", root / "prepared", tags=tags, data=data, plant_name="cdc_line")
    return root / "prepared"


TRAIN_TINY = ["model=mechanistic", *TINY_SIZES, "trainer.max_epochs=1"]
EXPORT_TINY = ["verify.update_steps=30", "verify.forecast_steps=24", "verify.max_runs=1",
               "num_threads=1"]  # fmt: skip
EXPORT_STDOUT = "export_stdout.txt"


class TwinBuild(NamedTuple):
    path: Path  # the exported TorchScript twin file; twin.pt2 and twin.aoti.pt2 lie beside it
    tracking_uri: str  # the SQLite MLflow store holding its registered version
    dataset: Path  # the prepared dataset it was trained on
    export_stdout: str  # what `twin export` printed


def build_twin_file(folder: Path) -> TwinBuild:
    """Train a tiny mechanistic twin (1 epoch) on build_export_dataset's runs and export it in
    its three formats into folder, through the CLI as a user would (4-8 min on 2 busy cores,
    most of it the AOTInductor compile). The export's output is kept in EXPORT_STDOUT.

    Raises:
        RuntimeError: `twin train` or `twin export` failed (its output is in the message).
    """
    folder.mkdir(parents=True, exist_ok=True)
    dataset = build_export_dataset(folder)
    uri = f"sqlite:///{folder / 'store.db'}"
    out = folder / "twin.pt"
    for args in (
        ["train", f"datamodule.path={dataset}", *TRAIN_TINY],
        ["export", f"data_path={dataset}", f"out={out}", *EXPORT_TINY],
    ):
        result = run_twin(folder, uri, *args)
        if result.returncode != 0:
            raise RuntimeError(f"twin {args[0]} failed:\n{result.stdout[-3000:]}"
                               f"\n{result.stderr[-3000:]}")  # fmt: skip
    (folder / EXPORT_STDOUT).write_text(result.stdout)
    return TwinBuild(out, uri, dataset, result.stdout)


def reuse_twin_build(folder: Path) -> TwinBuild:
    """A folder build_twin_file made before (TWIN_TEST_TWIN, while developing)."""
    stdout = folder / EXPORT_STDOUT
    return TwinBuild(folder / "twin.pt", f"sqlite:///{folder / 'store.db'}", folder / "prepared",
                     stdout.read_text() if stdout.is_file() else "")  # fmt: skip
