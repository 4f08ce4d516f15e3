"""Load benchmark of `twin serve`: monitoring updates per second and p50/p99 latency.

A real server (`twin serve`, uvicorn, one process) on 127.0.0.1 and a real HTTP load
generator, wrk (C, epoll; `apt-get install wrk`), on the same machine. For each concurrency
c in --clients, c sessions are opened on c plant lines (past windows from the prepared runs)
and wrk keeps c connections busy for --seconds, one connection per session (`-t c -c c`, so
each session's rows go out in time order, one at a time). Each request posts ONE observation
row, so requests/s = updates/s; the server's own `twin_updates_total` is read before and after
as a cross-check. wrk's latency is per request, client side, closed loop.

--floor adds, in the same run and against the same server, the web stack's floor at each
concurrency: wrk GETting /readyz (no body, no model, a ~60-byte JSON answer; the token sent
but not checked there), i.e. what uvicorn + FastAPI + our middleware do on these cores with
no work. updates/s divided by that rate is the part of the stack's ceiling the monitoring
post reaches.

    apt-get install wrk
    .venv/bin/python -m tests.serving.twin_file /tmp/serve_twin      # a tiny real twin file
    .venv/bin/python benchmarks/bench_service.py --twin /tmp/serve_twin/twin.pt \\
        --data /tmp/serve_twin/prepared [--format torchscript|export|aoti]   # default auto

Results: benchmarks/service_load.md.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
TWIN = Path(sys.executable).with_name("twin")
TOKEN = "bench-token"
PAST = 6
LUA = r"""
-- one connection per wrk thread = one session; rows cycle, timestamps advance dt each post
local rows = {ROWS}
local t0, dt = {T0}, {DT}
local k = 0
function setup(thread)
  thread:set("sid", sids[index])
  index = index + 1
end
function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer {TOKEN}"
end
function request()
  k = k + 1
  local stamp = os.date("!%Y-%m-%dT%H:%M:%S+00:00", t0 + k * dt)
  local body = '{"observations":[{"timestamp":"' .. stamp .. '",' .. rows[(k % #rows) + 1] .. '}]}'
  return wrk.format(nil, "/v1/sessions/" .. sid .. "/observations", nil, body)
end
"""


def start(twin: Path, port: int, folder: Path, fmt: str = "auto") -> subprocess.Popen:
    env = {**os.environ, "TWIN_SERVE_TOKENS": TOKEN}
    log = open(folder / "serve.log", "w")  # noqa: SIM115 - kept open with the server
    process = subprocess.Popen(
        [str(TWIN), "serve", f"model_uri={twin}", f"format={fmt}", f"port={port}",
         "sessions.max_sessions=128", "log_level=warning"],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError((folder / "serve.log").read_text()[-3000:])


def rows_of(data: Path, metadata: dict) -> list[list[dict]]:
    manifest = json.loads((data / "manifest.json").read_text())
    out = []
    for run in manifest["runs"].values():
        frame = pd.read_parquet(data / run["file"])
        out.append([{
            "timestamp": pd.Timestamp(r["timestamp"]).isoformat(),
            "inputs": {t: float(r[t]) for t in metadata["input_tags"]},
            "measurements": {t: (None if pd.isna(r[t]) else float(r[t]))
                             for t in metadata["measurement_tags"]},
        } for r in frame.to_dict("records")])
    return out


def updates_total(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return float(re.search(r"^twin_updates_total (\S+)$", text, re.M).group(1))


def run_level(client, url, runs, clients: int, seconds: int, folder: Path, dt: float) -> dict:
    sids = []
    # every session's past window re-stamped to end at the same time, so that one clock in
    # the load script stays one grid step ahead of each session's last row
    last = pd.Timestamp("2025-03-01T06:00:00+00:00")
    for j in range(clients):
        past = [{**row, "timestamp": (last - pd.Timedelta(seconds=dt * (PAST - 1 - i))).isoformat()}
                for i, row in enumerate(runs[j % len(runs)][:PAST])]
        response = client.post("/v1/sessions", json={"line_id": f"BENCH-{j}", "past": past})
        response.raise_for_status()
        sids.append(response.json()["session_id"])
    bodies = [json.dumps({"inputs": r["inputs"], "measurements": r["measurements"]})[1:-1]
              for r in runs[0][PAST:PAST + 200]]
    lua = (LUA.replace("{ROWS}", "{" + ",".join(json.dumps(b) for b in bodies) + "}")
           .replace("{T0}", str(int(last.timestamp()))).replace("{DT}", str(dt))
           .replace("{TOKEN}", TOKEN))
    lua = "sids = {" + ",".join(f'"{s}"' for s in sids) + "}\nindex = 1\n" + lua
    script = folder / f"post_{clients}.lua"
    script.write_text(lua)
    before = updates_total(client)
    result = subprocess.run(
        ["wrk", "-t", str(clients), "-c", str(clients), "-d", f"{seconds}s", "--latency",
         "--timeout", "5s", "-s", str(script), url], capture_output=True, text=True, check=True)
    after = updates_total(client)
    for sid in sids:
        client.delete(f"/v1/sessions/{sid}")
    return parse_wrk(result.stdout, clients, seconds, after - before)


def run_floor(url: str, clients: int, seconds: int) -> dict:
    """wrk GETting /readyz with `clients` connections: the stack's rate with no work."""
    result = subprocess.run(
        ["wrk", "-t", str(clients), "-c", str(clients), "-d", f"{seconds}s", "--latency",
         "--timeout", "5s", "-H", f"Authorization: Bearer {TOKEN}", f"{url}/readyz"],
        capture_output=True, text=True, check=True)  # fmt: skip
    return {"floor": "GET /readyz", **parse_wrk(result.stdout, clients, seconds, float("nan"))}


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def parse_wrk(out: str, clients: int, seconds: int, server_updates: float) -> dict:
    latency = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M))
    if "99" not in latency:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return {
        "clients": clients,
        "requests": requests,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "server_updates_per_s": server_updates / seconds,
        "p50_ms": _ms(latency["50"]),
        "p90_ms": _ms(latency["90"]),
        "p99_ms": _ms(latency["99"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--twin", type=Path, default=ROOT / "models" / "twin.pt")
    parser.add_argument("--data", type=Path, default=None,
                        help="prepared dataset for the rows (default: beside the twin)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--format", default="auto",
                        choices=["auto", "torchscript", "export", "aoti"],
                        help="the service's `format` setting (the format served is printed)")
    parser.add_argument("--floor", action="store_true",
                        help="also measure GET /readyz at each concurrency (the stack's floor)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench_service: wrk not found (apt-get install wrk)")
    extra = {"metadata.json": ""}
    import torch

    torch.jit.load(str(args.twin), _extra_files=extra)
    metadata = json.loads(extra["metadata.json"])
    runs = rows_of(args.data or args.twin.parent / "prepared", metadata)
    folder = Path(tempfile.mkdtemp(prefix="bench_service_"))
    url = f"http://127.0.0.1:{args.port}"
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()}, torch {torch.__version__}")
    server = start(args.twin, args.port, folder, args.format)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=30) as client:
            served = client.get("/v1/model").json()
            print(f"# format {served['format']} ({served['file']}), setting {args.format}")
            run_level(client, url, runs, 4, 3, folder, float(metadata["dt_s"]))  # warm-up
            for clients in args.clients:
                print(json.dumps(run_level(client, url, runs, clients, args.seconds, folder,
                                           float(metadata["dt_s"]))), flush=True)
                if args.floor:
                    print(json.dumps(run_floor(url, clients, args.seconds)), flush=True)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
