"""align_runs: zero-order hold, cell means that never invent a value, gaps split runs, a held
tag's max_hold_s ends its hold."""

import numpy as np
import pandas as pd
import pytest

from data_pipelines import TagDictionary, align_runs
from data_pipelines.runs import single_run

T0 = pd.Timestamp("2025-03-01T06:00:00Z")


def _align(samples, tags, *, dt_s=5.0, max_gap_s=60.0, warned=None):
    """samples: [(seconds after T0, tag, value)], one run starting at T0; the warnings are
    appended to `warned` (None: there must be none)."""
    dictionary = TagDictionary.from_mapping(tags)
    seconds, tag, value = zip(*samples, strict=True)
    valid = pd.DataFrame(
        {
            "timestamp": T0 + pd.to_timedelta(np.array(seconds, dtype=float), unit="s"),
            "tag": pd.Categorical(tag, categories=dictionary.names),
            "value": np.array(value, dtype=float),
            "run": 0,
        }
    )
    ns = pd.DatetimeIndex(valid["timestamp"]).as_unit("ns").asi8
    runs = single_run(int(T0.value), int(ns.max()))
    segments, warnings = align_runs(valid, runs, dictionary, dt_s=dt_s, max_gap_s=max_gap_s)
    if warned is None:
        assert warnings == []
    else:
        warned += warnings
    return segments


def _with_max_hold(tags, **max_hold_s):
    """The dictionary with max_hold_s set on the named tags (FEED_SP for FEED.SP)."""
    out = {name: dict(spec) for name, spec in tags.items()}
    for key, value in max_hold_s.items():
        out[key.replace("_", ".")]["max_hold_s"] = value
    return out


def test_inputs_are_zero_order_held_from_the_last_sample_at_or_before_each_grid_time(small_tags):
    (seg,) = _align(
        [(0, "FEED.SP", 2.0), (7, "FEED.SP", 3.0), (13, "FEED.SP", 4.0), (5, "HOPPER.MASS", 20.0)],
        small_tags,
    )
    np.testing.assert_array_equal(seg.frame["time_s"], [0.0, 5.0, 10.0, 15.0])
    np.testing.assert_array_equal(seg.frame["FEED.SP"], [2.0, 2.0, 3.0, 4.0])
    # before its first sample a held tag has no value: NaN, not a back-filled 20.0
    np.testing.assert_array_equal(seg.frame["HOPPER.MASS"], [np.nan, 20.0, 20.0, 20.0])


def test_measurement_sampled_every_60_s_leaves_11_of_12_cells_of_5_s_empty(small_tags):
    samples = [(float(t), "FEED.SP", 2.0) for t in range(0, 601)]
    samples += [(float(t), "PRESS.WEIGHT", 250.0 + t / 60) for t in range(0, 601, 60)]
    (seg,) = _align(samples, small_tags)
    weight = seg.frame["PRESS.WEIGHT"].to_numpy()
    count = seg.frame["PRESS.WEIGHT__n"].to_numpy()
    assert len(weight) == 121
    blocks = weight[1:].reshape(10, 12)  # cells (t-5, t] for t = 5 .. 600
    assert (np.isnan(blocks).sum(axis=1) == 11).all()
    np.testing.assert_array_equal(weight[::12], 250.0 + np.arange(11))
    assert count.dtype == np.int16 and count.sum() == 11
    np.testing.assert_array_equal(np.isnan(weight), count == 0)


def test_measurement_cell_is_the_mean_of_samples_in_the_left_open_interval(small_tags):
    samples = [(0.0, "NIR.CONC", 7.0)] + [(float(t), "NIR.CONC", float(t)) for t in (1, 2, 3, 4, 5)]
    samples += [(5.5, "NIR.CONC", 9.0)]
    (seg,) = _align(samples, small_tags)
    np.testing.assert_array_equal(seg.frame["NIR.CONC"], [7.0, 3.0, 9.0])
    np.testing.assert_array_equal(seg.frame["NIR.CONC__n"], [1, 5, 1])


def test_gap_longer_than_max_gap_splits_the_run_into_segments(small_tags):
    samples = [(float(t), "FEED.SP", 1.0) for t in range(0, 101)]
    samples += [(float(t), "FEED.SP", 2.0) for t in range(300, 401)]
    samples += [(50.0, "HOPPER.MASS", 20.0)]
    first, second = _align(samples, small_tags, max_gap_s=60.0)
    assert (first.segment_id, second.segment_id) == ("run_0", "run_0_s1")
    assert pd.Timestamp(first.end_ns, tz="UTC") == T0 + pd.Timedelta(seconds=100)
    assert pd.Timestamp(second.start_ns, tz="UTC") == T0 + pd.Timedelta(seconds=300)
    assert second.frame["time_s"].iloc[0] == 0.0
    assert second.frame["timestamp"].iloc[0] == T0 + pd.Timedelta(seconds=300)
    np.testing.assert_array_equal(second.frame["FEED.SP"].unique(), [2.0])
    # held tags keep their last value within the run, across the gap
    assert (second.frame["HOPPER.MASS"] == 20.0).all()


def test_gap_equal_to_max_gap_does_not_split(small_tags):
    samples = [(0.0, "FEED.SP", 1.0), (60.0, "FEED.SP", 1.0)]
    assert len(_align(samples, small_tags, max_gap_s=60.0)) == 1
    assert len(_align(samples, small_tags, max_gap_s=59.0)) == 2


@pytest.mark.parametrize("dt_s", [1.0, 2.5, 5.0])
def test_grid_is_uniform_and_anchored_at_the_run_start(small_tags, dt_s):
    samples = [(t * 0.7, "FEED.SP", 1.0) for t in range(100)]
    (seg,) = _align(samples, small_tags, dt_s=dt_s)
    steps = np.diff(pd.DatetimeIndex(seg.frame["timestamp"]).asi8)
    assert (steps == int(dt_s * 1e9)).all()
    assert seg.frame["timestamp"].iloc[0] == T0
    assert list(seg.frame.columns) == [
        "time_s",
        "timestamp",
        "FEED.SP",
        "HOPPER.MASS",
        "NIR.CONC",
        "PRESS.WEIGHT",
        "NIR.CONC__n",
        "PRESS.WEIGHT__n",
    ]


def _outage(first_silent_s=100, back_s=250, end_s=400):
    """FEED.SP every second except (first_silent_s, back_s); HOPPER.MASS and NIR.CONC every
    second throughout, so no gap splits the run."""
    feed = [t for t in range(end_s + 1) if t <= first_silent_s or t >= back_s]
    samples = [(float(t), "FEED.SP", 1.0 if t <= first_silent_s else 2.0) for t in feed]
    samples += [(float(t), "HOPPER.MASS", 20.0) for t in range(end_s + 1)]
    samples += [(float(t), "NIR.CONC", 10.0 + t / 100) for t in range(end_s + 1)]
    return samples


def test_without_max_hold_an_input_lost_for_150_s_is_held_throughout(small_tags):
    (seg,) = _align(_outage(), small_tags)
    feed = seg.frame.set_index("time_s")["FEED.SP"]
    assert (feed.loc[105.0:245.0] == 1.0).all()


def test_an_input_older_than_max_hold_is_nan_and_the_run_splits_where_it_went_stale(small_tags):
    warned = []
    first, second = _align(_outage(), _with_max_hold(small_tags, FEED_SP=30.0), warned=warned)
    assert (first.segment_id, second.segment_id) == ("run_0", "run_0_s1")
    # last sample at 100 s: the grid point at 130 s holds it (30 s old), 135 s has no value
    assert first.frame["time_s"].iloc[-1] == 130.0
    assert (first.frame["FEED.SP"] == 1.0).all()
    assert pd.Timestamp(second.start_ns, tz="UTC") == T0 + pd.Timedelta(seconds=135)
    feed = second.frame["FEED.SP"].to_numpy()
    assert np.isnan(feed[:23]).all() and (feed[23:] == 2.0).all()  # 135..245 s, then 250 s on
    # the other tags go on in the second segment; no measurement sample is lost
    assert (second.frame["HOPPER.MASS"] == 20.0).all()
    assert first.frame["NIR.CONC__n"].sum() + second.frame["NIR.CONC__n"].sum() == 401
    assert warned == [
        "run run_0 tag FEED.SP: 23 grid points without a value, its last valid sample older "
        "than max_hold_s = 30 s (up to 145 s old): left NaN, not held, and the run split "
        "where the value went stale"
    ]


def test_an_input_lost_until_the_run_end_leaves_a_last_segment_without_it(small_tags):
    warned = []
    samples = [s for s in _outage(back_s=10_000) if s[0] <= 400]
    first, second = _align(samples, _with_max_hold(small_tags, FEED_SP=30.0), warned=warned)
    assert first.frame["time_s"].iloc[-1] == 130.0
    assert second.frame["FEED.SP"].isna().all() and len(second.frame) == 54  # 135..400 s
    assert "54 grid points without a value" in warned[0]


def test_a_stale_stretch_shorter_than_a_grid_step_changes_nothing(small_tags):
    # silent 100..131 s: the value at 130 s is 30 s old, at 135 s it is 4 s old
    (seg,) = _align(_outage(back_s=131), _with_max_hold(small_tags, FEED_SP=30.0))
    assert not seg.frame["FEED.SP"].isna().any()


def test_held_values_follow_their_max_hold_on_random_outages(small_tags):
    """Two held tags with random outages: every grid value is the last sample at most
    max_hold_s old or NaN (computed here sample by sample), the segments tile the grid of the
    run without max_hold_s, and in each segment the held tags, once all have a value, keep one."""
    rng = np.random.default_rng(7)
    max_hold = {"FEED.SP": 12.0, "HOPPER.MASS": 21.0}
    samples = []
    for name in max_hold:
        alive = np.ones(2000, dtype=bool)
        for start in rng.integers(0, 2000, size=12):
            alive[start : start + rng.integers(5, 80)] = False
        samples += [(float(t), name, float(t)) for t in np.flatnonzero(alive)]
    samples += [(float(t), "NIR.CONC", 10.0) for t in range(0, 2000, 5)]
    warned = []
    tags = _with_max_hold(small_tags, FEED_SP=12.0, HOPPER_MASS=21.0)
    segments = _align(samples, tags, dt_s=3.0, warned=warned)
    (unlimited,) = _align(samples, small_tags, dt_s=3.0)
    assert len(segments) > 2 and len(warned) == 2
    frame = pd.concat([s.frame.assign(time_s=s.frame["time_s"] + (s.start_ns - T0.value) / 1e9)
                       for s in segments])  # fmt: skip
    np.testing.assert_array_equal(frame["time_s"], unlimited.frame["time_s"])
    for name, limit in max_hold.items():
        times = np.array(sorted(t for t, tag, _ in samples if tag == name))
        for t, value in zip(frame["time_s"], frame[name], strict=True):
            before = times[times <= t]
            fresh = len(before) and t - before[-1] <= limit
            assert value == before[-1] if fresh else np.isnan(value), (name, t)
    for seg in segments:
        complete = seg.frame[list(max_hold)].notna().all(axis=1).to_numpy()
        if complete.any():
            assert complete[np.argmax(complete) :].all(), seg.segment_id
