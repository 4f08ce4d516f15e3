"""align_runs: zero-order hold, cell means that never invent a value, gaps split runs."""

import numpy as np
import pandas as pd
import pytest

from data_pipelines import TagDictionary, align_runs
from data_pipelines.runs import single_run

T0 = pd.Timestamp("2025-03-01T06:00:00Z")


def _align(samples, tags, *, dt_s=5.0, max_gap_s=60.0):
    """samples: [(seconds after T0, tag, value)], one run starting at T0."""
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
    assert warnings == []
    return segments


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
