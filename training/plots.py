"""Review figures of a trained twin: open-loop simulations of whole held-out runs, as PNGs.

A data scientist reviews these in the MLflow UI next to the RMSE metrics: one predicted vs
measured figure per run, a per-tag parity figure pooling every run (coloured by regime, with
the RMSE of each regime), and the size of the neural residual along each run. The inputs are
plain numpy arrays in engineering units, already simulated by the caller; this module only
draws and writes files. It builds `matplotlib.figure.Figure` objects directly and never
touches pyplot, so it is safe in servers and threads and leaves no figure registered anywhere.
"""

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure

PLOT_DPI = 100
# Inches: wide enough for a 2-hour run at one-minute resolution; one row per tag.
RUN_FIGURE_WIDTH_IN = 10.0
RUN_ROW_HEIGHT_IN = 2.0
PARITY_CELL_IN = 4.0
PARITY_MAX_COLUMNS = 3
RESIDUAL_FIGURE_SIZE_IN = (10.0, 4.0)
LEGEND_ROWS = 15  # entries per legend column: what fits beside a 4-inch-high axes
# Known regimes first, in this order, so their colours stay the same in every figure.
REGIME_ORDER = ("interpolation", "extrapolation")
PARITY_FILE = "parity.png"
RESIDUAL_FILE = "residual_size.png"
RUN_FILE_PREFIX = "predicted_vs_measured_"


@dataclass(frozen=True)
class RunTrace:
    """An open-loop simulation of one whole held-out run, in engineering units.

    Attributes:
        run_id: the run segment's id, e.g. "R001".
        regime: "interpolation", "extrapolation" or another group name.
        time_s: (T,) time of each row in seconds (from the run's start).
        measured: (T, n_y) measurements; NaN where a tag was not sampled on that row.
        predicted: (T, n_y) the twin's predictions.
        residual_size: (T,) mean |g_nn|^2 of the neural residual along the run, or None for
            a model without a network.

    Arrays are stored as float arrays. Raises ValueError on a shape mismatch (naming the run
    and the array) or an infinite measurement (unsampled points must be NaN, not inf).
    """

    run_id: str
    regime: str
    time_s: np.ndarray
    measured: np.ndarray
    predicted: np.ndarray
    residual_size: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise ValueError(f"run_id must be a non-empty string, got {self.run_id!r}")
        # Frozen dataclass: store the float copies through object.__setattr__.
        for name in ("time_s", "measured", "predicted", "residual_size"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, np.asarray(value, dtype=float))
        if self.time_s.ndim != 1 or self.time_s.shape[0] == 0:
            raise ValueError(
                f"run {self.run_id}: time_s must have shape (T,) with T >= 1, "
                f"got {self.time_s.shape}"
            )
        n_rows = self.time_s.shape[0]
        for name in ("measured", "predicted"):
            shape = getattr(self, name).shape
            if len(shape) != 2 or shape[0] != n_rows:
                raise ValueError(
                    f"run {self.run_id}: {name} must have shape (T, n_y) with T = {n_rows} "
                    f"rows as time_s, got {shape}"
                )
        if self.measured.shape != self.predicted.shape:
            raise ValueError(
                f"run {self.run_id}: measured has shape {self.measured.shape} but predicted "
                f"has {self.predicted.shape}"
            )
        if self.residual_size is not None and self.residual_size.shape != (n_rows,):
            raise ValueError(
                f"run {self.run_id}: residual_size must have shape (T,) = ({n_rows},) as "
                f"time_s, got {self.residual_size.shape}"
            )
        n_inf = int(np.isinf(self.measured).sum())
        if n_inf:
            raise ValueError(
                f"run {self.run_id}: measured holds inf at {n_inf} points; mark unsampled "
                f"points with NaN"
            )

    @property
    def sampled(self) -> np.ndarray:
        """(T, n_y) bool: True where the tag was sampled on that row."""
        return ~np.isnan(self.measured)


def plot_predicted_vs_measured(
    trace: RunTrace, tags: Sequence[str], units: Sequence[str]
) -> Figure:
    """One run over time: a subplot per tag, measured as points, predicted as a line.

    Only sampled measurements are drawn, so a 60 s or 300 s at-line tag shows as sparse
    points on the 5 s grid of the prediction. A tag not sampled in this run gets a note.

    Args:
        trace: the run; `measured` and `predicted` are (T, n_y) with n_y = len(tags).
        tags: (n_y,) measurement tag names, e.g. "NIR.API_CONC".
        units: (n_y,) their engineering units, e.g. "%w/w".

    Returns:
        A Figure with n_y axes sharing the time axis in minutes; the measured points are the
        scatter labelled "measured", the prediction the line labelled "predicted"; one
        figure legend above the axes.

    Raises:
        ValueError: tags and units differ in count, or the trace does not have len(tags)
            columns.
    """
    _check_traces([trace], tags, units)
    n_tags = len(tags)
    fig = Figure(
        figsize=(RUN_FIGURE_WIDTH_IN, 1.0 + RUN_ROW_HEIGHT_IN * n_tags),
        dpi=PLOT_DPI,
        layout="constrained",
    )
    axes = fig.subplots(n_tags, 1, sharex=True, squeeze=False)[:, 0]
    time_min = trace.time_s / 60.0
    sampled = trace.sampled
    for j, ax in enumerate(axes):
        ax.plot(time_min, trace.predicted[:, j], color="C1", linewidth=1.2, label="predicted")
        rows = sampled[:, j]
        if rows.any():
            ax.scatter(time_min[rows], trace.measured[rows, j], s=10, color="C0", label="measured")
        else:
            _note(ax, "not sampled in this run")
        ax.set_ylabel(f"{tags[j]}\n[{units[j]}]")
        ax.grid(True, alpha=0.3)
    handles = [_first_labelled(axes, "predicted"), _first_labelled(axes, "measured")]
    fig.legend(
        handles=[h for h in handles if h is not None], loc="outside upper right", ncols=2,
        fontsize="small",
    )  # fmt: skip
    axes[-1].set_xlabel("time [min]")
    fig.suptitle(f"run {trace.run_id} ({trace.regime}): predicted vs measured, open loop")
    return fig


def plot_parity(traces: Sequence[RunTrace], tags: Sequence[str], units: Sequence[str]) -> Figure:
    """Predicted vs measured per tag over all runs' sampled points, coloured by regime.

    Each subplot holds the y = x line and a text "RMSE <regime>: <value> <unit> (n=<points>)"
    per regime, computed over the sampled points of that tag in that regime's runs. A
    non-finite prediction at a sampled point makes that RMSE nan, so a diverged simulation is
    not hidden. A tag sampled in no run gets a note instead.

    Args:
        traces: the runs, each with (T_i, n_y) `measured` and `predicted`.
        tags: (n_y,) measurement tag names.
        units: (n_y,) their engineering units.

    Returns:
        A Figure with one axes per tag (up to three per row); per regime, one scatter
        labelled with the regime name.

    Raises:
        ValueError: no traces, tags and units differ in count, or a trace does not have
            len(tags) columns.
    """
    _check_traces(traces, tags, units)
    regimes = _regime_order(traces)
    n_cols = min(PARITY_MAX_COLUMNS, len(tags))
    n_rows = math.ceil(len(tags) / n_cols)
    fig = Figure(
        figsize=(PARITY_CELL_IN * n_cols, 0.5 + PARITY_CELL_IN * n_rows),
        dpi=PLOT_DPI,
        layout="constrained",
    )
    grid = fig.subplots(n_rows, n_cols, squeeze=False)
    for j, ax in enumerate(grid.flat):
        if j >= len(tags):
            ax.set_visible(False)
            continue
        points = {regime: _sampled_points(traces, regime, j) for regime in regimes}
        _draw_parity_axes(ax, points, regimes, tags[j], units[j])
    runs = f"{len(traces)} run" + ("s" if len(traces) != 1 else "")
    fig.suptitle(f"parity: predicted vs measured, {runs}, open loop")
    return fig


def plot_residual_size(traces: Sequence[RunTrace]) -> Figure:
    """The neural residual's mean |g_nn|^2 over time, one line per run.

    Runs with `residual_size` None (a model without a network) are named in the legend's
    title; if no run has one, the figure holds only the note "no neural residual".

    Args:
        traces: the runs; `residual_size` is (T_i,) or None.

    Returns:
        A Figure with one axes; each line is labelled "<run_id> (<regime>)" in a figure
        legend to the right.

    Raises:
        ValueError: no traces.
    """
    _check_not_empty(traces)
    fig = Figure(figsize=RESIDUAL_FIGURE_SIZE_IN, dpi=PLOT_DPI, layout="constrained")
    ax = fig.subplots()
    without = [trace.run_id for trace in traces if trace.residual_size is None]
    for trace in traces:
        if trace.residual_size is not None:
            ax.plot(
                trace.time_s / 60.0,
                trace.residual_size,
                linewidth=1.2,
                label=f"{trace.run_id} ({trace.regime})",
            )
    if len(without) == len(traces):
        _note(ax, "no neural residual (model without a network)", y=0.5)
    else:
        fig.legend(
            loc="outside right upper", fontsize="small",
            ncols=math.ceil((len(traces) - len(without)) / LEGEND_ROWS),
            title=f"no neural residual: {', '.join(without)}" if without else None,
            title_fontsize="small",
        )  # fmt: skip
    ax.set_xlabel("time [min]")
    ax.set_ylabel("mean |g_nn|^2")
    ax.grid(True, alpha=0.3)
    ax.set_title("neural residual size along each run, open loop")
    return fig


def write_run_plots(
    traces: Sequence[RunTrace], tags: Sequence[str], units: Sequence[str], out_dir: Path | str
) -> list[Path]:
    """Write every review figure as a PNG into `out_dir` (created if missing).

    Files: `predicted_vs_measured_<run_id>.png` per run (characters other than letters,
    digits, ".", "_" and "-" become "_"), then `parity.png` and `residual_size.png`.

    Args:
        traces: the runs, each (T_i, n_y) with n_y = len(tags).
        tags: (n_y,) measurement tag names.
        units: (n_y,) their engineering units.
        out_dir: the folder to write into.

    Returns:
        The written paths, in the order above.

    Raises:
        ValueError: as the plot functions, or two run ids giving the same file name.
    """
    _check_traces(traces, tags, units)
    names = [f"{RUN_FILE_PREFIX}{_safe_name(trace.run_id)}.png" for trace in traces]
    seen: dict[str, str] = {}
    for trace, name in zip(traces, names, strict=True):
        if name in seen:
            raise ValueError(
                f"runs {seen[name]!r} and {trace.run_id!r} would both be written to {name}; "
                f"give runs distinct ids"
            )
        seen[name] = trace.run_id
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    figures = [plot_predicted_vs_measured(trace, tags, units) for trace in traces]
    figures += [plot_parity(traces, tags, units), plot_residual_size(traces)]
    paths = [folder / name for name in [*names, PARITY_FILE, RESIDUAL_FILE]]
    for fig, path in zip(figures, paths, strict=True):
        fig.savefig(path, dpi=PLOT_DPI, format="png")
    return paths


def _draw_parity_axes(
    ax: Axes,
    points: dict[str, tuple[np.ndarray, np.ndarray]],
    regimes: list[str],
    tag: str,
    unit: str,
) -> None:
    lines = []
    finite = []
    for k, regime in enumerate(regimes):
        measured, predicted = points[regime]
        if measured.size == 0:
            continue
        ax.scatter(measured, predicted, s=8, alpha=0.6, color=f"C{k}", label=regime)
        rmse = float(np.sqrt(np.mean((predicted - measured) ** 2)))
        lines.append(f"RMSE {regime}: {rmse:.4g} {unit} (n={measured.size})")
        finite.append(measured)
        finite.append(predicted[np.isfinite(predicted)])
    ax.set_title(tag)
    ax.set_xlabel(f"measured [{unit}]")
    ax.set_ylabel(f"predicted [{unit}]")
    ax.grid(True, alpha=0.3)
    if not lines:
        _note(ax, "no sampled points in any run", y=0.5)
        return
    low, high = _padded_range(np.concatenate(finite))
    ax.plot([low, high], [low, high], color="black", linewidth=0.8, label="y = x")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_aspect("equal", adjustable="box")
    ax.text(
        0.03, 0.97, "\n".join(lines), transform=ax.transAxes, va="top", ha="left",
        fontsize="small", gid="rmse",
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8},
    )  # fmt: skip
    ax.legend(loc="lower right", fontsize="small")


def _sampled_points(
    traces: Sequence[RunTrace], regime: str, column: int
) -> tuple[np.ndarray, np.ndarray]:
    """(measured, predicted) at the sampled rows of one tag, pooled over a regime's runs."""
    measured, predicted = [], []
    for trace in traces:
        if trace.regime == regime:
            rows = trace.sampled[:, column]
            measured.append(trace.measured[rows, column])
            predicted.append(trace.predicted[rows, column])
    return np.concatenate(measured), np.concatenate(predicted)


def _padded_range(values: np.ndarray) -> tuple[float, float]:
    low, high = float(values.min()), float(values.max())
    # 5 % margin so points on the edge stay visible; a single value gets a unit-scaled one.
    pad = 0.05 * (high - low) if high > low else max(abs(low), 1.0) * 0.05
    return low - pad, high + pad


def _regime_order(traces: Sequence[RunTrace]) -> list[str]:
    present = {trace.regime for trace in traces}
    known = [regime for regime in REGIME_ORDER if regime in present]
    return known + sorted(present.difference(REGIME_ORDER))


def _note(ax: Axes, text: str, y: float = 0.9) -> None:
    ax.text(
        0.5, y, text, transform=ax.transAxes, ha="center", va="center", color="dimgray",
        gid="note", bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8},
    )  # fmt: skip


def _first_labelled(axes: Sequence[Axes], label: str) -> Artist | None:
    for ax in axes:
        for artist in [*ax.lines, *ax.collections]:
            if artist.get_label() == label:
                return artist
    return None


def _safe_name(run_id: str) -> str:
    # Leading dots or underscores are dropped so an id like "../x" cannot name a hidden file.
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).lstrip("._")
    return safe or "run"


def _check_not_empty(traces: Sequence[RunTrace]) -> None:
    if len(traces) == 0:
        raise ValueError("traces is empty: need at least one RunTrace to plot")


def _check_traces(traces: Sequence[RunTrace], tags: Sequence[str], units: Sequence[str]) -> None:
    _check_not_empty(traces)
    if len(tags) == 0:
        raise ValueError("tags is empty: need at least one measurement tag to plot")
    if len(tags) != len(units):
        raise ValueError(
            f"tags has {len(tags)} names but units has {len(units)}; give one unit per tag"
        )
    for trace in traces:
        n_y = trace.measured.shape[1]
        if n_y != len(tags):
            raise ValueError(
                f"run {trace.run_id}: measured and predicted have {n_y} columns but "
                f"{len(tags)} tags were given ({', '.join(tags)})"
            )
