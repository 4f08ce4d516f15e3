"""The `twin` command as a user meets it: help, stage dispatch, errors."""

import os
import subprocess
import sys
from pathlib import Path

TWIN = str(Path(sys.executable).with_name("twin"))


def run_twin(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([TWIN, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_lists_every_stage_with_one_line_each():
    result = run_twin("--help")
    assert result.returncode == 0, result.stderr
    stage_lines = [line.split() for line in result.stdout.splitlines() if line.startswith("  ")]
    assert [words[0] for words in stage_lines] == [
        "generate",
        "prepare",
        "train",
        "evaluate",
        "export",
        "evaluate-faults",
        "evaluate-diversion",
        "serve",
        "scenario",
        "optimise",
    ]
    assert all(len(words) > 3 for words in stage_lines)


def test_no_stage_is_a_usage_error():
    result = run_twin()
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage: twin <stage>" in result.stderr


def test_unknown_stage_names_the_valid_ones():
    result = run_twin("trian")
    assert result.returncode == 2
    assert "unknown stage 'trian'" in result.stderr
    assert "generate, prepare" in result.stderr


def test_stage_overrides_reach_the_composed_config():
    result = run_twin("prepare", "data.dt_s=2.0", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "dt_s: 2.0" in result.stdout
    assert "NIR.API_CONC" in result.stdout


def test_a_refused_input_is_reported_as_its_message_not_a_traceback(tmp_path):
    # 25 lines of chained traceback came before the message that names the file and the fix
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "historian.csv").write_text("timestamp;tag;value;quality\n"
                                       "2025-03-01T06:00:00Z;PUMP.VOLTAGE;1,5;Good\n")  # fmt: skip
    overrides = ["plant=cascaded_tanks", "data=cascaded_tanks", f"data.raw_dir={raw}",
                 f"data.out_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_twin("prepare", *overrides, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("twin prepare: error: historian.csv: cannot read the file: ")
    assert "(its header is separated by semicolons; save it as comma-separated CSV UTF-8" in (
        result.stderr)
    # HYDRA_FULL_ERROR=1 asks for the traceback: it stays
    full = subprocess.run([TWIN, "prepare", *overrides], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr


def test_a_stage_started_in_the_same_second_as_another_gets_a_folder_of_its_own(tmp_path):
    # The folders are named to the second: two runs started in the same second shared one,
    # and the later one's config, log and checkpoint replaced the first's. Here the other run
    # holds every folder of the next minute.
    import datetime

    now = datetime.datetime.now()
    taken = [(now + datetime.timedelta(seconds=s)).strftime("%Y-%m-%d_%H-%M-%S")
             for s in range(-1, 60)]  # fmt: skip
    for stamp in taken:
        (tmp_path / "outputs" / "prepare" / stamp).mkdir(parents=True)
    result = run_twin("prepare", f"data.raw_dir={tmp_path / 'no_such_folder'}", cwd=tmp_path)
    assert result.returncode == 1
    folders = sorted(p.name for p in (tmp_path / "outputs" / "prepare").iterdir())
    [own] = [name for name in folders if name not in taken]
    assert own.endswith("-2") and own.removesuffix("-2") in taken
    assert (tmp_path / "outputs" / "prepare" / own / ".hydra" / "config.yaml").is_file()
    assert not [p for stamp in taken for p in (tmp_path / "outputs" / "prepare" / stamp).iterdir()]


def test_a_process_keeps_the_folder_it_claimed(tmp_path, monkeypatch):
    # Hydra resolves the folder's name more than once; each must give the same folder
    from training.cli import _own_folder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "x").mkdir(parents=True)  # another run's
    first = _own_folder("outputs/x")
    assert first == str(tmp_path / "outputs" / "x-2") and _own_folder("outputs/x") == first
    assert (tmp_path / "outputs" / "x-2").is_dir() and not (tmp_path / "outputs" / "x-3").exists()
