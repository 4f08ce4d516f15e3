"""GPU training speed: the window rollout's forward+backward, and a whole `twin train` fit.

Results: benchmarks/gpu_training.md. Needs a CUDA device.

    python benchmarks/bench_gpu_training.py rollout [--batches 1024 16384 131072] [--steps 200]
        [--repeats 5] [--methods NAME ...] [--profile N] [--fused-config ROWS WARPS] [--seed 0]
        [--json rollout.json]
    python benchmarks/bench_gpu_training.py network [--batches ...] [--json network.json]
    python benchmarks/bench_gpu_training.py fit [--epochs 8] [--kind hybrid]
        [--variants eager graphs fast fused] [--dataset data/prepared] [--seed 0] [--json fit.json]

`rollout` (issue 9's table): forward + backward of a hybrid model over `--steps` zero-order-
hold steps of 5 s: loss = mean((states / state std)^2), backpropagated to every parameter.
Model: the size of issue 9's measurement, 9 states and 3 inputs (API and excipient
loss-in-weight feeders into a 2-tank blender; SMALL_LINE) + a 64x64 residual network with its
last layer randomised; inputs nominal x (1 + 0.05 N(0, 1)), new every step; x0 the steady
state. float32. Methods (`--methods` picks; DEFAULT_METHODS when not given), in one run:

- torchdiffeq rk4 (jump_t), one step per interval: the library baseline.
- reference: hybrid_twin's RK4 in eager autograd, plain steps (training with
  `lit.cuda_graphs=false solver.torch_compile=false`).
- own rk4 scripted: the same solver under torch.jit.script.
- CUDA graph: the reference captured by training.cuda_graphs.CapturedLoss (plain steps).
- compiled steps: each RK4 step through torch.compile (`solver.torch_compile`), eagerly.
- CUDA graph + compiled steps (fast path): both, what `twin train trainer=gpu` runs by default;
  + TF32 matmuls: network matmuls on TF32 tensor cores (the state stays float32); + recompute:
  RK4 `recompute: true` (per-interval activation checkpointing), for batches whose activations
  do not fit.
- ... + fused network: the residual network as one Triton kernel forward and one backward
  (`model.residual.fused`, hybrid_twin/fused_mlp.py), its products in float32 (ieee), tf32x3
  or tf32; also with eager steps and with graphs of the plain steps. Each row records
  `fused_launches`, the fused kernels launched from Python in its warm-up and capture: 0 means
  the row ran the plain network.

Per (batch, method): warm-up calls (1: the compile and capture; 2 for TorchScript's profiling
runs), then --repeats timed calls (one where a call takes > 10 s), each synchronised; the
median is reported, with the peak GPU memory and the loss's and gradients' largest relative
difference from the reference (from torchdiffeq where the reference ran out of memory).
Peak memory (`peak_gib`) is the method's own: the peak above what was allocated when it
started (`resident_gib`: inputs, parameters, the reference's gradients and whatever earlier
methods left; before 2026-12-06 the peaks included that).
Out-of-memory and other errors are recorded, not fatal. `--profile N`: at the largest batch,
one more call per method under torch.profiler, its N operators/kernels with the most self
device time. `--fused-config`: the fused kernels' rows per block and warps.

`network`: the residual network alone, one forward + backward per call (`run_network`).

`fit`: `twin train trainer=gpu model=<kind>` as train.py builds it (training.build; no
MLflow), Lightning fit for --epochs on the prepared dataset, same seed, once per variant:
eager (`lit.cuda_graphs=false solver.torch_compile=false`), graphs (`lit.cuda_graphs=true
solver.torch_compile=false`), fast (nothing overridden: what `trainer=gpu` runs), fused (the
fast path with `model.residual.fused=true`). Wall time
of each fit (the compiles and captures included) and the final val/loss and val RMSE. The
compile's share depends on inductor's disk cache (TORCHINDUCTOR_CACHE_DIR): run `fit
--variants fast` twice with a new cache folder for a cold and a warm number.
"""

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from hybrid_twin import HybridVectorField, build_flowsheet, build_solver, fused_mlp, odeint_zoh
from training.cuda_graphs import CapturedLoss

REPO = Path(__file__).resolve().parents[1]
DT_S = 5.0
SMALL_LINE = {
    "name": "two_feeders_blender",
    "components": ["api", "excipient"],
    "units": {
        "feeder_api": {
            "type": "liw_feeder",
            "component": "api",
            "nominal_flow_kg_h": 3.0,
            "flow_range_kg_h": [0.0, 10.0],
            "hopper_nominal_kg": 5.0,
        },
        "feeder_exc": {
            "type": "liw_feeder",
            "component": "excipient",
            "nominal_flow_kg_h": 27.0,
            "flow_range_kg_h": [0.0, 80.0],
            "hopper_nominal_kg": 25.0,
        },
        "blender": {
            "type": "tanks_in_series_blender",
            "n_tanks": 2,
            "nominal_speed_rpm": 400.0,
            "speed_range_rpm": [0.0, 1200.0],
        },
    },
    "streams": [["feeder_api", "blender"], ["feeder_exc", "blender"]],
}
REFERENCE = "reference: own rk4, eager"
TDE_RK4 = "torchdiffeq rk4 (jump_t)"
FAST = "CUDA graph + compiled steps (fast path)"
FUSED = FAST + " + fused network"
DEFAULT_METHODS = [TDE_RK4, REFERENCE, "CUDA graph", FAST, FUSED, FUSED + ", tf32"]
# Measured at the smallest batch only: it times as the eager reference does (launch-bound).
SMALL_BATCH_ONLY = {"own rk4, scripted"}
SLOW_CALL_S = 10.0  # a method whose call takes longer is timed once


class RolloutLoss(nn.Module):
    """mean((states / std)^2) of one rollout: the module a CUDA graph captures."""

    def __init__(self, solver: nn.Module, scale: Tensor) -> None:
        super().__init__()
        self.solver = solver
        self.register_buffer("scale", scale)

    def forward(self, x0: Tensor, u: Tensor) -> Tensor:
        return (self.solver(x0, u, DT_S).states / self.scale).pow(2).mean()


class TorchdiffeqLoss(nn.Module):
    def __init__(self, field: HybridVectorField, scale: Tensor) -> None:
        super().__init__()
        self.field = field
        self.register_buffer("scale", scale)

    def forward(self, x0: Tensor, u: Tensor) -> Tensor:
        states = odeint_zoh(self.field, x0, u, DT_S, method="rk4", mode="jump_t")
        return (states / self.scale).pow(2).mean()


def build_field(seed: int, device: torch.device) -> HybridVectorField:
    config = {"kind": "hybrid", "residual": {"hidden": [64, 64], "zero_init": False}}
    generator = torch.Generator().manual_seed(seed)
    return HybridVectorField(build_flowsheet(SMALL_LINE), config, generator=generator).to(device)


def make_inputs(field, batch: int, steps: int, seed: int, device) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed + batch)
    nominal = field.flowsheet.nominal_inputs().float()
    u = nominal.unsqueeze(1) * (1.0 + 0.05 * torch.randn(batch, steps, 3, generator=generator))
    u = u.to(device)
    with torch.no_grad():
        x0 = field.flowsheet.steady_state(u[:, 0], field.theta())
    return x0, u


class Tf32:
    """TF32 matmuls inside the block (captures record the kernels chosen then)."""

    def __enter__(self) -> None:
        self.previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.previous


def methods(field: HybridVectorField) -> dict[str, tuple[Callable[[], Callable], bool]]:
    """name -> (build: () -> loss_fn(x0, u), tf32). Each build sets the network's fused kernels
    (`model.residual.fused`) on or off first: one field serves every method."""
    scale = field.state_normaliser.std.detach().clone()

    def own(recompute: bool = False, compiled: bool = False) -> RolloutLoss:
        config = {"name": "rk4", "recompute": recompute, "torch_compile": compiled}
        return RolloutLoss(build_solver(field, config), scale)

    def graphed(recompute: bool = False, compiled: bool = False) -> Callable[[], Callable]:
        return lambda: CapturedLoss(lambda: own(recompute, compiled))

    def plain(build: Callable[[], Callable]) -> Callable[[], Callable]:
        return fused(build, on=False)

    def fused(
        build: Callable[[], Callable], precision: str = "ieee", on: bool = True
    ) -> Callable[[], Callable]:
        def configured() -> Callable:
            field.net.fused, field.net.fused_precision = on, precision
            # Dynamo guards on these attributes (tests/hybrid_twin/test_fused_mlp.py); the
            # reset compiles each method afresh, so no method runs another's graphs.
            torch._dynamo.reset()
            return build()

        return configured

    return {
        TDE_RK4: (plain(lambda: TorchdiffeqLoss(field, scale)), False),
        REFERENCE: (plain(own), False),
        "own rk4, scripted": (
            plain(lambda: RolloutLoss(torch.jit.script(own().solver), scale)),
            False,
        ),
        "CUDA graph": (plain(graphed()), False),
        "CUDA graph + recompute": (plain(graphed(True)), False),
        "compiled steps, no graph": (plain(lambda: own(compiled=True)), False),
        FAST: (plain(graphed(compiled=True)), False),
        FAST + " + recompute": (plain(graphed(True, True)), False),
        FAST + " + TF32 matmuls": (plain(graphed(compiled=True)), True),
        "fused network, eager steps": (fused(own), False),
        "CUDA graph + fused network": (fused(graphed()), False),
        FUSED: (fused(graphed(compiled=True)), False),
        FUSED + ", tf32x3": (fused(graphed(compiled=True), "tf32x3"), False),
        FUSED + ", tf32": (fused(graphed(compiled=True), "tf32"), False),
    }


def one_call(fn, field, x0, u) -> tuple[Tensor, list[Tensor]]:
    field.zero_grad(set_to_none=True)
    loss = fn(x0, u)
    loss.backward()
    return loss.detach(), [p.grad for p in field.parameters() if p.grad is not None]


def relative_difference(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / (b.abs().max() + 1e-30))


def run_rollout(args) -> list[dict]:
    device = torch.device(args.device)
    field = build_field(args.seed, device)
    rows = []
    for batch in args.batches:
        x0, u = make_inputs(field, batch, args.steps, args.seed, device)
        truth: tuple[str, Tensor, list[Tensor]] | None = None
        available = methods(field)
        unknown = sorted(set(args.methods) - set(available))
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; known: {sorted(available)}")
        for name in args.methods:
            build, tf32 = available[name]
            if batch != min(args.batches) and name in SMALL_BATCH_ONLY:
                continue
            row = {"batch": batch, "steps": args.steps, "method": name}
            # Free the previous method's loss and gradients so its memory is not this one's.
            loss = grads = None
            field.zero_grad(set_to_none=True)
            sync(device)
            resident = 0
            if device.type == "cuda":
                resident = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            fn = None
            launches = fused_mlp.launches
            try:
                with Tf32() if tf32 else _nothing():
                    fn = build()
                    # Warm-up: the compile and capture, TorchScript's two profiling runs.
                    for _ in range(2 if "scripted" in name else 1):
                        loss, grads = one_call(fn, field, x0, u)
                    times = []
                    for _ in range(args.repeats):
                        sync(device)
                        start = time.perf_counter()
                        loss, grads = one_call(fn, field, x0, u)
                        sync(device)
                        times.append(time.perf_counter() - start)
                        if times[-1] > SLOW_CALL_S:
                            break
                    if args.profile and batch == max(args.batches):
                        row["profile"] = profile_call(fn, field, x0, u, device, args.profile)
                row.update(
                    # > 0 where the fused network kernels ran (the warm-up and capture launch
                    # them from Python): a fused row with 0 timed the plain network
                    fused_launches=fused_mlp.launches - launches,
                    median_ms=1e3 * statistics.median(times),
                    min_ms=1e3 * min(times),
                    # The method's own peak: above what was allocated before it (inputs,
                    # parameters, the reference's gradients, anything earlier methods left).
                    peak_gib=(torch.cuda.max_memory_allocated() - resident) / 2**30
                    if device.type == "cuda"
                    else None,
                    resident_gib=resident / 2**30 if device.type == "cuda" else None,
                    loss=float(loss),
                )
                if truth is not None:  # the reference, or torchdiffeq where it did not fit
                    row["vs"] = truth[0]
                    row["loss_rel_diff"] = relative_difference(loss, truth[1])
                    row["grad_rel_diff"] = max(
                        relative_difference(g, t) for g, t in zip(grads, truth[2], strict=True)
                    )
                if name == REFERENCE or (name == TDE_RK4 and truth is None):
                    truth = (name, loss, [g.clone() for g in grads])
            except torch.OutOfMemoryError:
                row["error"] = "out of GPU memory"
            except Exception as error:  # recorded and reported: one method must not stop the run
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            del fn
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    add_ratios(rows)
    return rows


def profile_call(fn, field, x0, u, device: torch.device, rows: int) -> list[dict]:
    """One more call under torch.profiler: the `rows` operators and kernels with the most
    self time on the device (CPU: on the host), with their call counts. Printed too."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        one_call(fn, field, x0, u)
        sync(device)
    on_device = device.type == "cuda"
    events = prof.key_averages()
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:rows]
    table = [
        {"name": e.key[:120], "calls": e.count, "self_ms": getattr(e, key, 0.0) / 1e3} for e in top
    ]
    total_ms = sum(getattr(e, key, 0.0) for e in events) / 1e3
    print(f"# profile ({'device' if on_device else 'host'} self time {total_ms:.1f} ms):")
    for entry in table:
        print(f"#   {entry['self_ms']:9.2f} ms  {entry['calls']:7d} x  {entry['name']}")
    return table


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def add_ratios(rows: list[dict]) -> None:
    """speedup vs torchdiffeq rk4 and vs the reference, per batch (same run, same card)."""
    for row in rows:
        if "median_ms" not in row:
            continue
        for base, key in ((TDE_RK4, "x_vs_torchdiffeq"), (REFERENCE, "x_vs_reference")):
            other = [r for r in rows if r["batch"] == row["batch"] and r["method"] == base]
            if other and "median_ms" in other[0]:
                row[key] = other[0]["median_ms"] / row["median_ms"]


NETWORK_CONFIGS = [(32, 4), (64, 4), (64, 8), (128, 4), (128, 8)]  # (rows per block, warps)


def run_network(args) -> list[dict]:
    """The residual network alone (what the rollout evaluates 800 times): forward + backward
    of one evaluation per batch, the plain layers (float32, TF32 matmuls) against the fused
    kernels for each (rows per block, warps) and precision; mean of 20 calls after 3 warm-ups,
    and the largest relative difference of the output and gradients from the plain layers."""
    device = torch.device(args.device)
    net = build_field(args.seed, device).net
    generator = torch.Generator(device=device).manual_seed(args.seed)
    defaults = fused_mlp.BLOCK_ROWS, fused_mlp.NUM_WARPS
    rows = []
    for batch in args.batches:
        z = torch.randn(batch, net.n_in, device=device, generator=generator)
        weight = torch.randn(batch, net.n_out, device=device, generator=generator)

        def call(z: Tensor = z, weight: Tensor = weight) -> list[Tensor]:
            net.zero_grad(set_to_none=True)
            leaf = z.clone().requires_grad_(True)
            y = net(leaf)
            (y * weight).sum().backward()
            return [y.detach(), leaf.grad] + [p.grad for p in net.parameters()]

        variants = [("plain", False, None, "ieee"), ("plain, TF32 matmuls", True, None, "ieee")]
        variants += [
            (f"fused {block} rows x {warps} warps, {precision}", False, (block, warps), precision)
            for precision in fused_mlp.PRECISIONS
            for block, warps in NETWORK_CONFIGS
        ]
        truth = None
        for name, tf32, config, precision in variants:
            net.fused, net.fused_precision = config is not None, precision
            if config is not None:
                fused_mlp.BLOCK_ROWS, fused_mlp.NUM_WARPS = config
            row = {"batch": batch, "network": name}
            try:
                with Tf32() if tf32 else _nothing():
                    for _ in range(3):
                        results = call()
                    sync(device)
                    start = time.perf_counter()
                    for _ in range(20):
                        call()
                    sync(device)
                row["ms"] = 1e3 * (time.perf_counter() - start) / 20
                if truth is None:
                    truth = [r.clone() for r in results]
                row["rel_diff"] = max(
                    relative_difference(r, t) for r, t in zip(results, truth, strict=True)
                )
            except Exception as error:  # recorded and reported: one variant must not stop the run
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    fused_mlp.BLOCK_ROWS, fused_mlp.NUM_WARPS = defaults
    return rows


FIT_VARIANTS = {
    "eager": ["lit.cuda_graphs=false", "solver.torch_compile=false"],
    "graphs": ["lit.cuda_graphs=true", "solver.torch_compile=false"],
    "fast": [],  # what `twin train trainer=gpu` runs with nothing overridden
    "fused": ["model.residual.fused=true"],  # the fast path with the fused network kernels
}


def run_fit(args) -> list[dict]:
    import os

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.pytorch import Trainer, seed_everything
    from omegaconf import OmegaConf
    from torch._dynamo.utils import counters

    from training.build import build_training
    from training.config_dir import SHIPPED_CONFIG_DIR

    rows = []
    for variant in args.variants:
        overrides = [
            f"model={args.kind}",
            "trainer=gpu" if args.device == "cuda" else "trainer=cpu",
            f"trainer.max_epochs={args.epochs}",
            "trainer.enable_checkpointing=false",
            "trainer.enable_progress_bar=false",
            f"datamodule.path={args.dataset.resolve()}",
            f"seed={args.seed}",
            *FIT_VARIANTS[variant],
        ]
        with initialize_config_dir(str(SHIPPED_CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        seed_everything(args.seed, workers=True)
        graphs_before = counters["stats"]["unique_graphs"]
        device = torch.device(args.device)
        sync(device)
        start = time.perf_counter()
        datamodule, _, lit = build_training(cfg, config)
        trainer = Trainer(**instantiate(cfg.trainer, _convert_="all"), logger=False)
        trainer.fit(lit, datamodule=datamodule)
        sync(device)
        seconds = time.perf_counter() - start
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {
            "kind": args.kind,
            "epochs": args.epochs,
            "variant": variant,
            "overrides": FIT_VARIANTS[variant],
            "cuda_graphs": cfg.lit.cuda_graphs,
            "torch_compile": cfg.solver.torch_compile,
            "fit_s": seconds,
            "captures": 0 if lit._captured is None else lit._captured.n_captures,
            "compiled_graphs": counters["stats"]["unique_graphs"] - graphs_before,
            "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"),
            "metrics": metrics,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["rollout", "fit", "network"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 16384, 131072])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--fused-config",
        type=int,
        nargs=2,
        metavar=("ROWS", "WARPS"),
        help="rollout, fit: the fused kernels' rows per block and warps (hybrid_twin/fused_mlp.py)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="rollout: at the largest batch, profile one more call, print N top ops",
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--variants", nargs="+", choices=sorted(FIT_VARIANTS), default=["eager", "graphs", "fast"]
    )
    parser.add_argument("--kind", default="hybrid")
    parser.add_argument("--dataset", type=Path, default=REPO / "data" / "prepared")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here as well")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script only")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark measures the GPU path")
    if args.fused_config:
        fused_mlp.BLOCK_ROWS, fused_mlp.NUM_WARPS = args.fused_config
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# torch {torch.__version__}, {card}, CUDA {torch.version.cuda}", flush=True)
    run = {"rollout": run_rollout, "fit": run_fit, "network": run_network}[args.part]
    rows = run(args)
    if args.json:
        payload = {
            "torch": torch.__version__,
            "device": card,
            "args": {k: str(v) for k, v in vars(args).items()},
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
