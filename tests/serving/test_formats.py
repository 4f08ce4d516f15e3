"""The real twin's three files: each runs with torch alone, and the service answers the same
with each (issue 10).

The session's twin build (tests/serving/twin_file.py) exports twin.pt, twin.pt2 and
twin.aoti.pt2 with the `twin` CLI. Reference: the TorchScript file run by plain torch. The
export verifies every format against the eager model to 1e-6 of each quantity's scale, so two
formats may differ by twice that; the tolerance below is that bound, relative and absolute
(measured differences are far below it: float64 rounding, op order).
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import httpx
import pytest
import torch

from tests.serving.reference import replay, tensors
from tests.serving.server import run_serve, start_server, stop_server
from tests.tolerances import tol

PAST = 6  # the tiny twin's past_steps
FORMATS = ("torchscript", "export", "aoti")
CLOSE = {"rtol": 2 * tol("scripted_vs_eager"), "atol": 2 * tol("scripted_vs_eager")}
EXIT_TIMEOUT_S = 120


def _close(actual, expected: torch.Tensor) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               expected.to(torch.float64), **CLOSE)  # fmt: skip


@pytest.fixture(scope="session")
def format_files(twin_build, metadata) -> dict:
    """format -> the file the build's export wrote for it (metadata.json `files`)."""
    files = {fmt: twin_build.path.with_name(name) for fmt, name in metadata["files"].items()}
    assert set(files) == set(FORMATS), f"the export wrote {sorted(files)}"
    return files


# Run in a fresh interpreter: only torch (and the standard library) may be imported. The
# caller rules of the PT2 programs (docs/export.md) are applied by hand, as a plant system
# calling the files directly would.
TORCH_ONLY = r"""
import json, sys
import torch
from torch.export.pt2_archive._package import load_pt2

files, inputs, out_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
args = torch.load(inputs)
methods = {}
extra = {"metadata.json": ""}
ts = torch.jit.load(files["torchscript"], _extra_files=extra)
methods["torchscript"] = {m: getattr(ts, m) for m in ("initial_state", "update", "forecast")}
meta = {"torchscript": json.loads(extra["metadata.json"])}
for fmt in ("export", "aoti"):
    contents = load_pt2(files[fmt])
    meta[fmt] = json.loads(contents.extra_files["metadata.json"])
    if fmt == "aoti":
        methods[fmt] = dict(contents.aoti_runners)
    else:
        methods[fmt] = {m: p.module() for m, p in contents.exported_programs.items()}

def call(fmt, name, *a):
    out = methods[fmt][name](*(t.contiguous() for t in a))
    return list(out) if isinstance(out, (list, tuple)) else [out]

results = {}
with torch.no_grad():
    for fmt in methods:
        past_u, past_y, future_u = args["past_u"], args["past_y"], args["future_u"]
        state = call(fmt, "initial_state", past_u, past_y)
        rows = [state]
        for k in range(args["rows_u"].shape[1]):
            y = args["rows_y"][:, k]
            out = call(fmt, "update", *state, args["rows_u"][:, k], y, torch.isfinite(y))
            state = out[:5]
            rows.append(out)
        # a 1-row horizon: TorchScript takes it; a PT2 program gets the row twice, first kept
        one = future_u[:, :1] if fmt == "torchscript" else future_u[:, :1].expand(-1, 2, -1)
        results[fmt] = {"rows": rows, "forecast": call(fmt, "forecast", past_u, past_y, future_u),
                        "forecast_1": [call(fmt, "forecast", past_u, past_y, one)[0][:, :1]],
                        "format": meta[fmt].get("format")}
bad = [m for m in sys.modules if m.split(".")[0] in
       ("training", "hybrid_twin", "data_pipelines", "serving", "mlflow", "lightning")]
assert not bad, bad
torch.save(results, out_path)
"""


def test_each_format_runs_with_torch_alone_and_answers_as_the_torchscript_file(
    format_files, metadata, runs, tmp_path
):
    lines = [runs[0][: PAST + 10], runs[2][20 : 20 + PAST + 10]]
    u, y = (torch.cat(t) for t in zip(*(tensors(r, metadata) for r in lines), strict=True))
    inputs = tmp_path / "inputs.pt"
    torch.save({"past_u": u[:, :PAST], "past_y": y[:, :PAST], "future_u": u[:, PAST:],
                "rows_u": u[:, PAST:], "rows_y": y[:, PAST:]}, inputs)  # fmt: skip
    out = tmp_path / "outputs.pt"
    files = json.dumps({fmt: str(path) for fmt, path in format_files.items()})
    result = subprocess.run([sys.executable, "-c", TORCH_ONLY, files, str(inputs), str(out)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = torch.load(out)
    reference = results["torchscript"]
    for fmt in ("export", "aoti"):
        assert results[fmt]["format"] == fmt
        for key in ("rows", "forecast", "forecast_1"):
            got, expected = results[fmt][key], reference[key]
            if key != "rows":
                got, expected = [got], [expected]
            for step_got, step_expected in zip(got, expected, strict=True):
                for a, b in zip(step_got, step_expected, strict=True):
                    if b.dtype == torch.bool or b.dtype == torch.int64:
                        assert torch.equal(a, b), (fmt, key)  # alarms, run length, status
                    else:
                        _close(a, b)
    # the forecast is causal: 1 row ahead is the first row of 10 ahead
    torch.testing.assert_close(reference["forecast_1"][0], reference["forecast"][0][:, :1],
                               rtol=0, atol=0)  # fmt: skip


@pytest.fixture(scope="module", params=[*FORMATS, "auto"])
def format_server(request, twin_build, tmp_path_factory):
    """A server on twin.pt with `format=<param>` (auto: the fastest measured at export)."""
    folder = tmp_path_factory.mktemp(f"serve_{request.param}")
    running = start_server(folder, f"model_uri={twin_build.path}", f"format={request.param}")
    yield request.param, running
    stop_server(running)


def test_the_service_reports_the_format_it_runs(format_server, format_files, metadata):
    setting, server = format_server
    measured = {f: metadata["formats"][f]["update_p99_ms"] for f in FORMATS}
    expected = min(measured, key=measured.get) if setting == "auto" else setting
    with server.client() as client:
        body = client.get("/v1/model").json()
        ready = client.get("/readyz").json()
        metrics = client.get("/metrics").text
    assert body["format"] == expected and body["format_setting"] == setting
    assert body["file"] == str(format_files[expected])
    assert body["sha256"] == hashlib.sha256(format_files[expected].read_bytes()).hexdigest()
    assert body["skipped_formats"] == []
    assert body["metadata"]["format"] == expected
    assert ready["format"] == expected
    info = next(x for x in metrics.splitlines() if x.startswith("twin_model_info{"))
    assert f'format="{expected}"' in info and f'sha256="{body["sha256"]}"' in info


def test_forecasts_are_the_same_in_every_format(format_server, twin, metadata, runs):
    _, server = format_server
    lines = [runs[0][: PAST + 12], runs[1][40 : 40 + PAST + 12]]
    tags = metadata["measurement_tags"]
    u, y = (torch.cat(t) for t in zip(*(tensors(r, metadata) for r in lines), strict=True))
    with server.client() as client:
        for horizon in (12, 1):  # 1: below the PT2 programs' minimum horizon
            body = {"lines": [{"past": [{"inputs": r["inputs"],
                                         "measurements": r["measurements"]}
                                        for r in rows[:PAST]],
                               "future_inputs": [r["inputs"] for r in rows[PAST:PAST + horizon]]}
                              for rows in lines]}  # fmt: skip
            response = client.post("/v1/forecast", json=body)
            assert response.status_code == 200, response.text
            got = [[[step[t] for t in tags] for step in line["predicted"]]
                   for line in response.json()["lines"]]  # fmt: skip
            with torch.no_grad():
                expected = twin.forecast(u[:, :PAST], y[:, :PAST], u[:, PAST : PAST + horizon])
            _close(got, expected)


def test_sessions_answer_the_same_in_every_format_alarms_included(format_server, twin,
                                                                   metadata, runs):  # fmt: skip
    _, server = format_server
    rows = runs[1][: PAST + 10]
    # a gap of two rows, then a fouled NIR probe (10 %w/w high) that raises the alarm
    new = [rows[PAST], rows[PAST + 3]] + [
        {**r, "measurements": {**r["measurements"], "NIR.API_CONC":
                               r["measurements"]["NIR.API_CONC"] + 10.0}}
        if r["measurements"]["NIR.API_CONC"] is not None else r
        for r in rows[PAST + 4 :]]  # fmt: skip
    expected = replay(twin, metadata, rows[:PAST], new)
    names, tags = metadata["state_names"], metadata["measurement_tags"]
    with server.client() as client:
        created = client.post("/v1/sessions", json={"line_id": "LINE-formats",
                                                    "past": rows[:PAST]})  # fmt: skip
        assert created.status_code == 201, created.text
        sid = created.json()["session_id"]
        response = client.post(f"/v1/sessions/{sid}/observations", json={"observations": new})
        client.delete(f"/v1/sessions/{sid}")
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["steps"] for r in results] == [1, 3] + [1] * (len(new) - 2)
    assert any(r["alarm"] for r in results), "the fouled probe raises the alarm"
    for result, out in zip(results, expected, strict=True):
        _close([result["state"][n] for n in names], out[0][0])
        _close([result["predicted"][t] for t in tags], out[5][0])
        _close([result["residual"][t] for t in tags], out[6][0])
        _close([result["t2"]], out[8])
        _close([result["ewma_stat"][t] for t in tags], out[10][0])
        assert result["alarm"] == bool(out[11][0])
        assert result["solver_status"] == int(out[13][0])


def _truncate(path) -> int:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data) // 2


def test_a_truncated_pt2_named_stops_the_start_with_its_path_and_cause(format_files, tmp_path):
    served = tmp_path / "twin.aoti.pt2"
    shutil.copy(format_files["aoti"], served)
    size = _truncate(served)
    process = run_serve(tmp_path, f"model_uri={served}", "port=0")
    assert process.wait(EXIT_TIMEOUT_S) != 0
    log = (tmp_path / "serve.log").read_text()
    assert f"twin file {served} ({size} bytes) is not a readable PT2 archive" in log, log[-3000:]


def test_auto_skips_a_truncated_pt2_and_reload_of_a_named_format_refuses_it(format_files,
                                                                             tmp_path):  # fmt: skip
    folder = tmp_path / "models"
    folder.mkdir()
    for fmt in ("torchscript", "aoti"):  # no twin.pt2: auto skips it too (no such file)
        shutil.copy(format_files[fmt], folder / format_files[fmt].name)
    aoti = folder / format_files["aoti"].name
    good = aoti.read_bytes()
    _truncate(aoti)
    server = start_server(tmp_path / "auto", f"model_uri={folder / 'twin.pt'}")
    try:
        with server.client() as client:
            body = client.get("/v1/model").json()
            aoti.write_bytes(good)
            reloaded = client.post("/v1/model/reload").json()
    finally:
        stop_server(server)
    skipped = {s["format"]: s["reason"] for s in body["skipped_formats"]}
    assert body["format"] == "torchscript" and "aoti" in skipped
    assert f"twin file {aoti} ({len(good) // 2} bytes) is not a readable PT2 archive" \
        in skipped["aoti"]  # fmt: skip
    assert reloaded["changed"] and reloaded["current"]["format"] == "aoti"

    server = start_server(tmp_path / "aoti", f"model_uri={folder / 'twin.pt'}", "format=aoti")
    try:
        with server.client() as client:
            before = client.get("/v1/model").json()
            partial = aoti.with_name("partial.pt2")
            partial.write_bytes(good[: len(good) // 2])
            os.replace(partial, aoti)
            refused = client.post("/v1/model/reload")
            after = client.get("/v1/model").json()
    finally:
        stop_server(server)
    assert before["format"] == "aoti"
    assert refused.status_code == 422
    detail = refused.json()["detail"][0]
    assert detail["loc"] == ["model_uri"]
    assert f"twin file {aoti} ({len(good) // 2} bytes) is not a readable PT2 archive" \
        in detail["msg"]  # fmt: skip
    assert after["sha256"] == before["sha256"]


def test_the_fast_aoti_call_answers_bit_for_bit_as_the_runner_itself(format_files, metadata, runs):
    from torch.export.pt2_archive._package import load_pt2

    from serving.twin_formats import _BoxedAotiProgram, fast_aoti_program

    runners = load_pt2(str(format_files["aoti"])).aoti_runners
    fast = {name: fast_aoti_program(runner) for name, runner in runners.items()}
    assert all(isinstance(f, _BoxedAotiProgram) for f in fast.values())  # torch 2.13's API
    u, y = tensors(runs[0][: PAST + 3], metadata)
    past = (u[:, :PAST].contiguous(), y[:, :PAST].contiguous())
    row = (u[:, PAST].contiguous(), y[:, PAST].contiguous())

    def answers(program):
        with torch.no_grad():
            state = program["initial_state"](*past)
            update = program["update"](*state, *row, torch.isfinite(row[1]))
            forecast = program["forecast"](*past, u[:, PAST:].contiguous())
        return [*state, *update, *(forecast if isinstance(forecast, list | tuple) else [forecast])]

    got, expected = answers(fast), answers(runners)
    assert len(got) == len(expected) == 5 + 14 + 1
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_stopped_aoti_service_leaves_no_extraction_folders(twin_build, tmp_path, monkeypatch):
    # AOTInductor extracts its native code to `aotinductor_*` folders in the temp folder and
    # deletes them when its loader is freed; a SIGTERM-stopped uvicorn ends by the signal,
    # which frees nothing, so every stop left ~8 MB behind until the lifespan released the twin
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # the server's environment is copied from ours
    server = start_server(tmp_path / "serve", f"model_uri={twin_build.path}", "format=aoti")
    try:
        assert httpx.get(f"{server.url}/readyz", timeout=10).json()["format"] == "aoti"
        extracted = sorted(p.name for p in temp.glob("aotinductor_*"))
        assert extracted, "the running service extracted nothing: the test would prove nothing"
    finally:
        code = stop_server(server)
    assert code == -signal.SIGTERM, server.log_tail()
    assert sorted(p.name for p in temp.glob("aotinductor_*")) == [], server.log_tail()
