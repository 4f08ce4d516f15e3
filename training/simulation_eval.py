"""Whole-record simulation RMSE: the system-identification protocol (`mode=simulation`).

Where `training/evaluation.py` scores forecasts from many origins, this scores one free run
per held-out run segment, as identification benchmarks do (Cascaded Tanks: "simulation RMSE
on the validation record"): the twin takes its initial state from the first n rows (the
past window, n = `init_steps`, docs/training.md "Initial state"), then simulates to the end
of the segment from the measured inputs alone. Every sampled measurement from row n on is
scored, in the tag's unit; the first n are not (they were used). Each kind may bring several
training runs (seeds): the table keeps each, the summary gives mean and spread.

Torch, pandas and matplotlib; no MLflow (training/evaluate.py logs).
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from training.dataset import PreparedDataset
from training.plots import RunTrace
from training.run_plots import open_loop_traces


def simulate_runs(
    twins: Mapping[str, Sequence[tuple[str, str, nn.Module]]],
    dataset: PreparedDataset,
    split: str,
    init_steps: int,
) -> tuple[pd.DataFrame, dict[str, dict[str, list[RunTrace]]]]:
    """Simulate every run segment of `split` with every twin; RMSE per twin, segment and tag.

    Args:
        twins: kind -> [(training run id, seed, TwinModel eager or scripted), ...].
        dataset: the prepared dataset the twins were trained on.
        split: the held-out split (e.g. "test": the benchmark's validation record).
        init_steps: n, rows of each segment used for the initial state (not scored).

    Returns:
        The long table (kind, run_id, seed, segment, tag, unit, n_init, rmse, n) and the
        traces, kind -> run id -> one RunTrace per segment (tag units).
    """
    rows, traces = [], {}
    tags = dataset.measurement_tags
    for kind, runs in twins.items():
        traces[kind] = {}
        for run_id, seed, twin in runs:
            traces[kind][run_id] = open_loop_traces(twin, dataset, split, init_steps)
            for trace in traces[kind][run_id]:
                error = trace.predicted - trace.measured
                for i, tag in enumerate(tags):
                    sampled = np.isfinite(trace.measured[:, i])
                    n = int(sampled.sum())
                    rmse = float(np.sqrt(np.mean(error[sampled, i] ** 2))) if n else float("nan")
                    rows.append(
                        {
                            "kind": kind,
                            "run_id": run_id,
                            "seed": seed,
                            "segment": trace.run_id,
                            "tag": tag,
                            "unit": dataset.manifest["tags"][tag]["unit"],
                            "n_init": init_steps,
                            "rmse": rmse,
                            "n": n,
                        }
                    )
    return pd.DataFrame(rows), traces


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample standard deviation (ddof 1; NaN for one run), min, max and number of runs
    of the RMSE per kind, segment and tag, kinds in table order."""
    grouped = table.groupby(["kind", "segment", "tag", "unit", "n_init"], sort=False)["rmse"]
    out = grouped.agg(["mean", "std", "min", "max", "count"]).reset_index()
    return out.rename(columns={"count": "n_runs"})


def simulation_markdown(summary: pd.DataFrame, published: Mapping[str, float] | None = None) -> str:
    """One row per kind, segment and tag: RMSE mean ± std (min-max, n runs); then the
    published figures, if given, for the reader to set beside them."""
    lines = [
        "| kind | segment | tag | init rows n | RMSE mean ± std | min - max | runs |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary.itertuples():
        spread = "" if r.std != r.std else f" ± {r.std:.3f}"
        lines.append(
            f"| {r.kind} | {r.segment} | {r.tag} | {r.n_init} | {r.mean:.3f}{spread} {r.unit} "
            f"| {r.min:.3f} - {r.max:.3f} | {r.n_runs} |"
        )
    if published:
        lines += ["", "| published | RMSE |", "| --- | --- |"]
        lines += [f"| {name} | {value:.2f} |" for name, value in published.items()]
    return "\n".join(lines) + "\n"


def median_run(table: pd.DataFrame, kind: str) -> str:
    """The run id of `kind` whose mean relative RMSE over segments and tags is the median one
    (the lower median for an even count): the run a plot shows as typical. Each RMSE is taken
    relative to the mean of its segment and tag over the kind's runs, so tags in different
    units weigh alike (a plain mean would be the rpm tag's alone)."""
    rows = table[table["kind"] == kind]
    typical = rows.groupby(["segment", "tag"], sort=False)["rmse"].transform("mean")
    relative = rows["rmse"] / typical.where(typical > 0, 1.0)
    per_run = relative.groupby(rows["run_id"], sort=False).mean()
    ordered = per_run.sort_values(kind="stable")
    return str(ordered.index[(len(ordered) - 1) // 2])


def plot_simulation(
    traces: Mapping[str, list[RunTrace]], tags: Sequence[str], units: Sequence[str], out: Path
) -> list[Path]:
    """Measured vs simulated, one figure per segment, one panel per tag, one line per kind.

    Args:
        traces: kind -> the traces of one run of that kind (e.g. its median run).
        tags, units: the measurement tags and their units, in trace column order.
        out: folder for `simulation_<segment>.png`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    first = next(iter(traces.values()))
    for s, segment in enumerate(first):
        fig, axes = plt.subplots(len(tags), 1, figsize=(9, 3 * len(tags)), squeeze=False)
        for i, (tag, unit) in enumerate(zip(tags, units, strict=True)):
            ax = axes[i, 0]
            minutes = segment.time_s / 60.0
            ax.plot(minutes, segment.measured[:, i], "k.", ms=2, label="measured")
            for kind, runs in traces.items():
                error = runs[s].predicted[:, i] - runs[s].measured[:, i]
                rmse = float(np.sqrt(np.nanmean(error**2)))
                ax.plot(minutes, runs[s].predicted[:, i], lw=1, label=f"{kind} ({rmse:.3f} {unit})")
            ax.set_ylabel(f"{tag} [{unit}]")
            ax.legend(fontsize=8, loc="upper right")
        axes[-1, 0].set_xlabel("time since the record's start [min]")
        fig.suptitle(f"{segment.run_id}: simulated from its first rows, measured inputs only")
        fig.tight_layout()
        path = out / f"simulation_{segment.run_id}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
