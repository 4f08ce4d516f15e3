"""Runs the `twin` command in a subprocess, as a user would, against a given MLflow store."""

import os
import subprocess
import sys
from pathlib import Path

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


def run_twin(cwd: Path, tracking_uri: str, *args: str) -> subprocess.CompletedProcess:
    """`twin <args>` in cwd with MLFLOW_TRACKING_URI set and the shipped configs; never raises
    on a failing command (tests assert on its return code and output)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("TWIN_CONFIG_DIR", None)
    return subprocess.run(
        [str(TWIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
