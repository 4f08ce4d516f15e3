"""Throughput and peak memory of `twin prepare` on a one-million-row historian export.

Claim (benchmarks/prepare.md): prepare_dataset handles >= 500k historian rows per second end
to end (read, validate, align, split, write, hash), CSV and Parquet input alike.

    .venv/bin/python benchmarks/bench_prepare.py [--rows 1000000] [--repeats 3] [--seed 0]
        [--source plant_sim|synthetic] [--jitter-ms 0]

The export (long format, CSV with ISO 8601 text and Parquet with timestamp[ms, UTC], the
same data in both) comes from one of two sources:

- plant_sim (default): the plant simulator (data_pipelines.plant_sim.write_historian_export)
  with configs/sim/cdc_default.yaml, resized to 9 runs (3 normal, 1 extrapolation, 1 per
  fault kind) whose length gives about --rows rows; its 17 tags at their dictionary rates,
  with its own bad-quality rows, refills and faults.
- synthetic: generated here with a seed, shaped like the same line: 17 tags at their rates
  on the historian's scan clock, 8 runs (6 normal, 1 extrapolation, 1 fault) with setpoint
  steps, a five-minute outage in one run (a gap split), ~0.1 % bad-quality rows and ~0.01 %
  out-of-range values. --jitter-ms moves the 1 s tags off the scan clock, as OPC UA source
  timestamps are, which makes nearly every timestamp string distinct (the parser's worst case).

Each format is timed in a fresh Python process started by a parent that imports nothing
heavy; the peak resident memory is resource.getrusage's ru_maxrss (it sees pyarrow's
allocations, unlike tracemalloc), and the same figure right after the imports is the baseline.
"""

# Only the standard library at module level: the parent process must stay small, because a
# child started by fork/vfork + exec inherits its parent's ru_maxrss high-water mark. The
# export is generated in a child too; numpy, pandas and pyarrow are imported where used.
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TAG_KEYS = ("role", "unit", "sample_period_s", "range", "max_hold_s", "description")
N_RUNS = 8


def plant_tags() -> dict:
    """The CDC line's tag dictionary (configs/plant/cdc_line.yaml), keeping only the keys a
    tag entry may have (TagDictionary refuses any other)."""
    import yaml

    plant = yaml.safe_load((REPO / "configs/plant/cdc_line.yaml").read_text())
    return {
        name: {k: v for k, v in spec.items() if k in TAG_KEYS}
        for name, spec in plant["tags"].items()
    }


def plant_sim_export(raw: Path, n_rows: int, seed: int) -> dict:
    """The plant simulator's export (data_pipelines.plant_sim), sized to about n_rows rows.

    A campaign of 9 runs (3 normal, 1 extrapolation, one per fault kind) with the run length
    chosen for n_rows historian rows; written once per format with the same seed, so both
    folders hold the same data.

    Returns:
        {"rows": historian rows, "run_s": seconds per run, "source": "plant_sim"}.
    """
    import yaml

    from data_pipelines.plant_sim import write_historian_export

    tags = plant_tags()
    sim = yaml.safe_load((REPO / "configs/sim/cdc_default.yaml").read_text())
    n_runs = 4 + 5  # 4 normal (1 of them extrapolation) + 1 per fault kind
    rows_per_s = sum(1.0 / spec["sample_period_s"] for spec in tags.values())
    run_hours = round(n_rows / rows_per_s / n_runs / 3600 + 0.005, 2)
    sim.update(
        n_normal_runs=4, n_extrapolation_runs=1, n_fault_runs_per_kind=1, run_hours=run_hours
    )
    for fmt in ("csv", "parquet"):
        summary = write_historian_export(raw / fmt, tags=tags, sim=sim, seed=seed, file_format=fmt)
    rows = summary["files"]["historian.parquet"]["rows"]
    return {"rows": rows, "run_s": int(run_hours * 3600), "source": "plant_sim"}


def synthetic_export(raw: Path, n_rows: int, seed: int, jitter_ms: int = 0) -> dict:
    """Write historian.csv, historian.parquet (in sub-folders csv/ and parquet/) and runs.csv.

    With jitter_ms > 0 the 1 s tags are stamped up to that many ms off the scan clock, as an
    OPC UA server's source timestamps are: then almost every timestamp string is distinct.

    Returns:
        {"rows": rows written, "run_s": seconds per run, "source": "synthetic"}.
    """
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    tags = plant_tags()
    rows_per_s = sum(1.0 / spec["sample_period_s"] for spec in tags.values())
    # the outage in one run removes 300 s of rows; at least n_rows are written in all
    run_s = int(np.ceil((n_rows / rows_per_s + 300) / N_RUNS)) + 1
    start0 = pd.Timestamp("2025-03-01T06:00:00Z").value
    starts = start0 + np.arange(N_RUNS) * (run_s + 3600) * 10**9
    frames = [_run_frame(tags, s, run_s, i, rng, jitter_ms) for i, s in enumerate(starts)]
    frame = pd.concat(frames, ignore_index=True)
    _mark_faults(frame, rng)
    for fmt in ("csv", "parquet"):
        (raw / fmt).mkdir(parents=True, exist_ok=True)
        _runs_table(starts, run_s).to_csv(raw / fmt / "runs.csv", index=False)
    _write(frame, raw)
    return {"rows": len(frame), "run_s": run_s, "source": "synthetic"}


def _run_frame(tags: dict, start_ns: int, run_s: int, i: int, rng, jitter_ms: int):
    """One run, long format, rows in time order then tag order (as historians export)."""
    import numpy as np
    import pandas as pd

    parts = []
    for j, spec in enumerate(tags.values()):
        period = spec["sample_period_s"]
        t = np.arange(0, run_s, period)
        if i == 2:  # a five-minute data outage in one run: prepare splits it
            t = t[(t < run_s / 2) | (t >= run_s / 2 + 300)]
        low, high = spec["range"]
        level = low + (high - low) * (0.3 + 0.04 * i)
        if spec["role"] == "input":  # setpoint steps every 20 minutes
            value = level * (1 + 0.05 * np.sign(np.sin(2 * np.pi * t / 2400.0)))
        else:
            value = level + (high - low) * 0.01 * rng.standard_normal(t.size)
        ns = start_ns + (t * 1e9).astype(np.int64)
        if jitter_ms and period == 1.0:
            ns += rng.integers(-jitter_ms, jitter_ms + 1, ns.size) * 10**6
        parts.append(pd.DataFrame({"ns": ns, "tag": j, "value": value}))
    frame = pd.concat(parts, ignore_index=True).sort_values(["ns", "tag"], kind="stable")
    frame["tag"] = pd.Categorical.from_codes(frame["tag"], categories=list(tags))
    return frame.reset_index(drop=True)


def _mark_faults(frame, rng) -> None:
    """~0.1 % bad-quality rows (value empty) and ~0.01 % out-of-range values."""
    import numpy as np

    n = len(frame)
    frame["quality"] = "Good"
    bad = rng.choice(n, size=n // 1000, replace=False)
    frame.loc[bad, "quality"] = rng.choice(["Bad", "Scan Timeout", "Inp OutRange"], bad.size)
    frame.loc[bad, "value"] = np.nan
    wild = rng.choice(n, size=n // 10000, replace=False)
    frame.loc[wild, "value"] = -1.0


def _runs_table(starts, run_s: int):
    import pandas as pd

    def iso(ns) -> pd.Index:
        return pd.DatetimeIndex(ns, tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")

    kinds = ["normal"] * 7 + ["fault"]
    regimes = ["interpolation"] * 6 + ["extrapolation", "interpolation"]
    return pd.DataFrame(
        {
            "run_id": [f"run_{i:03d}" for i in range(N_RUNS)],
            "start": iso(starts),
            "end": iso(starts + run_s * 10**9),
            "kind": kinds,
            "regime": regimes,
        }
    )


def _write(frame, raw: Path) -> None:
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    ns = frame["ns"].to_numpy()
    # ISO text once per distinct instant, then spread: strftime on 1M rows would dominate
    codes, uniques = pd.factorize(ns)
    text = pd.DatetimeIndex(uniques, tz="UTC").strftime("%Y-%m-%dT%H:%M:%S.%f").str[:-3]
    timestamp = pa.DictionaryArray.from_arrays(codes.astype(np.int32), pa.array(text + "+00:00"))
    tag = pa.array(frame["tag"].astype(str).to_numpy(), pa.string())
    value = pa.array(frame["value"].to_numpy(), from_pandas=True)
    quality = pa.array(frame["quality"].to_numpy(), pa.string())
    csv_table = pa.table(
        {"timestamp": timestamp.cast(pa.string()), "tag": tag, "value": value, "quality": quality}
    )
    pcsv.write_csv(csv_table, raw / "csv" / "historian.csv")
    stamps = pa.array(ns // 10**6, pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
    pq.write_table(
        pa.table({"timestamp": stamps, "tag": tag, "value": value, "quality": quality}),
        raw / "parquet" / "historian.parquet",
    )


def _maxrss_mib() -> float:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vmhwm_mib() -> float:
    """The kernel's own high-water mark of this process's memory, a cross-check; 0 if absent."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(raw: Path, out: Path, repeats: int) -> dict:
    """Runs in a fresh process: baseline RSS after imports, then timed prepare runs."""
    import yaml

    import data_pipelines  # noqa: F401  (the import is part of the baseline)
    from data_pipelines import prepare_dataset

    baseline_mib = _maxrss_mib()
    data = yaml.safe_load((REPO / "configs/data/cdc_default.yaml").read_text())
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        manifest = prepare_dataset(raw, out, tags=plant_tags(), data=data, plant_name="cdc_line")
        seconds.append(time.perf_counter() - started)
    peak_mib = _maxrss_mib()
    return {
        "seconds": seconds,
        "rows_in": manifest["counts"]["rows_in"],
        "rows_rejected": manifest["counts"]["rows_rejected"],
        "segments": len(manifest["runs"]),
        "baseline_mib": baseline_mib,
        "peak_mib": peak_mib,
        "vmhwm_mib": _vmhwm_mib(),
    }


def _run(args: list[str]) -> dict:
    """Run this script in a fresh Python process; its last stdout line is JSON."""
    result = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", choices=("plant_sim", "synthetic"), default="plant_sim")
    parser.add_argument("--jitter-ms", type=int, default=0, help="synthetic: 1 s tag jitter")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("RAW", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        if args.source == "plant_sim":
            export = plant_sim_export(args.generate, args.rows, args.seed)
        else:
            export = synthetic_export(args.generate, args.rows, args.seed, args.jitter_ms)
        print(json.dumps(export))
        return
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), args.repeats)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        export = _run(
            [
                "--generate",
                str(work / "raw"),
                "--rows",
                str(args.rows),
                "--seed",
                str(args.seed),
                "--source",
                args.source,
                "--jitter-ms",
                str(args.jitter_ms),
            ]
        )
        print(
            f"export ({export['source']}): {export['rows']} rows, runs of {export['run_s']} s, "
            f"jitter {args.jitter_ms} ms; parent RSS {_maxrss_mib():.0f} MiB"
        )
        for fmt in ("csv", "parquet"):
            size = (work / "raw" / fmt / f"historian.{fmt}").stat().st_size / 2**20
            r = _run(
                [
                    "--repeats",
                    str(args.repeats),
                    "--child",
                    str(work / "raw" / fmt),
                    str(work / f"out_{fmt}"),
                ]
            )
            best, median = min(r["seconds"]), statistics.median(r["seconds"])
            print(
                f"{fmt:8s} {size:6.1f} MiB  rows_in {r['rows_in']}  rejected "
                f"{r['rows_rejected']}  segments {r['segments']}  best {best:.2f} s "
                f"({r['rows_in'] / best / 1e3:.0f}k rows/s)  median {median:.2f} s "
                f"({r['rows_in'] / median / 1e3:.0f}k rows/s)  ru_maxrss after imports "
                f"{r['baseline_mib']:.0f} MiB, peak {r['peak_mib']:.0f} MiB "
                f"(VmHWM {r['vmhwm_mib']:.0f} MiB)"
            )


if __name__ == "__main__":
    main()
