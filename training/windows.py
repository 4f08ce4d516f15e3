"""Run tensors -> training and evaluation windows (DESIGN.md, data flow step 3).

A window is a sub-trajectory of `window_steps` (T) grid rows that the model predicts, with the
`past_steps` (P) rows just before it from which the initial state is estimated. Each run
segment (dataset.RunTensors) is windowed on its own, so no window crosses a segment boundary.

- `TrajectoryWindows` holds every position a window of P + T rows fits at, across the train
  runs; `RandomWindowSampler` draws `num_samples` of those positions per epoch from a
  torch.Generator seeded by (seed, epoch). The draws happen in the sampler, in the main
  process, so they do not depend on num_workers, and Lightning's fit loop sets the epoch.
- `SequentialWindows` is the deterministic view for val/test/fault runs: non-overlapping
  windows from the start of each run, or each run whole.

Runs too short for a single window are skipped and listed in `skipped`, never dropped silently.
"""

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from training.dataset import DatasetError, RunTensors


class Window(NamedTuple):
    """One window, or a batch of them as the DataLoader collates it (batch dimension first).

    Shapes are given for a batch; a single item lacks the leading `batch`. u and y are
    normalised with the train statistics (dataset.Normalisation); y is 0 where mask is False,
    so a masked loss never meets a NaN.

    Attributes:
        u: (batch, T, n_inputs) inputs then disturbances, in manifest order; row k is the
            zero-order-held value at time_s[k].
        y: (batch, T, n_measurements) measurements, in manifest order.
        mask: (batch, T, n_measurements) bool, True where the measurement was sampled
            (`<TAG>__n > 0`); multi-rate sensors are True only on their sampled rows.
        past_u: (batch, P, n_inputs) the P rows just before u.
        past_y: (batch, P, n_measurements) the P rows just before y.
        past_mask: (batch, P, n_measurements) bool.
        time_s: (batch, T) float64 seconds since the segment start of each row of u and y.
        t0: (batch,) int64 row of the segment's Parquet file holding u[:, 0] and y[:, 0].
        run_index: (batch,) int64 index into the windows' `run_ids`.
    """

    u: Tensor
    y: Tensor
    mask: Tensor
    past_u: Tensor
    past_y: Tensor
    past_mask: Tensor
    time_s: Tensor
    t0: Tensor
    run_index: Tensor


class SkippedRun(NamedTuple):
    """A run segment that yields no window, and why."""

    run_id: str
    usable_rows: int
    needed_rows: int
    reason: str


def _check_steps(window_steps: int | None, past_steps: int) -> None:
    if window_steps is not None and (not isinstance(window_steps, int) or window_steps < 1):
        raise ValueError(f"window_steps must be an int >= 1, got {window_steps!r}")
    if not isinstance(past_steps, int) or past_steps < 1:
        raise ValueError(
            f"past_steps must be an int >= 1 (the initial state is estimated "
            f"from the past window), got {past_steps!r}"
        )


def _skip(run: RunTensors, needed: int, what: str) -> SkippedRun:
    reason = f"{run.n_rows} usable rows < {needed} ({what})"
    if run.first_row:
        reason += f"; {run.first_row} leading rows dropped because an input had no held value yet"
    return SkippedRun(run.run_id, run.n_rows, needed, reason)


def _no_windows_error(kind: str, skipped: list[SkippedRun]) -> DatasetError:
    listed = "; ".join(f"{s.run_id}: {s.reason}" for s in skipped) or "no runs given"
    return DatasetError(f"{kind}: no run is long enough for one window ({listed})")


def cut_window(
    run: RunTensors, run_index: int, t0: int, window_steps: int, past_steps: int
) -> Window:
    """The window of `run` whose first predicted row is `t0` (a row of the run tensors).

    Args:
        run: the run segment.
        run_index: recorded in the window for traceability.
        t0: first row of u and y; rows t0 - past_steps .. t0 - 1 form the past window.
        window_steps: T; past_steps: P.

    Returns:
        A single `Window` (no batch dimension); t0 is stored as the Parquet file row.

    Raises:
        IndexError: the window or its past window reaches outside the run.
    """
    if t0 < past_steps or t0 + window_steps > run.n_rows:
        raise IndexError(
            f"run {run.run_id}: a window at t0 = {t0} with P = {past_steps}, "
            f"T = {window_steps} needs rows {t0 - past_steps}..."
            f"{t0 + window_steps - 1}, the run has rows 0...{run.n_rows - 1}"
        )
    now, past = slice(t0, t0 + window_steps), slice(t0 - past_steps, t0)
    return Window(
        u=run.u[now],
        y=run.y[now],
        mask=run.mask[now],
        past_u=run.u[past],
        past_y=run.y[past],
        past_mask=run.mask[past],
        time_s=run.time_s[now],
        t0=torch.tensor(run.first_row + t0, dtype=torch.int64),
        run_index=torch.tensor(run_index, dtype=torch.int64),
    )


class TrajectoryWindows(Dataset[Window]):
    """Every window of P + T consecutive rows inside one run segment, by a flat index.

    Index k enumerates the positions run by run, t0 ascending: run 0 at t0 = P, P + 1, ...,
    then run 1. Draw random windows with `RandomWindowSampler`.

    Args:
        runs: the run segments (usually the train split).
        window_steps: T, rows predicted per window.
        past_steps: P, rows before the window for the initial-state estimate.

    Raises:
        ValueError: window_steps or past_steps below 1.
        DatasetError: no run has P + T rows (the message lists each run and why).
    """

    def __init__(self, runs: Sequence[RunTensors], window_steps: int, past_steps: int):
        _check_steps(window_steps, past_steps)
        self.window_steps, self.past_steps = window_steps, past_steps
        needed = past_steps + window_steps
        self.runs = [run for run in runs if run.n_rows >= needed]
        self.skipped = [
            _skip(run, needed, "past_steps + window_steps") for run in runs if run.n_rows < needed
        ]
        if not self.runs:
            raise _no_windows_error("TrajectoryWindows", self.skipped)
        self.run_ids = [run.run_id for run in self.runs]
        per_run = torch.tensor([run.n_rows - needed + 1 for run in self.runs])
        # _ends[i] = number of positions in runs 0..i; searchsorted maps k back to its run.
        self._ends = torch.cumsum(per_run, dim=0)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def position(self, index: int) -> tuple[int, int]:
        """(run index, t0 as a row of the run tensors) of flat position `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"window index {index} outside [0, {len(self)})")
        run_index = int(torch.searchsorted(self._ends, index, right=True))
        start = int(self._ends[run_index - 1]) if run_index else 0
        return run_index, self.past_steps + index - start

    def __getitem__(self, index: int) -> Window:
        run_index, t0 = self.position(int(index))
        return cut_window(self.runs[run_index], run_index, t0, self.window_steps, self.past_steps)


class RandomWindowSampler(Sampler[int]):
    """`num_samples` window positions per epoch, uniform with replacement, seeded by epoch.

    The draws of epoch e depend on (seed, e) only. Lightning's fit loop calls `set_epoch`
    before each epoch; without it, each pass over the sampler moves on to the next epoch, so
    a plain loop still sees new windows every epoch.

    Args:
        num_positions: len(TrajectoryWindows), the positions to draw from.
        num_samples: windows per epoch.
        seed: base seed.
    """

    def __init__(self, num_positions: int, num_samples: int, seed: int):
        if num_positions < 1 or num_samples < 1:
            raise ValueError(
                f"num_positions and num_samples must be >= 1, got {num_positions} and {num_samples}"
            )
        self.num_positions, self.num_samples, self.seed = num_positions, num_samples, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def draws(self, epoch: int) -> Tensor:
        """(num_samples,) int64 positions of `epoch`; a pure function of (seed, epoch)."""
        # SeedSequence mixes (seed, epoch) so that nearby seeds and epochs give unrelated
        # streams, which seed + epoch would not (seed 0 epoch 1 == seed 1 epoch 0).
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return torch.randint(self.num_positions, (self.num_samples,), generator=generator)

    def __iter__(self) -> Iterator[int]:
        draws = self.draws(self.epoch)
        self.epoch += 1
        return iter(draws.tolist())

    def __len__(self) -> int:
        return self.num_samples


class SequentialWindows(Dataset[Window]):
    """Deterministic windows for evaluation: non-overlapping, or each run whole.

    With window_steps = T, run i yields windows at t0 = P, P + T, P + 2T, ... while they fit;
    the tail of fewer than T rows is left out and counted in `uncovered_rows`. With
    window_steps = None each run is one window from t0 = P to its end (lengths differ, so
    batch such windows one at a time).

    Args:
        runs: the run segments (a val, test or fault split).
        window_steps: T, or None for whole runs.
        past_steps: P.

    Raises:
        ValueError: window_steps or past_steps below 1.
        DatasetError: no run yields a window (the message lists each run and why).
    """

    def __init__(self, runs: Sequence[RunTensors], window_steps: int | None, past_steps: int):
        _check_steps(window_steps, past_steps)
        self.window_steps, self.past_steps = window_steps, past_steps
        needed = past_steps + (window_steps or 1)
        self.runs = [run for run in runs if run.n_rows >= needed]
        self.skipped = [
            _skip(run, needed, "past_steps + window_steps" if window_steps else "past_steps + 1")
            for run in runs
            if run.n_rows < needed
        ]
        if not self.runs:
            raise _no_windows_error("SequentialWindows", self.skipped)
        self.run_ids = [run.run_id for run in self.runs]
        self._positions: list[tuple[int, int, int]] = []  # (run index, t0, steps)
        self.uncovered_rows: dict[str, int] = {}
        for run_index, run in enumerate(self.runs):
            predictable = run.n_rows - past_steps
            steps = window_steps or predictable
            count = predictable // steps
            self._positions += [(run_index, past_steps + j * steps, steps) for j in range(count)]
            self.uncovered_rows[run.run_id] = predictable - count * steps

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, index: int) -> Window:
        run_index, t0, steps = self._positions[index]
        return cut_window(self.runs[run_index], run_index, t0, steps, self.past_steps)
