"""Cascaded Tanks benchmark, end to end: raw CSV -> twin prepare -> twin train -> twin evaluate.

One command reproduces benchmarks/cascaded_tanks.md (`make tanks` runs it):

    .venv/bin/python benchmarks/cascaded_tanks.py                # 3 kinds x seeds 0,1,2
    .venv/bin/python benchmarks/cascaded_tanks.py --seeds 0 1 2 3 4
    .venv/bin/python benchmarks/cascaded_tanks.py --kinds hybrid --seeds 0   # one kind, one seed
    .venv/bin/python benchmarks/cascaded_tanks.py --kinds hybrid --seeds 0 1 2 \
        --override lit.lr_schedule=cosine --override optimizer.lr=3e-3   # `twin train` overrides

It drives the same `twin` stages as the built-in line, with the Cascaded Tanks configs:
the benchmark CSV is written as a historian export (data_pipelines/cascaded_tanks.py),
`twin prepare plant=cascaded_tanks data=cascaded_tanks` validates and aligns it, one Hydra
multirun `twin train experiment=cascaded_tanks` trains every kind and seed on the estimation
record (MLflow experiment `cascaded-tanks`), and `twin evaluate mode=simulation` simulates the
validation record with each run, from its first n rows (n = datamodule.past_steps), and
writes the RMSE per run, the mean and spread per kind and the plot. This script then writes
the markdown page beside itself with the published results and the time it all took.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "data" / "cascaded_tanks" / "dataBenchmark.csv"
RAW, PREPARED = Path("data/cascaded_tanks/raw"), Path("data/cascaded_tanks/prepared")
KINDS = ("hybrid", "mechanistic", "black_box")
SEEDS = (0, 1, 2)
COMMAND = ".venv/bin/python benchmarks/cascaded_tanks.py"  # what `make tanks` runs
EXPERIMENT = "cascaded-tanks"
# Simulation RMSE on the validation record, volts, as written in the data set's README
# (benchmarks/data/cascaded_tanks/README.md, a copy of the shared data set's README).
PUBLISHED = (
    ("best linear approximation", "0.75"),
    ("Volterra, 3rd degree, transient removed (Birpoutsoukis et al. 2018)", "0.54"),
    ("state space with GP-inspired prior, SMC (Svensson & Schon 2017)", "0.45"),
    ("polynomial nonlinear state space, PNLSS-I", "0.45"),
    ("nonlinear state space, NLSS2 initialisation (Relan et al. 2017)", "0.34"),
    (
        "neural continuous-time state space, truncated simulation error (Forgione & Piga 2021)",
        "0.33",
    ),
    (
        "neural continuous-time state space, soft-constrained integration (Forgione & Piga 2021)",
        "0.40",
    ),
    ("grey-box with an explicit physical overflow model (Rogers et al. 2017)", "0.18"),
)


def constant_mean_rmse(csv: Path, n: int) -> tuple[float, float]:
    """The no-model reference: RMSE (V) of predicting the mean of yEst, over all of yVal (the
    data set README's 2.105 V) and over yVal[n:] (the samples our kinds are scored on)."""
    data = pd.read_csv(csv)
    error = data["yVal"].to_numpy() - data["yEst"].mean()
    return float(np.sqrt(np.mean(error**2))), float(np.sqrt(np.mean(error[n:] ** 2)))


def twin(*args: str) -> list[str]:
    """The `twin` command of this environment."""
    return [str(Path(sys.executable).with_name("twin")), *args]


def run(command: list[str]) -> str:
    """Run one stage from the repository root; its output goes to the terminal and is returned."""
    print("+", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, check=False)
    sys.stdout.write(done.stdout[-4000:])
    if done.returncode != 0:
        raise SystemExit(f"cascaded_tanks: {command[1] if len(command) > 1 else command} failed")
    return done.stdout


def evaluation_dir(stdout: str) -> Path:
    """The output folder `twin evaluate` reported."""
    for line in stdout.splitlines():
        if line.startswith("evaluate: wrote "):
            return Path(line.split()[2]).parent
    raise SystemExit("cascaded_tanks: twin evaluate did not report its output folder")


def estimation_fits(run_ids: list[str]) -> dict[str, float]:
    """Each training run's last `val/rmse/TANK2.LEVEL` (its fit of the estimation record)."""
    import mlflow

    from training.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(ROOT))
    fits = {}
    for run_id in run_ids:
        history = client.get_metric_history(run_id, "val/rmse/TANK2.LEVEL")
        if history:
            fits[run_id] = max(history, key=lambda m: m.step).value
    return fits


# Kept in a page of its own, which this script does not rewrite.
EXPLORATION_NOTE = (
    "How this configuration was reached (longer training, a looser residual bound, a cosine "
    "learning-rate schedule, the tanks' overflow in the prior, then one learned start and "
    "whole-record training), and what each step measured: "
    "benchmarks/cascaded_tanks_exploration.md."
)


def reproduce_command(args: argparse.Namespace) -> str:
    """This script's command line with the options that differ from the defaults."""
    words = [COMMAND]
    if tuple(args.kinds) != KINDS:
        words.append(f"--kinds {' '.join(args.kinds)}")
    if tuple(args.seeds) != SEEDS:
        words.append(f"--seeds {' '.join(map(str, args.seeds))}")
    if args.csv != CSV:
        words.append(f"--csv {args.csv}")
    words += [f"--override {override}" for override in args.override]
    return " ".join(words)


def write_page(summary: pd.DataFrame, table: pd.DataFrame, command: str, seconds,
               csv: Path = CSV) -> Path:  # fmt: skip
    """benchmarks/cascaded_tanks.md: our kinds (mean ± std over seeds) beside the published.

    `command`: the script's command line (reproduce_command); `make tanks` runs the bare one.
    """
    reproduce = f"`make tanks` (= `{command}`)" if command == COMMAND else f"`{command}`"
    lines = [
        "# Cascaded Tanks: simulation RMSE on the validation record",
        "",
        f"Reproduce: {reproduce}.",
        f"Run {datetime.now(timezone.utc):%Y-%m-%d} on {os.cpu_count()} CPU cores "
        f"(shared), one torch thread per training; wall time of the whole command "
        f"{seconds / 60:.1f} min.",
        "",
        "Protocol (data set README): fit on the estimation record only (the validation record",
        "is used for nothing during training: validation losses simulate the estimation record;",
        "it was used to choose the configuration: benchmarks/cascaded_tanks_exploration.md);",
        "simulation of the validation record from its measured input alone after the initial",
        "state is taken from its first n outputs, which are not scored; RMSE of `yVal[n:]`",
        "in volts. n is given with every number. Initial state: both records start from the",
        "same unknown state (the data set README), so the start is learned on the estimation",
        "record (`initial_state: learned`, docs/training.md) and integrated through the",
        "validation record's first n rows on their measured input.",
        "",
        "| model (this project) | n | RMSE mean ± std (V) | min - max | seeds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in summary.itertuples():
        lines.append(
            f"| {r.kind} | {r.n_init} | {r.mean:.3f} ± {r.std:.3f} | {r.min:.3f} - {r.max:.3f} "
            f"| {r.n_runs} |"
        )
    lines += ["", "| published (README of the data set) | RMSE (V) |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in PUBLISHED]
    n = int(summary["n_init"].iloc[0])
    whole, scored = constant_mean_rmse(csv, n)
    lines += ["", f"Reference, no model: predicting the constant mean of yEst scores {whole:.3f} V "
              f"over all of yVal (the data set README's number), {scored:.3f} V over yVal[{n}:]."]
    best = summary.sort_values("mean").iloc[0]
    lines += [
        "",
        f"Best kind here: {best['kind']}, {best['mean']:.3f} V mean over {best['n_runs']} seeds;",
        "the issue's target was 0.25 V. Published best: 0.18 V by a grey-box model with an",
        "explicit overflow law, 0.33-0.34 V by black-box state-space models.",
    ]
    lines += [
        "",
        "Every run (MLflow experiment `cascaded-tanks`). `estimation fit`: the run's last",
        "`val/rmse/TANK2.LEVEL`, the same free-run simulation of the estimation record it was",
        "trained on (from its first n rows); the gap to the validation RMSE is how far the",
        "model generalises to the validation record's input.",
        "",
        "| kind | seed | run id | validation RMSE (V) | estimation fit (V) |",
        "| --- | --- | --- | --- | --- |",
    ]
    fits = estimation_fits(table["run_id"].tolist())
    for r in table.itertuples():
        fit = fits.get(r.run_id, float("nan"))
        lines.append(f"| {r.kind} | {r.seed} | `{r.run_id}` | {r.rmse:.4f} | {fit:.4f} |")
    lines += ["", "![simulated vs measured](cascaded_tanks_validation.png)", ""]
    lines += [EXPLORATION_NOTE, ""]
    page = ROOT / "benchmarks" / "cascaded_tanks.md"
    page.write_text("\n".join(lines))
    return page


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--csv", type=Path, default=CSV)
    # An option, not positionals: after --seeds/--kinds (nargs "+") argparse would read
    # positional overrides as more seeds or kinds.
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra `twin train` override; repeat for more",
    )
    parser.add_argument(
        "--page-from",
        type=Path,
        metavar="DIR",
        help="only rewrite the page from an earlier run's `twin evaluate` folder",
    )
    parser.add_argument("--wall-min", type=float, help="with --page-from: that run's wall time")
    args = parser.parse_args(argv)
    if args.page_from is not None:
        page = write_results(ROOT / args.page_from, args, 60.0 * (args.wall_min or float("nan")))
        print(f"cascaded_tanks: wrote {page}")
        return
    start = time.perf_counter()
    run([sys.executable, "-m", "data_pipelines.cascaded_tanks", str(args.csv), str(RAW)])
    run(twin("prepare", "plant=cascaded_tanks", "data=cascaded_tanks"))
    run(
        twin(
            "train",
            "-m",
            "experiment=cascaded_tanks",
            f"model={','.join(args.kinds)}",
            f"seed={','.join(map(str, args.seeds))}",
            "num_threads=1",
            "trainer.enable_progress_bar=false",
            *args.override,
        )
    )
    out = run(
        twin(
            "evaluate",
            "mode=simulation",
            f"data_path={PREPARED}",
            f"tracking.experiment_name={EXPERIMENT}",
            f"kinds=[{','.join(args.kinds)}]",
            f"last_n={len(args.seeds)}",
            "num_threads=1",
        )
    )
    seconds = time.perf_counter() - start
    page = write_results(ROOT / evaluation_dir(out), args, seconds)
    print(f"cascaded_tanks: wrote {page} in {seconds / 60:.1f} min")


def write_results(folder: Path, args: argparse.Namespace, seconds: float) -> Path:
    """The plot and the page from a `twin evaluate mode=simulation` output folder."""
    plot = ROOT / "benchmarks" / "cascaded_tanks_validation.png"
    shutil.copyfile(folder / "simulation_validation.png", plot)
    summary = pd.read_csv(folder / "simulation_summary.csv")
    table = pd.read_csv(folder / "simulation.csv")
    return write_page(summary, table, reproduce_command(args), seconds, args.csv)


if __name__ == "__main__":
    main()
