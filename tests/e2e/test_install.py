"""scripts/install.sh refuses a torch version the project install would replace, a build it
cannot give, and a misspelt build."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_install(venv: Path, torch_version: str, build: str = "cpu") -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "TWIN_TORCH_VERSION": torch_version}
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh"), str(venv)],
        cwd=ROOT,
        env={**env, "PYTHON": sys.executable, "TWIN_TORCH_BUILD": build},
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


def test_a_misspelt_build_is_refused_before_the_venv_is_made(tmp_path):
    # TWIN_TORCH_BUILD=gpux installed the CPU build and exited 0
    result = run_install(tmp_path / "venv", "2.13.0", build="gpux")
    assert result.returncode == 2
    assert "TWIN_TORCH_BUILD=gpux: expected cpu or cuda" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_a_cpu_torch_left_in_the_venv_is_not_kept_when_cuda_is_asked_for(tmp_path):
    # A failed CUDA install used to leave its CPU torch behind; the rerun kept it, exit 0.
    # A stand-in torch (version and build only) plays the one left behind.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    [site] = venv.glob("lib/python*/site-packages")
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text(
        "__version__ = '2.13.0+cpu'\n\nclass version:\n    cuda = None\n"
    )
    result = run_install(venv, "2.13.0", build="cuda")
    assert result.returncode == 1
    assert "the torch already in" in result.stderr and "is a CPU build" in result.stderr
    assert not (venv / ".installed").exists()
