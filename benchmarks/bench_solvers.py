"""Speed of the hybrid model over 200 zero-order-hold steps: own solvers against torchdiffeq.

Claim (benchmarks/solvers.md): the training path (hybrid_twin's RK4, one step per data
interval, its vector field under torch.compile: configs/solver/rk4.yaml with
`torch_compile: true`) is at least 200x faster than a plain torchdiffeq dopri5 that treats each
input step as a discontinuity (batch 1, forward), and at least 2x faster than torchdiffeq's rk4
at the same step.

    .venv/bin/python benchmarks/bench_solvers.py [--steps 200] [--batches 1 64 1024]
        [--threads 1] [--dtype float32] [--repeats 3] [--seed 0] [--skip-naive]
        [--only rk4 ...] [--json results.json]

Model: the built-in cdc_line flowsheet (27 states, 8 inputs, 22 parameters) + ResidualNet 64x64
(configs/model/hybrid.yaml) with its last layer randomised, so the network shapes the dynamics
as a trained one would. Inputs: nominal setpoints x (1 + 0.05 N(0, 1)), drawn anew for every
trajectory and every 5 s step, so every grid time is an input step. x0: the steady state at
the first inputs. float32 by default (the training dtype); --dtype float64 is the tests' precision.

Forward runs under torch.no_grad; forward+backward takes the mean squared normalised state
over the trajectory and backpropagates to every parameter. Timing: eager methods from their
first call, scripted ones from their third (after the profiling executor's two warm-up
calls), torch.compile ones from their second (the first compiles whatever graph that batch
and pass need and is reported on its own, as "first call"); the best of --repeats calls,
interleaved across methods against the machine's load drift; anything slower than 15 s once.
Wall time decides; the process CPU time of the same calls is recorded too (on a shared machine
it is the less disturbed of the two) and printed as a second ratio table. Inductor's compile
cache lives in $TORCHINDUCTOR_CACHE_DIR (default /tmp/torchinductor_$USER): point it at an
empty folder for cold compile times. Adaptive solvers use rtol 1e-6, atol 1e-8
(configs/solver/dopri5.yaml), except the plain baseline, which keeps torchdiffeq's defaults
(rtol 1e-7, atol 1e-9) and runs only at batch 1, forward (baseline_block).
"""

import argparse
import json
import math
import platform
import time
from collections.abc import Callable

import torch

from hybrid_twin import (
    HybridVectorField,
    build_flowsheet,
    build_solver,
    cdc_line_flowsheet_spec,
    odeint_zoh,
)

DT_S = 5.0
RTOL, ATOL = 1e-6, 1e-8
# Backpropagating through thousands of adaptive steps of 1024 trajectories keeps every stage
# alive (tens of GiB); those entries are skipped and marked as such.
MAX_BACKWARD_ADAPTIVE_BATCH = 64
TRAINING_PATH = "own rk4, torch.compile (training path)"
SCRIPTED_RK4 = "own rk4, scripted"
ONCE_ABOVE_S = 15.0
PLAIN = "torchdiffeq dopri5, plain (no jump info, default tol)"
TDE_RK4 = "torchdiffeq rk4, same step (jump_t: perturb)"
FAILURES: dict[str, str] = {}
FIRST_CALLS: dict[tuple[str, int, str], float] = {}


class CountingField(torch.nn.Module):
    """Counts vector-field evaluations made through torchdiffeq."""

    def __init__(self, field: torch.nn.Module) -> None:
        super().__init__()
        self.field, self.calls = field, 0
        self.n_states, self.n_inputs = field.n_states, field.n_inputs

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.field(x, u)


def build_model(seed: int) -> HybridVectorField:
    generator = torch.Generator().manual_seed(seed)
    flowsheet = build_flowsheet(cdc_line_flowsheet_spec())
    config = {"kind": "hybrid", "residual": {"hidden": [64, 64], "zero_init": False}}
    return HybridVectorField(flowsheet, config, generator=generator)


def make_inputs(
    field: HybridVectorField, batch: int, steps: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + batch)
    nominal = field.flowsheet.nominal_inputs().to(torch.get_default_dtype())
    noise = torch.randn(batch, steps, field.n_inputs, generator=generator)
    u = nominal.unsqueeze(1) * (1.0 + 0.05 * noise)
    with torch.no_grad():
        x0 = field.flowsheet.steady_state(u[:, 0], field.theta())
    return x0, u


def methods(field: HybridVectorField) -> dict[str, tuple[Callable, CountingField | None]]:
    """name -> (call(x0, u) -> states (batch, steps + 1, n_states), eval counter or None)."""
    rk4, dopri5 = (
        build_solver(field, "rk4"),
        build_solver(field, {"name": "dopri5", "rtol": RTOL, "atol": ATOL}),
    )
    compiled_rk4 = build_solver(field, {"name": "rk4", "torch_compile": True})
    scripted_rk4, scripted_dopri5 = torch.jit.script(rk4), torch.jit.script(dopri5)
    counted, plain = CountingField(field), CountingField(field)

    def own(solver):
        return lambda x0, u: solver(x0, u, DT_S).states

    def tde(method: str, mode: str, counter: CountingField = counted, **options):
        return lambda x0, u: odeint_zoh(counter, x0, u, DT_S, method=method, mode=mode, **options)

    return {
        TRAINING_PATH: (own(compiled_rk4), None),
        SCRIPTED_RK4: (own(scripted_rk4), None),
        "own rk4, eager": (own(rk4), None),
        "own dopri5, scripted": (own(scripted_dopri5), None),
        "own dopri5, eager": (own(dopri5), None),
        TDE_RK4: (tde("rk4", "jump_t"), counted),
        "torchdiffeq dopri5, jump_t": (tde("dopri5", "jump_t", rtol=RTOL, atol=ATOL), counted),
        "torchdiffeq dopri5, interval by interval": (
            tde("dopri5", "intervals", rtol=RTOL, atol=ATOL),
            counted,
        ),
        PLAIN: (tde("dopri5", "naive", counter=plain), plain),
    }


def make_call(
    call: Callable, field: HybridVectorField, x0: torch.Tensor, u: torch.Tensor, backward: bool
):
    scale = field.state_normaliser.std

    def forward() -> None:
        with torch.no_grad():
            call(x0, u)

    def forward_backward() -> None:
        field.zero_grad(set_to_none=True)
        (call(x0, u) / scale).pow(2).mean().backward()

    return forward_backward if backward else forward


def timed(run: Callable[[], None]) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    start, start_cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - start, time.process_time() - start_cpu


def measure(
    runs: dict[str, Callable[[], None]], repeats: int, first_calls: dict[str, float] | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """Best wall and best CPU time per method, repeats interleaved across methods: the shared
    machine's load drifts over minutes, and interleaving spreads that drift over all methods
    alike.

    Eager methods are measured from their first call (nothing to warm up); scripted ones
    from their third (TorchScript's profiling executor records the first two calls and
    optimises on the second); torch.compile ones from their second (the first compiles; its
    wall time goes to `first_calls`). Methods slower than ONCE_ABOVE_S are measured once. A
    method that fails (torchdiffeq asserts "underflow in dt" when its step falls below the
    resolution of t) gets NaN and its message in FAILURES.
    """
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    for name, run in runs.items():
        try:
            if "scripted" in name:
                run()
                run()
            if "torch.compile" in name:
                first = timed(run)[0]
                if first_calls is not None:
                    first_calls[name] = first
            best[name], best_cpu[name] = timed(run)
        except AssertionError as error:
            best[name] = best_cpu[name] = math.nan
            FAILURES[name] = str(error)
    for _ in range(repeats - 1):
        for name, run in runs.items():
            if best[name] <= ONCE_ABOVE_S:
                wall, cpu = timed(run)
                best[name], best_cpu[name] = min(best[name], wall), min(best_cpu[name], cpu)
    return best, best_cpu


def count_evals(call: Callable, counter: CountingField, x0: torch.Tensor, u: torch.Tensor) -> int:
    counter.calls = 0
    with torch.no_grad():
        call(x0, u)
    return counter.calls


def skip_reason(name: str, batch: int, backward: bool) -> str | None:
    if PLAIN in name:
        return "the plain baseline has its own block (baseline_block)"
    adaptive = "dopri5" in name
    if adaptive and backward and batch > MAX_BACKWARD_ADAPTIVE_BATCH:
        return "memory: backprop through every adaptive stage"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--only", nargs="+", help="run only the methods whose name contains one of these"
    )
    parser.add_argument("--json", help="write the results here as well")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(getattr(torch, args.dtype))
    field = build_model(args.seed)
    entries = methods(field)
    if args.only:
        entries = {n: e for n, e in entries.items() if any(key in n for key in args.only)}
    cpu = platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {args.threads} thread(s), {args.dtype}, {cpu}")
    results = []
    for batch in args.batches:
        x0, u = make_inputs(field, batch, args.steps, args.seed)
        for backward in (False, True):
            chosen = {n: e for n, e in entries.items() if not skip_reason(n, batch, backward)}
            runs = {n: make_call(c, field, x0, u, backward) for n, (c, _) in chosen.items()}
            first_calls: dict[str, float] = {}
            seconds, cpu_seconds = measure(runs, args.repeats, first_calls)
            pass_ = "fwd+bwd" if backward else "fwd"
            for name, first in first_calls.items():
                FIRST_CALLS[(name, batch, pass_)] = first
                print(f"batch {batch:5d} {pass_:8s} first call {first:8.1f} s  {name}", flush=True)
            for name, (call, counter) in chosen.items():
                evals = None
                if counter is not None and not backward and name not in FAILURES:
                    evals = count_evals(call, counter, x0, u)
                row = {"method": name, "batch": batch, "pass": pass_, "seconds": seconds[name]}
                row["cpu_seconds"] = cpu_seconds[name]
                row["first_call_seconds"] = first_calls.get(name)
                results.append({**row, "evals": evals})
                note = f", {evals} evals" if evals is not None else ""
                ms, cpu_ms = seconds[name] * 1e3, cpu_seconds[name] * 1e3
                print(
                    f"batch {batch:5d} {pass_:8s} {ms:10.1f} ms (cpu {cpu_ms:10.1f} ms)  "
                    f"{name}{note}",
                    flush=True,
                )
    print_tables(results, args.batches)
    for name, message in FAILURES.items():
        print(f"failed: {name}: {message}")
    baseline = {} if args.skip_naive else baseline_block(args)
    if args.json:
        with open(args.json, "w") as handle:
            payload = {
                "args": vars(args),
                "torch": torch.__version__,
                "results": results,
                "failures": FAILURES,
            }
            json.dump({**payload, "baseline": baseline}, handle, indent=1)


def baseline_block(args: argparse.Namespace) -> dict:
    """The plain torchdiffeq dopri5 at batch 1, forward, against the training path and
    torchdiffeq rk4, timed together (interleaved) on fresh inputs of the same shape."""
    field = build_model(args.seed)
    x0, u = make_inputs(field, 1, args.steps, args.seed)
    entries = methods(field)
    names = [TRAINING_PATH, SCRIPTED_RK4, TDE_RK4, PLAIN]
    runs = {n: make_call(entries[n][0], field, x0, u, backward=False) for n in names}
    counter, plain_run = entries[PLAIN][1], runs[PLAIN]

    def one_call_counted() -> None:
        counter.calls = 0  # the count left is the last call's, however many calls measure makes
        plain_run()

    runs[PLAIN] = one_call_counted
    seconds, cpu_seconds = measure(runs, args.repeats)
    evals = counter.calls
    result = {"seconds": seconds, "cpu_seconds": cpu_seconds, "plain_evals": evals}
    if PLAIN in FAILURES:
        print(f"\nbatch 1 fwd: {PLAIN}: failed after {evals} evals: {FAILURES[PLAIN]}")
        return {**result, "plain_failed": FAILURES[PLAIN]}
    print(f"\nbatch 1 fwd: {PLAIN}: {seconds[PLAIN]:.2f} s, {evals} evals")
    for name in names[:3]:
        ratio = seconds[PLAIN] / seconds[name]
        print(f"batch 1 fwd: {name}: {seconds[name] * 1e3:.1f} ms, plain / this = {ratio:.0f}x")
    ratio = seconds[TDE_RK4] / seconds[TRAINING_PATH]
    print(f"batch 1 fwd: torchdiffeq rk4 / training path = {ratio:.1f}x")
    return result


def _cell(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return "failed" if math.isnan(seconds) else f"{seconds * 1e3:.1f} ms"


def print_tables(results: list[dict], batches: list[int]) -> None:
    columns = [(b, p) for b in batches for p in ("fwd", "fwd+bwd")]
    header = " | ".join(f"batch {b} {p}" for b, p in columns)
    names = list(dict.fromkeys(r["method"] for r in results))
    wall = {(r["method"], r["batch"], r["pass"]): r["seconds"] for r in results}
    cpu = {(r["method"], r["batch"], r["pass"]): r["cpu_seconds"] for r in results}
    print(f"\nWall time:\n\n| method | {header} |\n|---|" + "---|" * len(columns))
    for name in names:
        cells = [_cell(wall.get((name, b, p))) for b, p in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if FIRST_CALLS:
        print("\nFirst call (compiles the graphs that batch and pass need, then runs):\n")
        print(f"| method | {header} |\n|---|" + "---|" * len(columns))
        for name in dict.fromkeys(n for n, _, _ in FIRST_CALLS):
            cells = [FIRST_CALLS.get((name, b, p)) for b, p in columns]
            cells = ["-" if c is None else f"{c:.1f} s" for c in cells]
            print(f"| {name} | " + " | ".join(cells) + " |")
    for label, table in (("wall time", wall), ("process CPU time", cpu)):
        print(f"\nRatios of {label}, other method / training path:\n")
        print(f"| other method | {header} |\n|---|" + "---|" * len(columns))
        for name in names:
            if name == TRAINING_PATH:
                continue
            cells = []
            for b, p in columns:
                ours = table.get((TRAINING_PATH, b, p), math.nan)
                ratio = table.get((name, b, p), math.nan) / ours
                cells.append("-" if math.isnan(ratio) else f"{ratio:.1f}x")
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
