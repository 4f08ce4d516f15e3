"""Open-loop forecast errors of a twin on held-out runs, per tag and horizon.

Protocol (docs/training.md, "Evaluation"): on every run segment of a split, forecast origins
sit every `stride_steps` rows from row P on, wherever the past window (P rows) and the longest
horizon fit inside the segment. From each origin the twin estimates its initial state from the
past window and then simulates open loop over the measured inputs, never seeing another
measurement. The RMSE "at horizon h" of a tag pools every sampled measurement with lead time
in (0, h] after the origin (row 0, one dt after the last past row), i.e. rows 1..h: at most
h + dt after the last measurement used. Row 0 is left out by convention (a one-step forecast
whose directly measured states hold their last past value).
Errors are in the tag's engineering unit.

Torch only (no MLflow, no files): `twin evaluate` (training/evaluate.py) does the I/O.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from training.dataset import DatasetError, Normalisation, RunTensors
from training.windows import Window, cut_window


@dataclass(frozen=True)
class ForecastOrigins:
    """The forecast windows of one split, batched.

    Attributes:
        windows: a batched `Window` of T = horizon_steps + 1 rows (row 0 is the origin).
        run_ids: (batch,) the run segment of each window.
        skipped: run segments too short for one origin, with the rows they have.
    """

    windows: Window
    run_ids: list[str]
    skipped: dict[str, int]


def forecast_origins(
    runs: Sequence[RunTensors], past_steps: int, horizon_steps: int, stride_steps: int
) -> ForecastOrigins:
    """Windows starting every `stride_steps` rows at row P, wherever P + horizon + 1 rows fit.

    Raises:
        ValueError: a size below 1.
        DatasetError: no run segment holds one origin (the message lists each with its rows).
    """
    if min(past_steps, horizon_steps, stride_steps) < 1:
        raise ValueError(
            f"past_steps, horizon_steps and stride_steps must be >= 1, got {past_steps}, "
            f"{horizon_steps}, {stride_steps}"
        )
    steps = horizon_steps + 1
    items: list[Window] = []
    run_ids: list[str] = []
    skipped: dict[str, int] = {}
    for index, run in enumerate(runs):
        starts = range(past_steps, run.n_rows - steps + 1, stride_steps)
        if not starts:
            skipped[run.run_id] = run.n_rows
        for t0 in starts:
            items.append(cut_window(run, index, t0, steps, past_steps))
            run_ids.append(run.run_id)
    if not items:
        listed = ", ".join(f"{run_id} ({rows} rows)" for run_id, rows in skipped.items())
        raise DatasetError(
            f"no run segment is long enough for one forecast of {horizon_steps} steps after "
            f"{past_steps} past steps: {listed or 'no runs given'}"
        )
    windows = Window(*(torch.stack(field) for field in zip(*items, strict=True)))
    return ForecastOrigins(windows, run_ids, skipped)


@torch.no_grad()
def forecast(model: nn.Module, windows: Window, batch_size: int = 64) -> Tensor:
    """Normalised open-loop predictions (batch, T, n_y) of a TwinModel (eager or scripted)."""
    model.eval()
    chunks = [
        model(
            windows.past_u[start : start + batch_size],
            windows.past_y[start : start + batch_size],
            windows.past_mask[start : start + batch_size],
            windows.u[start : start + batch_size],
        )
        for start in range(0, windows.u.shape[0], batch_size)
    ]
    return torch.cat(chunks)


@dataclass(frozen=True)
class HorizonErrors:
    """Squared-error sums per group of windows, tag and horizon: RMSE = sqrt(sse / count).

    Attributes:
        sse, count: (n_groups, n_tags, n_horizons) float64 / int64.
    """

    sse: Tensor
    count: Tensor

    def rmse(self) -> Tensor:
        """(n_groups, n_tags, n_horizons); NaN where no measurement was sampled."""
        return torch.where(
            self.count > 0, (self.sse / self.count.clamp_min(1)).sqrt(), float("nan")
        )


def horizon_errors(
    predicted: Tensor,
    windows: Window,
    normalisation: Normalisation,
    horizon_steps: Sequence[int],
    groups: Tensor,
    n_groups: int,
) -> HorizonErrors:
    """Pool squared errors in tag units by group (e.g. regime), tag and horizon.

    Args:
        predicted: (batch, T, n_y) normalised predictions for `windows`.
        windows: the batched windows (y, mask normalised as served).
        normalisation: the dataset's statistics (y_mean, y_std undo the normalisation).
        horizon_steps: h in rows; rows 1..h of each window count for horizon h.
        groups: (batch,) int64 group of each window, in 0..n_groups-1.
        n_groups: number of groups.
    """
    if predicted.shape != windows.y.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} != y {tuple(windows.y.shape)}")
    y_std = normalisation.y_std.to(torch.float64)
    error = (predicted.to(torch.float64) - windows.y.to(torch.float64)) * y_std
    # a non-finite forecast (a diverged window) is left out and not counted in n: one such
    # window would otherwise make the whole pooled cell NaN
    counted = windows.mask & torch.isfinite(error)
    squared = torch.where(counted, error.pow(2), torch.zeros_like(error))
    one_hot = torch.nn.functional.one_hot(groups, n_groups).to(torch.float64)  # (batch, G)
    sse, count = [], []
    for h in horizon_steps:
        if not 1 <= h < windows.y.shape[1]:
            raise ValueError(
                f"horizon of {h} steps outside the windows' 1..{windows.y.shape[1] - 1}"
            )
        rows = slice(1, h + 1)
        sse.append(one_hot.T @ squared[:, rows].sum(1))
        count.append(one_hot.T @ counted[:, rows].sum(1).to(torch.float64))
    return HorizonErrors(torch.stack(sse, -1), torch.stack(count, -1).round().to(torch.int64))
