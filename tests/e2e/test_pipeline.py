"""The data stages end to end through the `twin` command and through DVC, on real files."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SMALL_CAMPAIGN = {
    "n_normal_runs": 5, "n_extrapolation_runs": 1, "n_fault_runs_per_kind": 1, "run_hours": 0.5,
}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("TWIN_CONFIG_DIR", None)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_manifest_matches_files(prepared: Path) -> dict:
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["files"], "manifest lists no files"
    for relative, digest in manifest["files"].items():
        assert sha256(prepared / relative) == digest, relative
    counts = manifest["counts"]
    assert counts["rows_in"] == counts["rows_valid"] + counts["rows_rejected"]
    return manifest


def test_generate_then_prepare_writes_a_dataset_whose_manifest_matches_its_files(tmp_path):
    overrides = [f"sim.{key}={value}" for key, value in SMALL_CAMPAIGN.items()]
    run(["twin", "generate", *overrides, "file_format=csv"], cwd=tmp_path)
    result = run(["twin", "prepare", "data.dt_s=2.0"], cwd=tmp_path)
    assert "rejected (see rejects.csv)" in result.stdout
    manifest = assert_manifest_matches_files(tmp_path / "data" / "prepared")
    assert manifest["dt_s"] == 2.0
    assert len(manifest["splits"]["fault"]) == 5
    assert manifest["splits"]["train"]
    rejected = manifest["counts"]["rows_rejected"]
    rejects_rows = (tmp_path / "data/prepared/rejects.csv").read_text().splitlines()[1:]
    assert len(rejects_rows) == rejected


def _project_copy(destination: Path) -> Path:
    """The files a fresh clone needs for `dvc repro`, with a small campaign configured."""
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, destination / name)
    for folder in ("configs", "data_pipelines", ".dvc"):
        shutil.copytree(REPO / folder, destination / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    (destination / "training").mkdir()  # the stages' entry points (dvc.yaml deps)
    for module in ("data_stages.py", "cli.py", "config_dir.py"):
        shutil.copy(REPO / "training" / module, destination / "training")
    (destination / "data").mkdir()
    shutil.copy(REPO / "data" / ".gitignore", destination / "data" / ".gitignore")
    sim_file = destination / "configs" / "sim" / "cdc_default.yaml"
    sim = yaml.safe_load(sim_file.read_text())
    sim_file.write_text(yaml.safe_dump({**sim, **SMALL_CAMPAIGN}, sort_keys=False))
    return destination


@pytest.mark.slow
def test_dvc_repro_runs_both_stages_in_a_fresh_project_and_then_has_nothing_to_do(tmp_path):
    project = _project_copy(tmp_path)
    run(["git", "init", "-q"], cwd=project)
    first = run(["dvc", "repro"], cwd=project)
    assert "Running stage 'generate'" in first.stdout
    assert "Running stage 'prepare'" in first.stdout
    assert_manifest_matches_files(project / "data" / "prepared")
    second = run(["dvc", "repro"], cwd=project)
    assert "Running stage" not in second.stdout
    # a module prepare runs but did not list once (run splitting) now makes it stale
    with (project / "data_pipelines" / "runs.py").open("a") as module:
        module.write("# changed\n")
    status = run(["dvc", "status"], cwd=project)
    assert "prepare:" in status.stdout and "data_pipelines/runs.py" in status.stdout
    # so does a key added to a stage's own config file (only seed and file_format of
    # generate.yaml were tracked, prepare.yaml not at all)
    for config in ("generate", "prepare"):
        with (project / "configs" / f"{config}.yaml").open("a") as file:
            file.write("extra_key: 1\n")
    status = run(["dvc", "status"], cwd=project)
    assert "generate:" in status.stdout and "configs/generate.yaml" in status.stdout
    assert "configs/prepare.yaml" in status.stdout
