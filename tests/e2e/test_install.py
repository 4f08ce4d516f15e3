"""scripts/install.sh refuses a torch version the project install would replace."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_install(venv: Path, torch_version: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "TWIN_TORCH_VERSION": torch_version}
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh"), str(venv)],
        cwd=ROOT,
        env={**env, "PYTHON": sys.executable, "TWIN_TORCH_BUILD": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_torch_version_outside_the_project_range_is_refused_before_installing(tmp_path):
    # pip install -e . would replace torch 2.3 with a bare torch from the index (the CUDA build)
    result = run_install(tmp_path / "venv", "2.3.0")
    assert result.returncode == 1
    assert "TWIN_TORCH_VERSION gives torch '2.3.0', outside the project's range" in result.stderr
    assert "torch<2.15,>=2.4" in result.stderr
    assert not list((tmp_path / "venv").glob("lib/python*/site-packages/torch"))


def test_a_version_that_is_no_version_is_refused_by_name(tmp_path):
    result = run_install(tmp_path / "venv", "latest")
    assert result.returncode == 1
    assert "TWIN_TORCH_VERSION gives torch 'latest'" in result.stderr
