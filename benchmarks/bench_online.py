"""Latency of the online twin (training/online_twin.py): `update` at batch 1, `forecast` of 600.

Results: benchmarks/online_latency.md.

    .venv/bin/python benchmarks/bench_online.py [--kinds mechanistic] [--steps 500]
        [--warmup 20] [--rounds 1] [--forecast-repeats 3] [--dtypes float64 float32]
        [--modes scripted frozen eager] [--jacobian central forward] [--threads 1]
        [--profile] [--json results.json]

Model: per --kinds, the latest registered version of that kind of `cdc-line-twin` in
./mlflow.db (training.tracking's URI), rebuilt exactly as `twin export` does
(training.export.load_eager_twin on data/prepared), noise from configs/export.yaml's defaults
(training.export.noise_settings). The monitor is `placeholder_monitor`: fitting it is
`twin export`'s slow part (minutes of filtering) and a fitted one runs the same ops.

Data: the first normal test run of data/prepared in tag units (training.export.engineering_runs):
initial_state on its first past_steps rows, then `update` row by row: --warmup untimed steps,
then --steps timed steps, each timed alone with time.perf_counter under torch.no_grad, at
batch 1 with torch.set_num_threads(--threads); --rounds such passes, one after the other.
Reported per (kind, jacobian, dtype, mode): p50, p99, mean, min in ms over the pooled steps
of all rounds, each round's p99 (how much the tail moves with the box's load), and the
largest difference of the filtered state over the last round's steps from the kind's first
float64 run (its first jacobian and mode; float64 runs first; NaN without a float64 run), in
units of state_normaliser.std.
`forecast`: the past window and the next --horizon (600) rows, two untimed calls (TorchScript
optimises on the second) then --forecast-repeats timed calls; the median is reported.

Modes: eager (the nn.Module), scripted (torch.jit.script: twin.pt),
frozen (torch.jit.freeze of the scripted module keeping update/forecast/initial_state:
parameters become constants, so theta(), the normalisers' arithmetic on parameters etc. are
folded once), export (the torch.export programs of twin.pt2, run by torch), aoti (the
AOTInductor package twin.aoti.pt2), aoti-frozen (aoti compiled with inductor's freezing; not
written by twin export). The PT2 modes are built as `twin export` builds them
(training/export_formats.py) and called as the service calls them (serving's ProgramTwin).
--jacobian: the EKF's transition Jacobian (ExtendedKalmanFilter fd_scheme):
central (2 n + 1 solver rows, the reference) or forward (n + 1 rows). Configurations run one
after the other; compare numbers of one invocation only (the machine is shared).
--profile adds per-part wall times of an eager update (transition Jacobian, P propagation,
observation Jacobian, gain + Joseph update, monitor) and the solver/readout cost at 1 vs
n + 1 vs 2 n + 1 rows.
"""

import argparse
import itertools
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def build(dtype: torch.dtype, jacobian: str, kind: str):
    """(eager OnlineTwin, u (1, T, n_u), y (1, T, n_y), past_steps, test run, version, run id)
    for the latest registered version of that model kind."""
    import mlflow
    from omegaconf import OmegaConf

    from training.dataset import PreparedDataset
    from training.export import engineering_runs, load_eager_twin, noise_settings
    from training.online_twin import OnlineTwin, placeholder_monitor
    from training.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='cdc-line-twin'")
    versions = [v for v in versions
                if mlflow.get_run(v.run_id).data.params.get("model.kind") == kind]
    latest = max(versions, key=lambda v: int(v.version))
    dataset = PreparedDataset.open(str(REPO / "data" / "prepared"))
    past_steps = int(mlflow.get_run(latest.run_id).data.params["datamodule.past_steps"])
    # the version's own weights: a resumed run registers several versions from one run id
    twin = load_eager_twin(latest.run_id, dataset, f"models:/cdc-line-twin/{latest.version}")
    cfg = OmegaConf.load(REPO / "configs" / "export.yaml")
    noise = noise_settings(twin, dataset, cfg.filter)
    n_y = len(dataset.measurement_tags)
    online = OnlineTwin(twin, noise["q"], noise["r"], noise["p0_std"], placeholder_monitor(n_y))
    online.ekf.fd_scheme = jacobian
    online = online.to(dtype).eval()
    runs = [r for r in dataset.load_split("test")
            if dataset.manifest["runs"][r.run_id].get("kind", "normal") == "normal"]
    u, y, _ = engineering_runs(dataset, runs[:1], dtype)
    return online, u, y, past_steps, runs[0].run_id, latest.version, latest.run_id


# The PT2 formats of `twin export` (training/export_formats.py): the torch.export programs run
# by torch's interpreter (export), AOTInductor C++ (aoti), and AOTInductor with inductor's
# freezing (parameters folded into constants at compile time; not what twin export writes).
PT2_MODES = {"export": None, "aoti": {}, "aoti-frozen": {"freezing": True}}


def pt2_twin(online, u, y, past_steps: int, mode: str):
    """(the ProgramTwin of that mode, read back from its bytes as `twin export` does; seconds to
    build it)."""
    from training.export_formats import (
        compile_programs,
        example_arguments,
        export_programs,
        load_pt2_twin,
        package,
    )

    started = time.perf_counter()
    programs = export_programs(online, example_arguments(online, u, y, past_steps))
    options = PT2_MODES[mode]
    built = programs if options is None else compile_programs(programs, options)
    twin, _ = load_pt2_twin(package("export" if options is None else "aoti", built, {}))
    return twin, time.perf_counter() - started


def time_updates(module, u, y, past_steps: int, warmup: int, steps: int):
    """(per-step seconds of the timed steps, (steps, n_states) filtered x of every step)."""
    times, xs = [], []
    with torch.no_grad():
        state = tuple(module.initial_state(u[:, :past_steps], y[:, :past_steps]))
        last = min(u.shape[1], past_steps + warmup + steps)
        for k in range(past_steps, last):
            row_y = y[:, k]
            mask = torch.isfinite(row_y)
            t0 = time.perf_counter()
            out = module.update(*state, u[:, k], row_y, mask)
            t1 = time.perf_counter()
            state = tuple(out[:5])
            xs.append(out[0][0])
            if k >= past_steps + warmup:
                times.append(t1 - t0)
    return times, torch.stack(xs)


def time_forecast(module, u, y, past_steps: int, horizon: int, repeats: int) -> list[float]:
    past_u, past_y = u[:, :past_steps], y[:, :past_steps]
    fut = u[:, past_steps : past_steps + horizon]
    times = []
    with torch.no_grad():
        # Two untimed calls: TorchScript's profiling executor optimises on the second.
        for _ in range(2):
            module.forecast(past_u, past_y, fut)
        for _ in range(repeats):
            t0 = time.perf_counter()
            module.forecast(past_u, past_y, fut)
            times.append(time.perf_counter() - t0)
    return times


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    i = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[i]


def profile_update(module, u, y, past_steps: int, steps: int) -> None:
    """Wall time of the parts of one update (eager only), summed over `steps` steps."""
    ekf = module.ekf
    parts = {"transition_jacobian": 0.0, "P_pred": 0.0, "observation_jacobian": 0.0,
             "gain+joseph": 0.0, "monitor": 0.0, "total": 0.0}
    with torch.no_grad():
        x, P, u_held, ewma, run_length = module.initial_state(
            u[:, :past_steps], y[:, :past_steps])
        for k in range(past_steps, past_steps + steps):
            inputs, meas = u[:, k], y[:, k]
            mask = torch.isfinite(meas)
            t0 = time.perf_counter()
            model_u = u_held.index_select(1, module.twin.input_columns)
            pins = inputs.index_select(1, module.pin_columns)
            x_pred, jac, _ = ekf.transition_jacobian(x, model_u, module.pin_index, pins)
            t1 = time.perf_counter()
            P_pred = ekf._propagate(jac, P, module.pin_index)
            t2 = time.perf_counter()
            y_pred, H = ekf.observation_jacobian(x_pred)
            t3 = time.perf_counter()
            x, P, residual, residual_var = ekf._correct(x_pred, P_pred, y_pred, H, meas, mask)
            t4 = time.perf_counter()
            used = mask & torch.isfinite(meas)
            ewma, run_length, *_ = module._monitor(ewma, run_length, residual, residual_var, used)
            module.monitor.t2_limit(used)
            t5 = time.perf_counter()
            u_held = inputs
            for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0),
                                strict=True):
                parts[name] += dt
    for name, total in parts.items():
        print(f"    {name:22s} {1e3 * total / steps:9.3f} ms/step")
    # Cost of the solver alone, one row vs the FD batch: per-op overhead vs arithmetic.
    n = x.shape[1]
    solver = ekf.solver
    model_u = u[:, past_steps].index_select(1, module.twin.input_columns)
    with torch.no_grad():
        for rows in (1, n + 1, 2 * n + 1):
            xs = x.expand(rows, n).contiguous()
            us = model_u.expand(rows, -1).reshape(rows, 1, -1)
            solver(xs, us, ekf.dt_s, None, None)
            t0 = time.perf_counter()
            for _ in range(20):
                solver(xs, us, ekf.dt_s, None, None)
            ms = 1e3 * (time.perf_counter() - t0) / 20
            print(f"    solver, {rows:3d} rows       {ms:9.3f} ms")
        obs = ekf.observation
        for rows in (1, 2 * n + 1):
            xs = x.expand(rows, n).contiguous()
            obs(xs)
            t0 = time.perf_counter()
            for _ in range(50):
                obs(xs)
            ms = 1e3 * (time.perf_counter() - t0) / 50
            print(f"    readout, {rows:3d} rows      {ms:9.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1,
                        help="passes over the test run per configuration, pooled")
    parser.add_argument("--forecast-repeats", type=int, default=3)
    parser.add_argument("--horizon", type=int, default=600)
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=DTYPES)
    parser.add_argument("--modes", nargs="+",
                        default=["scripted", "frozen", "eager", "export", "aoti"],
                        choices=["scripted", "eager", "frozen", *PT2_MODES])
    parser.add_argument("--jacobian", nargs="+", default=["central", "forward"],
                        choices=["central", "forward"])
    parser.add_argument("--kinds", nargs="+", default=["mechanistic"],
                        choices=["mechanistic", "hybrid", "black_box"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="per-part timings (eager)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {torch.get_num_threads()}, "
          f"load {Path('/proc/loadavg').read_text().split()[:3]}")
    results = []
    reference: dict = {}  # kind -> x trajectory of its first float64 run
    # float64 first, so each kind's reference exists before its float32 runs need it
    dtypes = sorted(args.dtypes, key=lambda d: d != "float64")
    for kind, jacobian, dname in itertools.product(args.kinds, args.jacobian, dtypes):
        if True:
            online, u, y, past_steps, test_run, version, run_id = build(
                DTYPES[dname], jacobian, kind)
            print(f"{kind}: cdc-line-twin v{version} (run {run_id}), test run {test_run}, "
                  f"{u.shape[1]} rows, past_steps {past_steps}, n_states {online.ekf.n_states}")
            if args.profile:
                print(f"  profile {jacobian} {dname} eager:")
                profile_update(online, u, y, past_steps, 20)
            for mode in args.modes:
                if mode == "eager":
                    module = online
                elif mode == "scripted":
                    module = torch.jit.script(online)
                elif mode in PT2_MODES:
                    module, build_s = pt2_twin(online, u, y, past_steps, mode)
                    print(f"  {mode}: built in {build_s:.1f} s", flush=True)
                else:  # frozen: parameters become constants, theta() etc. folded
                    module = torch.jit.freeze(torch.jit.script(online), preserved_attrs=[
                        "update", "forecast", "initial_state"])
                t, round_p99 = [], []
                for _ in range(args.rounds):
                    t_round, xs = time_updates(module, u, y, past_steps, args.warmup, args.steps)
                    t += t_round
                    round_p99.append(1e3 * percentile(t_round, 0.99))
                if dname == "float64":
                    reference.setdefault(kind, xs.double())
                diff = math.nan
                if kind in reference:
                    scale = online.ekf.state_scale.double()
                    diff = float(((xs.double() - reference[kind]) / scale).abs().max())
                f = time_forecast(module, u, y, past_steps, args.horizon, args.forecast_repeats)
                row = {
                    "kind": kind, "version": version, "jacobian": jacobian, "dtype": dname,
                    "mode": mode, "steps": len(t),
                    "p50_ms": 1e3 * statistics.median(t), "p99_ms": 1e3 * percentile(t, 0.99),
                    "mean_ms": 1e3 * statistics.fmean(t), "min_ms": 1e3 * min(t),
                    "rounds": args.rounds, "round_p99_ms": round_p99,
                    "forecast_ms": 1e3 * statistics.median(f), "horizon": args.horizon,
                    "x_diff_vs_first": diff,
                }
                results.append(row)
                print(f"  {kind} {jacobian:8s} {dname} {mode:8s} update p50 {row['p50_ms']:8.2f} "
                      f"p99 {row['p99_ms']:8.2f} mean {row['mean_ms']:8.2f} min "
                      f"{row['min_ms']:8.2f} ms ({len(t)} steps; p99 per round "
                      f"{' '.join(f'{p:.2f}' for p in round_p99)}); forecast {args.horizon}: "
                      f"{row['forecast_ms']:8.1f} ms; max |x - x_ref| / scale {diff:.1e}",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
