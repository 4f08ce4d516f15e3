"""The plots a training run logs: each held-out run simulated open loop from its start.

Every run segment of the split is one window from row P to its end: the initial state comes
from its first P rows, then the twin runs open loop over the whole run (hours), which is the
hardest view of a model and the one a reviewer wants to see. training/plots.py draws the
figures; this module makes the traces and puts the PNGs into the active MLflow run under
`plots/`.
"""

import dataclasses
import logging
from pathlib import Path

import mlflow
import numpy as np
import torch

from training.dataset import PreparedDataset, RunTensors
from training.plots import RunTrace, write_run_plots
from training.twin_model import TwinModel
from training.windows import cut_window

log = logging.getLogger(__name__)


@torch.no_grad()
def open_loop_traces(
    model: TwinModel, dataset: PreparedDataset, split: str, past_steps: int
) -> list[RunTrace]:
    """One trace per run segment of `split` longer than P + 1 rows, in tag units.

    All runs are simulated as one batch: shorter ones are padded by holding their last row
    (unsampled), and their traces cut back to their own length; the padding comes after
    every predicted row, so it cannot change one.
    """
    model.eval()
    stats = dataset.normalisation()
    y_mean, y_std = stats.y_mean.numpy(), stats.y_std.numpy()
    runs, short = [], []
    for run in dataset.load_split(split):
        (runs if run.n_rows - past_steps >= 2 else short).append(run)
    if short:
        log.warning(
            "plots of %s: %d run segments too short to simulate after %d past rows are not "
            "drawn: %s",
            split,
            len(short),
            past_steps,
            ", ".join(f"{run.run_id} ({run.n_rows} rows)" for run in short),
        )
    if not runs:
        return []
    steps = max(run.n_rows for run in runs) - past_steps
    windows = [
        cut_window(_hold_last_row(run, past_steps + steps), i, past_steps, steps, past_steps)
        for i, run in enumerate(runs)
    ]
    y_hat, states, inputs, _ = model.simulate(
        *(
            torch.stack([getattr(w, name) for w in windows])
            for name in ("past_u", "past_y", "past_mask", "u")
        )
    )
    g = model.field.residual(states.flatten(0, 1), inputs.flatten(0, 1))
    size = g.pow(2).mean(dim=1).reshape(len(runs), -1) if g.numel() else None
    traces = []
    for i, (run, window) in enumerate(zip(runs, windows, strict=True)):
        n = run.n_rows - past_steps
        measured = window.y[:n].numpy() * y_std + y_mean
        traces.append(
            RunTrace(
                run_id=run.run_id,
                regime=str(dataset.manifest["runs"][run.run_id].get("regime") or "all"),
                time_s=window.time_s[:n].numpy(),
                measured=np.where(window.mask[:n].numpy(), measured, np.nan),
                predicted=y_hat[i, :n].numpy() * y_std + y_mean,
                residual_size=None if size is None else size[i, :n].numpy(),
            )
        )
    return traces


def _hold_last_row(run: RunTensors, n_rows: int) -> RunTensors:
    """`run` extended to n_rows by repeating its last row, unsampled and 1 dt apart."""
    extra = n_rows - run.n_rows
    if extra == 0:
        return run
    dt = float(run.time_s[1] - run.time_s[0])
    return dataclasses.replace(
        run,
        time_s=torch.cat([run.time_s, run.time_s[-1] + dt * torch.arange(1, extra + 1)]),
        u=torch.cat([run.u, run.u[-1:].expand(extra, -1)]),
        y=torch.cat([run.y, torch.zeros(extra, run.y.shape[1], dtype=run.y.dtype)]),
        mask=torch.cat([run.mask, torch.zeros(extra, run.mask.shape[1], dtype=torch.bool)]),
    )


def log_run_plots(
    model: TwinModel, dataset: PreparedDataset, split: str, past_steps: int, out_dir: Path
) -> list[Path]:
    """Write the plots of `split` to out_dir and log them to the active run under plots/."""
    traces = open_loop_traces(model, dataset, split, past_steps)
    if not traces:
        return []
    tags = dataset.measurement_tags
    units = [dataset.manifest["tags"][tag]["unit"] for tag in tags]
    paths = write_run_plots(traces, tags, units, out_dir)
    mlflow.log_artifacts(str(out_dir), artifact_path="plots")
    return paths
