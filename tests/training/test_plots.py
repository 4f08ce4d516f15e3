"""Review figures: real PNG files, RMSE text against a hand computation, NaN never drawn.

The example has three runs on a 5 s grid (two interpolation, one extrapolation) and three
tags at the rates of the line: a 5 s NIR with a few missed samples, a 10 s feeder reading and
a 60 s at-line tablet weight (one sample in twelve rows).
"""

import ast
import io
import math
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

import training.plots
from training.plots import (
    PLOT_DPI,
    RunTrace,
    plot_parity,
    plot_predicted_vs_measured,
    plot_residual_size,
    write_run_plots,
)

TAGS = ["NIR.API_CONC", "FEED_API.MASSFLOW", "PRESS.TABLET_WEIGHT"]
UNITS = ["%w/w", "kg/h", "mg"]
N_ROWS = 37  # 3 minutes at 5 s, so the 60 s tag has rows 0, 12, 24, 36
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The figure prints RMSE with 4 significant digits: at most 5e-4 relative rounding.
PRINTED_RMSE_REL = 1e-3


def make_trace(rng, run_id, regime, with_residual=True):
    time_s = 5.0 * np.arange(N_ROWS)
    truth = np.array([10.0, 6.0, 250.0]) + rng.normal(0.0, [0.5, 0.2, 3.0], (N_ROWS, 3))
    measured = truth + rng.normal(0.0, [0.1, 0.05, 1.0], (N_ROWS, 3))
    measured[rng.random(N_ROWS) < 0.15, 0] = np.nan  # missed NIR spectra
    measured[1::2, 1] = np.nan
    measured[np.arange(N_ROWS) % 12 != 0, 2] = np.nan
    predicted = truth + rng.normal(0.0, [0.3, 0.1, 2.0], (N_ROWS, 3))
    residual = rng.random(N_ROWS) * 1e-3 if with_residual else None
    return RunTrace(run_id, regime, time_s, measured, predicted, residual)


@pytest.fixture
def traces(np_rng):
    return [
        make_trace(np_rng, "R001", "interpolation"),
        make_trace(np_rng, "R002", "interpolation"),
        make_trace(np_rng, "R003", "extrapolation", with_residual=False),
    ]


def hand_rmse(traces, regime, column):
    """RMSE over the sampled rows of one tag in one regime, written out as loops."""
    errors = []
    for trace in traces:
        if trace.regime != regime:
            continue
        for row in range(trace.time_s.shape[0]):
            if not math.isnan(trace.measured[row, column]):
                errors.append(trace.predicted[row, column] - trace.measured[row, column])
    return math.sqrt(sum(e * e for e in errors) / len(errors)), len(errors)


def axes_titled(fig, title):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def labelled(items, label):
    return [item for item in items if item.get_label() == label]


def notes(ax):
    return [text.get_text() for text in ax.texts if text.get_gid() == "note"]


def test_write_run_plots_writes_valid_pngs_of_the_figure_size_and_no_open_figure(tmp_path, traces):
    import matplotlib.pyplot as plt  # only to prove that the module never registers a figure

    odd = traces[2]  # a run id that is no file name
    traces[2] = RunTrace("../line 2/R003", odd.regime, odd.time_s, odd.measured, odd.predicted)
    paths = write_run_plots(traces, TAGS, UNITS, tmp_path / "plots")

    assert plt.get_fignums() == []
    assert paths == [
        tmp_path / "plots" / name
        for name in [
            "predicted_vs_measured_R001.png",
            "predicted_vs_measured_R002.png",
            "predicted_vs_measured_line_2_R003.png",
            "parity.png",
            "residual_size.png",
        ]
    ]
    assert sorted((tmp_path / "plots").iterdir()) == sorted(paths)
    figures = [plot_predicted_vs_measured(t, TAGS, UNITS) for t in traces]
    figures += [plot_parity(traces, TAGS, UNITS), plot_residual_size(traces)]
    for path, fig in zip(paths, figures, strict=True):
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path.name
        width_px, height_px = np.round(fig.get_size_inches() * PLOT_DPI).astype(int)
        assert matplotlib.image.imread(path).shape == (height_px, width_px, 4), path.name
    assert plt.get_fignums() == []


def test_the_module_never_imports_pyplot():
    # Read from the source, as other tests may have imported pyplot into this interpreter.
    tree = ast.parse(Path(training.plots.__file__).read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names]  # fmt: skip
    imported += [f"{node.module}.{alias.name}" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) for alias in node.names]  # fmt: skip
    assert "matplotlib.figure.Figure" in imported
    assert [name for name in imported if "pyplot" in name or "pylab" in name] == []


def test_parity_rmse_text_matches_a_hand_computed_rmse_per_regime(traces):
    fig = plot_parity(traces, TAGS, UNITS)

    for column, (tag, unit) in enumerate(zip(TAGS, UNITS, strict=True)):
        ax = axes_titled(fig, tag)
        (text,) = [t.get_text() for t in ax.texts if t.get_gid() == "rmse"]
        printed = {
            regime: (float(value), printed_unit, int(n))
            for regime, value, printed_unit, n in re.findall(
                r"RMSE (\w+): (\S+) (\S+) \(n=(\d+)\)", text
            )
        }
        assert set(printed) == {"interpolation", "extrapolation"}, text
        for regime, (value, printed_unit, n) in printed.items():
            expected, expected_n = hand_rmse(traces, regime, column)
            assert value == pytest.approx(expected, rel=PRINTED_RMSE_REL), (tag, regime)
            assert (printed_unit, n) == (unit, expected_n), (tag, regime)


def test_parity_scatters_exactly_the_sampled_points_of_each_regime(traces):
    fig = plot_parity(traces, TAGS, UNITS)

    for column, tag in enumerate(TAGS):
        ax = axes_titled(fig, tag)
        for regime in ("interpolation", "extrapolation"):
            (points,) = labelled(ax.collections, regime)
            runs = [t for t in traces if t.regime == regime]
            rows = [~np.isnan(t.measured[:, column]) for t in runs]
            expected = np.concatenate(
                [np.column_stack([t.measured[r, column], t.predicted[r, column]])
                 for t, r in zip(runs, rows, strict=True)]
            )  # fmt: skip
            np.testing.assert_array_equal(points.get_offsets(), expected)


def test_run_figure_draws_only_sampled_measurements_and_the_whole_prediction(traces):
    trace = traces[0]
    fig = plot_predicted_vs_measured(trace, TAGS, UNITS)

    assert "R001" in fig.get_suptitle() and "interpolation" in fig.get_suptitle()
    assert len(fig.axes) == len(TAGS)
    for column, ax in enumerate(fig.axes):
        rows = ~np.isnan(trace.measured[:, column])
        assert 0 < rows.sum() < N_ROWS  # every tag misses some rows in this example
        (points,) = labelled(ax.collections, "measured")
        np.testing.assert_array_equal(
            points.get_offsets(),
            np.column_stack([trace.time_s[rows] / 60.0, trace.measured[rows, column]]),
        )
        (line,) = labelled(ax.lines, "predicted")
        np.testing.assert_array_equal(line.get_xdata(), trace.time_s / 60.0)
        np.testing.assert_array_equal(line.get_ydata(), trace.predicted[:, column])
    assert fig.axes[-1].get_xlabel() == "time [min]"
    assert fig.axes[0].get_shared_x_axes().joined(fig.axes[0], fig.axes[-1])


def test_a_tag_never_sampled_is_drawn_with_a_note(traces):
    for trace in traces:
        trace.measured[:, 2] = np.nan

    run_fig = plot_predicted_vs_measured(traces[0], TAGS, UNITS)
    assert notes(run_fig.axes[2]) == ["not sampled in this run"]
    assert labelled(run_fig.axes[2].collections, "measured") == []
    parity_ax = axes_titled(plot_parity(traces, TAGS, UNITS), "PRESS.TABLET_WEIGHT")
    assert notes(parity_ax) == ["no sampled points in any run"]
    assert len(parity_ax.collections) == 0
    run_fig.savefig(io.BytesIO(), format="png")  # renders
    parity_ax.figure.savefig(io.BytesIO(), format="png")


def test_residual_size_draws_one_line_per_run_and_names_runs_without_a_network(traces):
    fig = plot_residual_size(traces)

    (ax,) = fig.axes
    assert [line.get_label() for line in ax.lines] == [
        "R001 (interpolation)",
        "R002 (interpolation)",
    ]
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), traces[1].residual_size)
    (legend,) = fig.legends
    assert legend.get_title().get_text() == "no neural residual: R003"
    assert notes(ax) == []


def test_residual_size_of_a_model_without_a_network_is_only_a_note(traces):
    mechanistic = [
        RunTrace(t.run_id, t.regime, t.time_s, t.measured, t.predicted, None) for t in traces
    ]
    (ax,) = plot_residual_size(mechanistic).axes
    assert len(ax.lines) == 0
    assert notes(ax) == ["no neural residual (model without a network)"]
    plot_residual_size(mechanistic).savefig(io.BytesIO(), format="png")  # renders


def _trace(run_id="R009", n_rows=10, n_y=3, **arrays):
    fields = {
        "time_s": np.arange(n_rows) * 5.0,
        "measured": np.ones((n_rows, n_y)),
        "predicted": np.ones((n_rows, n_y)),
        "residual_size": None,
    }
    fields.update(arrays)
    return RunTrace(run_id, "interpolation", **fields)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"predicted": np.ones((9, 3))}, r"run R009: predicted must have shape \(T, n_y\) "
         r"with T = 10 rows as time_s, got \(9, 3\)"),
        ({"measured": np.ones(10)}, r"run R009: measured must have shape \(T, n_y\)"),
        ({"predicted": np.ones((10, 2))}, r"run R009: measured has shape \(10, 3\) but "
         r"predicted has \(10, 2\)"),
        ({"residual_size": np.ones(9)}, r"run R009: residual_size must have shape \(T,\) = "
         r"\(10,\) as time_s, got \(9,\)"),
        ({"time_s": np.ones((10, 1))}, r"run R009: time_s must have shape \(T,\)"),
        ({"measured": np.full((10, 3), np.inf)}, r"run R009: measured holds inf at 30 points"),
    ],
)  # fmt: skip
def test_a_malformed_trace_names_the_run_and_the_array(arrays, message):
    with pytest.raises(ValueError, match=message):
        _trace(**arrays)


@pytest.mark.parametrize(
    ("given", "tags", "units", "message"),
    [
        ([], TAGS, UNITS, "traces is empty"),
        ([_trace()], [], [], "tags is empty"),
        ([_trace()], TAGS, UNITS[:2], "tags has 3 names but units has 2"),
        ([_trace(), _trace("R010", n_y=2)], TAGS, UNITS,
         "run R010: measured and predicted have 2 columns but 3 tags were given"),
        ([_trace("R/1"), _trace("R_1")], TAGS, UNITS,
         "runs 'R/1' and 'R_1' would both be written to predicted_vs_measured_R_1.png"),
    ],
)  # fmt: skip
def test_bad_input_to_write_run_plots_says_what_is_wrong(tmp_path, given, tags, units, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        write_run_plots(given, tags, units, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_plot_functions_check_their_input_too():
    with pytest.raises(ValueError, match="traces is empty"):
        plot_residual_size([])
    with pytest.raises(ValueError, match="traces is empty"):
        plot_parity([], TAGS, UNITS)
    with pytest.raises(ValueError, match="run R009: measured and predicted have 3 columns"):
        plot_predicted_vs_measured(_trace(), TAGS[:2], UNITS[:2])
