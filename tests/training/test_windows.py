"""Training and evaluation windows over run segments (training/windows.py)."""

import pytest
import torch

from training.dataset import DatasetError, PreparedDataset
from training.windows import (
    RandomWindowSampler,
    SequentialWindows,
    TrajectoryWindows,
    Window,
    cut_window,
)

P, T = 4, 10
# The synthetic dataset's layout (tests/training/conftest.py).
TAG_COLUMNS = ["FEED_API.MASSFLOW_SP", "BLEND.SPEED_SP", "FEED_API.HOPPER_MASS"]
MEASUREMENTS = ["FEED_API.MASSFLOW", "NIR.API_CONC", "PRESS.TABLET_WEIGHT"]
TRAIN_ROWS = {"R001": 80, "R002": 60, "R002_s1": 40 - 3}  # R002_s1 loses 3 leading rows
SEGMENT_CODES = {"R001": 1, "R002": 2, "R002_s1": 3}


@pytest.fixture
def dataset(prepared, float64):
    return PreparedDataset.open(prepared.path)


@pytest.fixture
def train_windows(dataset):
    return TrajectoryWindows(dataset.load_split("train"), window_steps=T, past_steps=P)


def raw_inputs(dataset, window: Window) -> torch.Tensor:
    """Denormalised (P + T, n_inputs) inputs of a single window, past rows first."""
    stats = dataset.normalisation()
    return torch.cat([window.past_u, window.u]) * stats.u_std + stats.u_mean


def test_every_position_of_every_long_enough_run_is_a_window(train_windows):
    assert train_windows.run_ids == ["R001", "R002", "R002_s1"]
    assert len(train_windows) == sum(rows - (P + T) + 1 for rows in TRAIN_ROWS.values())
    positions = {train_windows.position(k) for k in range(len(train_windows))}
    assert len(positions) == len(train_windows)
    first, last = train_windows.position(0), train_windows.position(len(train_windows) - 1)
    assert first == (0, P) and last == (2, TRAIN_ROWS["R002_s1"] - T)


def test_windows_never_cross_a_segment_boundary(dataset, prepared, train_windows):
    for k in range(len(train_windows)):
        window = train_windows[k]
        run_id = train_windows.run_ids[int(window.run_index)]
        rows = torch.arange(int(window.t0) - P, int(window.t0) + T, dtype=torch.float64)
        frame = prepared.frames[run_id].iloc[int(window.t0) - P : int(window.t0) + T]
        raw = raw_inputs(dataset, window)
        # The API setpoint is the file row and the hopper mass the segment's code * 10, so
        # a window spilling into another segment or skipping rows would show here.
        torch.testing.assert_close(raw[:, 0], rows)
        torch.testing.assert_close(raw[:, 2], torch.full((P + T,), 10.0 * SEGMENT_CODES[run_id]))
        torch.testing.assert_close(window.time_s, torch.tensor(frame["time_s"].to_numpy()[P:]))


def test_no_window_reaches_the_rows_before_an_input_holds_a_value(train_windows):
    s1 = train_windows.run_ids.index("R002_s1")
    starts = [
        int(train_windows[k].t0)
        for k in range(len(train_windows))
        if train_windows.position(k)[0] == s1
    ]
    assert min(starts) - P == 3  # file row 3 is the first with every input held
    assert all(torch.isfinite(train_windows[k].u).all() for k in range(len(train_windows)))


def test_masks_match_the_count_columns_and_masked_y_is_zero(prepared, train_windows):
    for k in range(0, len(train_windows), 7):
        window = train_windows[k]
        run_id = train_windows.run_ids[int(window.run_index)]
        counts = prepared.frames[run_id][[tag + "__n" for tag in MEASUREMENTS]].to_numpy()
        t0 = int(window.t0)
        assert torch.equal(window.mask, torch.tensor(counts[t0 : t0 + T] > 0))
        assert torch.equal(window.past_mask, torch.tensor(counts[t0 - P : t0] > 0))
        assert torch.all(window.y[~window.mask] == 0) and not torch.isnan(window.y).any()
        assert not torch.isnan(window.past_y).any()


def test_multi_rate_measurements_are_masked_at_their_own_rates(dataset):
    runs = dataset.load_split("val")
    window = SequentialWindows(runs, window_steps=24, past_steps=P)[0]
    rows = torch.arange(P, P + 24)
    tablet = window.mask[:, MEASUREMENTS.index("PRESS.TABLET_WEIGHT")]
    nir = window.mask[:, MEASUREMENTS.index("NIR.API_CONC")]
    assert torch.equal(tablet, rows % 12 == 0)  # one at-line weight a minute
    assert torch.equal(nir, rows % 7 != 6)  # every 7th NIR scan missed


def test_runs_too_short_are_skipped_and_counted(train_windows):
    assert [(s.run_id, s.usable_rows, s.needed_rows) for s in train_windows.skipped] == [
        ("R003", 8, P + T)
    ]


def test_skip_reason_mentions_rows_dropped_for_a_missing_input(dataset):
    windows = TrajectoryWindows(dataset.load_split("train"), window_steps=36, past_steps=P)
    (s1,) = [s for s in windows.skipped if s.run_id == "R002_s1"]
    assert "37 usable rows < 40" in s1.reason and "3 leading rows dropped" in s1.reason


def test_no_run_long_enough_is_an_error_listing_the_runs(dataset):
    with pytest.raises(DatasetError, match="R001: 80 usable rows < 101"):
        TrajectoryWindows(dataset.load_split("train"), window_steps=100, past_steps=1)


def test_same_seed_same_windows_and_another_seed_or_epoch_others(train_windows):
    n = len(train_windows)
    a, b = RandomWindowSampler(n, 64, seed=3), RandomWindowSampler(n, 64, seed=3)
    assert list(a) == list(b)
    assert not torch.equal(a.draws(0), RandomWindowSampler(n, 64, seed=4).draws(0))
    assert not torch.equal(a.draws(0), a.draws(1))
    assert (0 <= a.draws(0)).all() and (a.draws(0) < n).all()


def test_set_epoch_reproduces_that_epochs_draws(train_windows):
    sampler = RandomWindowSampler(len(train_windows), 32, seed=0)
    first, second = list(sampler), list(sampler)  # each pass moves on one epoch
    assert first != second
    sampler.set_epoch(1)
    assert list(sampler) == second == sampler.draws(1).tolist()
    assert len(sampler) == 32


def test_sequential_windows_tile_each_run_without_overlap(dataset):
    runs = dataset.load_split("test") + dataset.load_split("val")  # R005: 47 rows, R004: 50
    windows = SequentialWindows(runs, window_steps=T, past_steps=P)
    starts = [(windows.run_ids[int(w.run_index)], int(w.t0)) for w in windows]
    assert starts == [("R005", P + j * T) for j in range(4)] + [
        ("R004", P + j * T) for j in range(4)
    ]
    assert windows.uncovered_rows == {"R005": 47 - P - 4 * T, "R004": 50 - P - 4 * T}
    again = SequentialWindows(runs, window_steps=T, past_steps=P)
    assert all(torch.equal(x.y, y.y) for x, y in zip(windows, again, strict=True))


def test_full_run_view_is_one_window_per_run_from_the_past_window_on(dataset):
    runs = dataset.load_split("test")
    (window,) = list(SequentialWindows(runs, window_steps=None, past_steps=P))
    assert window.u.shape == (47 - P, 3) and window.past_y.shape == (P, 3)
    assert int(window.t0) == P
    torch.testing.assert_close(torch.cat([window.past_u, window.u]), runs[0].u)


def test_window_sizes_below_one_are_refused(dataset):
    runs = dataset.load_split("val")
    with pytest.raises(ValueError, match="past_steps must be an int >= 1"):
        SequentialWindows(runs, window_steps=T, past_steps=0)
    with pytest.raises(ValueError, match="window_steps must be an int >= 1"):
        TrajectoryWindows(runs, window_steps=0, past_steps=P)


def test_a_window_reaching_outside_its_run_is_refused(dataset):
    (run,) = dataset.load_split("val")
    with pytest.raises(IndexError, match="run R004"):
        cut_window(run, 0, t0=run.n_rows - T + 1, window_steps=T, past_steps=P)
    with pytest.raises(IndexError, match="run R004"):
        cut_window(run, 0, t0=P - 1, window_steps=T, past_steps=P)
