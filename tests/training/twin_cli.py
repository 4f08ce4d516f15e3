"""Runs the `twin` command in a subprocess, as a user would, against a given MLflow store."""

import os
import subprocess
import sys
from pathlib import Path

TWIN = Path(sys.executable).with_name("twin")


def run_twin(cwd: Path, tracking_uri: str, *args: str) -> subprocess.CompletedProcess:
    """`twin <args>` in cwd with MLFLOW_TRACKING_URI set and the shipped configs; never raises
    on a failing command (tests assert on its return code and output)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("TWIN_CONFIG_DIR", None)
    return subprocess.run(
        [str(TWIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
