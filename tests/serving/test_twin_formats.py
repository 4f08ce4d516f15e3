"""Format detection, the PT2 caller rules, `format: auto` and its fallbacks, on a toy twin.

Fast unit tests (no trained twin, no server): tests/serving/toy_twin.py writes the files. The
real twin's three files, served, are in tests/serving/test_formats.py.
"""

import re
import shutil

import pytest
import torch

from serving.settings import SettingsError, load_settings
from serving.twin_file import TwinFileError, load_twin_file, load_twin_path
from serving.twin_formats import (
    ProgramFileError,
    ProgramTwin,
    detect_format,
    format_order,
)
from tests.serving.toy_twin import (
    METADATA,
    ToyTwin,
    examples,
    export_bytes,
    fake_aoti_bytes,
    write_export_set,
    write_torchscript,
)

# aoti fastest (but a fake that cannot load), then export, then torchscript
LATENCY = {"aoti": {"update_p99_ms": 0.4}, "export": {"update_p99_ms": 1.0},
           "torchscript": {"update_p99_ms": 3.0}}  # fmt: skip
EXACT = {"rtol": 0.0, "atol": 0.0}


@pytest.fixture(scope="module")
def toy_set(tmp_path_factory):
    """twin.pt, twin.pt2 and a fake twin.aoti.pt2 of one toy export (written once)."""
    return write_export_set(tmp_path_factory.mktemp("toy_set"), LATENCY)


@pytest.fixture
def folder(toy_set, tmp_path):
    """A copy of the toy export the test may damage."""
    for file in toy_set.parent.iterdir():
        shutil.copy(file, tmp_path / file.name)
    return tmp_path


class Recorder:
    """A program that records its arguments' layout and answers as the toy twin does."""

    def __init__(self, name: str, min_horizon: int = 2) -> None:
        self.method = getattr(ToyTwin(), name)
        self.min_horizon = min_horizon
        self.calls: list[list] = []

    def __call__(self, *args):
        self.calls.append([(tuple(a.shape), a.is_contiguous()) for a in args])
        if len(args) == 3 and args[2].shape[1] < self.min_horizon:
            raise RuntimeError("horizon below the program's minimum")
        out = self.method(*args)
        return list(out) if isinstance(out, tuple) else out  # AOTI runners answer with lists


def test_program_twin_gives_the_programs_contiguous_inputs():
    programs = {m: Recorder(m) for m in ("initial_state", "update", "forecast")}
    twin = ProgramTwin(programs, "aoti")
    args = examples(batch=3, past=4, horizon=5)
    strided = {m: tuple(a.transpose(0, -1).contiguous().transpose(0, -1) if a.dim() > 1 else a
                        for a in args[m]) for m in args}  # fmt: skip
    assert not strided["forecast"][0].is_contiguous()
    state = twin.initial_state(*strided["initial_state"])
    out = twin.update(*strided["update"])
    y = twin.forecast(*strided["forecast"])
    assert all(ok for p in programs.values() for call in p.calls for _, ok in call)
    assert isinstance(state, tuple) and len(state) == 5
    assert isinstance(out, tuple) and len(out) == 14  # a list from the runner becomes a tuple
    torch.testing.assert_close(y, ToyTwin().forecast(*args["forecast"]), **EXACT)


def test_a_one_row_forecast_is_padded_to_the_programs_minimum_and_cut_back():
    program = Recorder("forecast", min_horizon=2)
    twin = ProgramTwin({"forecast": program}, "aoti", min_horizon=2)
    past_u, past_y, u = examples(batch=2, past=3, horizon=1)["forecast"]
    y = twin.forecast(past_u, past_y, u)
    assert y.shape == (2, 1, 2)
    assert program.calls[-1][2] == ((2, 2, 2), True)  # the row repeated to two
    torch.testing.assert_close(y, ToyTwin().forecast(past_u, past_y, u), **EXACT)


def test_a_batch_above_the_programs_limit_runs_in_chunks_with_the_same_answer():
    programs = {m: Recorder(m) for m in ("update", "forecast")}
    twin = ProgramTwin(programs, "export", max_batch=2)
    args = examples(batch=5, past=3, horizon=3)
    out = twin.update(*args["update"])
    y = twin.forecast(*args["forecast"])
    assert [c[0][0][0] for c in programs["update"].calls] == [2, 2, 1]
    for got, expected in zip(out, ToyTwin().update(*args["update"]), strict=True):
        torch.testing.assert_close(got, expected, **EXACT)
    torch.testing.assert_close(y, ToyTwin().forecast(*args["forecast"]), **EXACT)


def test_auto_ranks_the_exports_formats_by_measured_update_p99():
    meta = {"files": {"torchscript": "twin.pt", "export": "twin.pt2", "aoti": "a.pt2",
                      "onnx": "twin.onnx"},
            "formats": {"torchscript": {"update_p99_ms": 2.0}, "export": {"update_p99_ms": 9.0},
                        "aoti": {"update_p99_ms": 0.5}}}  # fmt: skip
    assert format_order(meta, "torchscript") == ["aoti", "torchscript", "export"]
    unmeasured = {"files": meta["files"], "formats": {"export": {"update_p99_ms": 1.0}}}
    assert format_order(unmeasured, "torchscript") == ["export", "torchscript", "aoti"]
    assert format_order({}, "torchscript") == ["torchscript"]  # an export before the formats


def test_the_format_is_read_from_the_files_content(toy_set):
    folder = toy_set.parent
    assert detect_format((folder / "twin.pt").read_bytes()) == "torchscript"
    assert detect_format((folder / "twin.pt2").read_bytes()) == "export"
    assert detect_format((folder / "twin.aoti.pt2").read_bytes()) == "aoti"
    data = (folder / "twin.pt2").read_bytes()
    with pytest.raises(ProgramFileError, match="not a readable zip archive"):
        detect_format(data[: len(data) // 2])


def test_the_export_format_answers_as_the_torchscript_file(toy_set):
    scripted = load_twin_file(toy_set)
    exported = load_twin_file(toy_set.with_name("twin.pt2"))
    assert (scripted.format, exported.format) == ("torchscript", "export")
    assert exported.interface == scripted.interface
    args = examples(batch=3, past=4, horizon=1)
    with torch.inference_mode():
        for method in ("initial_state", "update", "forecast"):
            a = getattr(scripted.module, method)(*args[method])
            b = getattr(exported.module, method)(*args[method])
            for x, y in zip(*(t if isinstance(t, tuple) else (t,) for t in (a, b)), strict=True):
                torch.testing.assert_close(y, x, **EXACT)


def test_auto_serves_the_fastest_that_loads_and_says_why_it_skipped_the_others(folder):
    twin = load_twin_path(folder / "twin.pt", "auto")
    assert twin.format == "export" and twin.file == str(folder / "twin.pt2")
    ((skipped, reason),) = twin.skipped
    assert skipped == "aoti" and "does not load on this machine" in reason
    assert str(folder / "twin.aoti.pt2") in reason
    assert twin.entry_sha256 == load_twin_file(folder / "twin.pt").sha256


def test_a_format_asked_for_loads_that_file_or_fails_naming_it(folder):
    assert load_twin_path(folder / "twin.pt", "torchscript").format == "torchscript"
    assert load_twin_path(folder / "twin.pt2", "torchscript").format == "torchscript"
    with pytest.raises(TwinFileError, match=r"twin.aoti.pt2 \(aoti format\): the AOTInductor "
                                            r"package does not load on this machine"):
        load_twin_path(folder / "twin.pt", "aoti")
    (folder / "twin.pt2").unlink()
    with pytest.raises(TwinFileError, match=r"twin.pt2: no such file"):
        load_twin_path(folder / "twin.pt", "export")


def test_a_pt2_file_named_is_served_as_it_is(folder):
    assert load_twin_path(folder / "twin.pt2", "auto").format == "export"
    with pytest.raises(TwinFileError, match="does not load on this machine"):
        load_twin_path(folder / "twin.aoti.pt2", "auto")  # named: no fallback


def test_a_truncated_pt2_is_an_error_naming_the_file_and_the_cause_or_skipped_by_auto(folder):
    pt2 = folder / "twin.pt2"
    data = pt2.read_bytes()
    pt2.write_bytes(data[: len(data) // 3])
    expected = rf"twin file {pt2} \({len(data) // 3} bytes\) is not a readable PT2 archive"
    with pytest.raises(TwinFileError, match=expected):
        load_twin_path(pt2, "auto")
    with pytest.raises(TwinFileError, match=expected):
        load_twin_path(folder / "twin.pt", "export")
    twin = load_twin_path(folder / "twin.pt", "auto")  # aoti fails, export fails: torchscript
    assert twin.format == "torchscript"
    assert [f for f, _ in twin.skipped] == ["aoti", "export"]
    assert "is not a readable PT2 archive" in twin.skipped[1][1]


def test_a_pt2_archive_without_a_program_is_refused(tmp_path):
    path = tmp_path / "twin.pt2"
    path.write_bytes(export_bytes({**METADATA, "format": "export"},
                                  methods=("initial_state", "forecast")))  # fmt: skip
    with pytest.raises(TwinFileError, match=r"lacks program\(s\) \['update'\]"):
        load_twin_file(path)


def test_an_aoti_package_of_another_torch_is_refused_before_it_is_loaded(tmp_path):
    path = tmp_path / "twin.aoti.pt2"
    path.write_bytes(fake_aoti_bytes({**METADATA, "format": "aoti", "torch_version": "2.9.1"}))
    with pytest.raises(TwinFileError, match=r"compiled by torch 2.9.1, this service runs torch"):
        load_twin_file(path)


def test_a_file_left_beside_the_entry_by_another_export_is_refused(folder, tmp_path_factory):
    other = write_export_set(tmp_path_factory.mktemp("other"), {"export": {}},
                             training_run_id="another-run")  # fmt: skip
    shutil.copy(other.with_name("twin.pt2"), folder / "twin.pt2")
    with pytest.raises(TwinFileError, match=r"not from the export that wrote .*twin.pt .*"
                                            r"differs in \['files', 'formats', 'training_run_id'"):
        load_twin_path(folder / "twin.pt", "export")
    assert load_twin_path(folder / "twin.pt", "auto").format == "torchscript"


def test_metadata_naming_another_format_than_the_file_holds_is_refused(tmp_path):
    path = tmp_path / "twin.pt2"
    path.write_bytes(export_bytes({**METADATA, "format": "aoti"}))
    with pytest.raises(TwinFileError, match="metadata.json says format 'aoti', the file holds "
                                            "export"):
        load_twin_file(path)


@pytest.mark.parametrize(("field", "value"), [
    ("input_tags", None), ("measurement_tags", "Y1"), ("state_names", ["x1", "x1"]),
    ("units", {"U1": 3}), ("dt_s", "5"), ("dtype", ["float64"]), ("past_steps", 0),
    ("files", ["twin.pt"]), ("program_shapes", {"past_rows": 2}),
])  # fmt: skip
def test_a_metadata_field_of_the_wrong_type_is_refused_naming_the_file_and_field(
    tmp_path, field, value
):
    path = write_torchscript(tmp_path / "twin.pt", {**METADATA, field: value})
    named = rf"twin file {re.escape(str(path))}: metadata.json field '{field}' is .*, expected "
    for load in (load_twin_file, load_twin_path):  # load_twin_path reads `files` first
        with pytest.raises(TwinFileError, match=named):
            load(path)


def test_an_unknown_format_setting_is_refused_naming_the_choices():
    with pytest.raises(SettingsError, match=r"format: Input should be 'auto', 'torchscript', "
                                            r"'export' or 'aoti'"):
        load_settings({"model_uri": "twin.pt", "format": "onnx", "insecure": True}, {})
