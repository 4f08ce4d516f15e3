"""Training throughput of the three model kinds: windows per second of one optimiser step.

Results: benchmarks/training_throughput.md.

    .venv/bin/python benchmarks/bench_training.py [--kinds hybrid mechanistic black_box]
        [--batches 16 256] [--threads 1 2] [--repeats 5] [--warmup 2] [--seed 0]
        [--dataset data/prepared] [--no-cuda | --cuda-only] [--json results.json]

One step is what `TwinLitModule.training_step` and Lightning's automatic optimisation do per
batch: `TwinLitModule.losses` (TwinModel.simulate: steady state, burn-in through the P past
rows, RK4 over the T rows, readout; masked MSE + residual penalty) -> backward -> gradient
norm clipping at `trainer.gradient_clip_val` -> AdamW step -> zero grad. Lightning's own
per-batch bookkeeping (hooks, metric logging) and data loading are not timed.

Model and data: configs/train.yaml composed with Hydra's compose API (experiment=cdc_default:
T = 60, P = 12, AdamW lr 2e-3) and built by training.build.build_training, on real training
windows of the prepared default dataset (`make pipeline`'s generate + prepare). Every timed
step gets its own batch, drawn with --seed from the train windows before timing starts, the
same batches for every kind. float32 (the training dtype).

Timing: per (device, threads, batch) the kinds are built once, run --warmup untimed steps,
then --repeats timed steps interleaved across kinds (the shared machine's load drifts over
minutes; interleaving spreads the drift over all kinds alike). Reported: the median step time
as windows/s = batch / median, and the spread as the windows/s of the slowest and fastest
step. CPU rows run with torch.set_num_threads(threads); the CUDA rows (when
torch.cuda.is_available() and not --no-cuda) synchronise before and after each step, once
through CUDA graphs (`lit.cuda_graphs`, with the config's compiled steps: what `twin train
trainer=gpu` does; the capture is in the warm-up steps) and once eagerly (`lit.cuda_graphs`
false and `solver.torch_compile=false`).

Stage: the optimiser is built with every parameter (as `configure_optimizers` does in
training), then the hybrid is set to the stage after its `lit.theta_only_epochs` theta-only
epochs (network trained too), the stage most of a run's epochs train in.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from training.build import build_training
from training.config_dir import SHIPPED_CONFIG_DIR
from training.lit_module import TwinLitModule
from training.windows import Window

REPO = Path(__file__).resolve().parents[1]
KINDS = ["hybrid", "mechanistic", "black_box"]


def compose_train(kind: str, dataset: Path, batch: int, seed: int, extra: tuple[str, ...] = ()):
    """configs/train.yaml for one kind, as `twin train model=<kind> <extra>` composes it."""
    overrides = [
        f"model={kind}",
        f"datamodule.path={dataset}",
        f"datamodule.batch_size={batch}",
        "datamodule.num_workers=0",
        f"seed={seed}",
        *extra,
    ]
    with initialize_config_dir(str(SHIPPED_CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


class Step:
    """One training step of one kind: losses -> backward -> clip -> AdamW step."""

    def __init__(self, lit: TwinLitModule, clip: float | None, device: torch.device) -> None:
        self.lit = lit.to(device)
        # As training does: the optimiser first (it takes every parameter then requiring
        # grad), then the stage after the theta-only warm-up epochs, which most epochs run.
        self.optimizer = lit.configure_optimizers()
        lit.set_stage(lit.theta_only_epochs)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.clip = clip

    def __call__(self, batch: Window) -> float:
        loss = self.lit.losses(batch)[0]
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def draw_batches(datamodule, batch: int, count: int, seed: int) -> list[Window]:
    """`count` batches of train windows drawn uniformly with replacement, as the sampler does."""
    datamodule.setup("fit")
    windows = datamodule.train_windows
    generator = torch.Generator().manual_seed(seed + batch)
    batches = []
    for _ in range(count):
        index = torch.randint(len(windows), (batch,), generator=generator).tolist()
        batches.append(default_collate([windows[i] for i in index]))
    return batches


def to_device(batch: Window, device: torch.device) -> Window:
    return Window(*(t.to(device) for t in batch))


def measure(
    steps: dict[str, Step], batches: list[Window], warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each timed step, per kind; repeats interleaved across kinds."""
    cuda = device.type == "cuda"
    for step in steps.values():
        for batch in batches[:warmup]:
            step(batch)
    seconds: dict[str, list[float]] = {kind: [] for kind in steps}
    for batch in batches[warmup:]:
        for kind, step in steps.items():
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step(batch)
            if cuda:
                torch.cuda.synchronize(device)
            seconds[kind].append(time.perf_counter() - start)
    return seconds


def run_block(
    args, device: torch.device, threads: int | None, batch: int, cuda_graphs: bool = False
) -> list[dict]:
    if threads is not None:
        torch.set_num_threads(threads)
    steps, batches = {}, None
    # CUDA eager rows: no compiled steps either (solver.torch_compile defaults to cuda).
    extra = ("solver.torch_compile=false",) if device.type == "cuda" and not cuda_graphs else ()
    for kind in args.kinds:
        cfg = compose_train(kind, args.dataset, batch, args.seed, extra)
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        torch.manual_seed(args.seed)
        datamodule, _, lit = build_training(cfg, config)
        lit.cuda_graphs = cuda_graphs
        if batches is None:  # the same windows for every kind
            drawn = draw_batches(datamodule, batch, args.warmup + args.repeats, args.seed)
            batches = [to_device(b, device) for b in drawn]
            shape = (cfg.datamodule.window_steps, cfg.datamodule.past_steps)
        steps[kind] = Step(lit, cfg.trainer.gradient_clip_val, device)
    seconds = measure(steps, batches, args.warmup, device)
    rows = []
    name = device_name(device, threads)
    if device.type == "cuda":
        name += ", CUDA graphs" if cuda_graphs else ", eager"
    for kind, times in seconds.items():
        median = statistics.median(times)
        row = {
            "device": name,
            "threads": threads,
            "kind": kind,
            "batch": batch,
            "T": shape[0],
            "P": shape[1],
            "median_s": median,
            "windows_per_s": batch / median,
            "slowest_windows_per_s": batch / max(times),
            "fastest_windows_per_s": batch / min(times),
            "seconds": times,
        }
        rows.append(row)
        print(
            f"{name:>24s} batch {batch:4d} {kind:12s} median {median * 1e3:8.1f} ms/step "
            f"{row['windows_per_s']:8.1f} windows/s "
            f"({row['slowest_windows_per_s']:.1f}-{row['fastest_windows_per_s']:.1f})",
            flush=True,
        )
    return rows


def device_name(device: torch.device, threads: int | None) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu, {threads} thread{'s' if threads != 1 else ''}"


def print_table(results: list[dict], kinds: list[str]) -> None:
    header = " | ".join(kinds)
    print(f"\n| device | batch | {header} |\n|---|---|" + "---|" * len(kinds))
    blocks = list(dict.fromkeys((r["device"], r["batch"]) for r in results))
    cells = {(r["device"], r["batch"], r["kind"]): r for r in results}
    for device, batch in blocks:
        row = []
        for kind in kinds:
            r = cells[(device, batch, kind)]
            row.append(
                f"{r['windows_per_s']:.1f} ({r['slowest_windows_per_s']:.1f}-"
                f"{r['fastest_windows_per_s']:.1f})"
            )
        print(f"| {device} | {batch} | " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=KINDS)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", type=Path, default=REPO / "data" / "prepared")
    parser.add_argument("--no-cuda", action="store_true", help="CPU rows only")
    parser.add_argument("--cuda-only", action="store_true", help="CUDA rows only")
    parser.add_argument("--json", help="write the results here as well")
    args = parser.parse_args()
    if not (args.dataset / "manifest.json").is_file():
        parser.error(f"no prepared dataset at {args.dataset}: run `twin generate && twin prepare`")
    args.dataset = args.dataset.resolve()
    cpu = platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, float32, {cpu}, dataset {args.dataset}")
    results = []
    for threads in [] if args.cuda_only else args.threads:
        for batch in args.batches:
            results += run_block(args, torch.device("cpu"), threads, batch)
    if torch.cuda.is_available() and not args.no_cuda:
        for batch in args.batches:
            for cuda_graphs in (True, False):
                results += run_block(args, torch.device("cuda"), None, batch, cuda_graphs)
    print("\nwindows/s: median (slowest step - fastest step)")
    print_table(results, args.kinds)
    if args.json:
        payload = {"args": {**vars(args), "dataset": str(args.dataset)}, "results": results}
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, **payload}, indent=1))


if __name__ == "__main__":
    main()
