"""The figure of one scenario: what changed, and the quality attributes against their limits.

Builds a `matplotlib.figure.Figure` directly, never pyplot (as training/plots.py), so it is
safe in threads and leaves no figure registered. The top row shows each feeder's delivered
flow relative to its first row (setpoint steps, throughput changes, disturbances) and the
blender speed setpoint; one row per spec-limited tag follows with its limits dashed and the
out-of-spec windows shaded; the diversion the rule orders is hatched on the diversion tag.
"""

from collections.abc import Sequence

from matplotlib.figure import Figure

from training.scenario_run import ScenarioResult

ROW_HEIGHT_IN = 1.9
WIDTH_IN = 9.0
DPI = 80  # small PNGs for the docs (< 200 KB)


def plot_scenario(
    result: ScenarioResult, units: dict[str, str], diversion_tag: str,
    diversion_s: tuple[float, float] | None, speed_tag: str, feeder_setpoints: Sequence[str],
) -> Figure:  # fmt: skip
    """Inputs on top, then each spec-limited tag's prediction with limits and windows.

    Args:
        result: the scenario's result; units: tag -> unit.
        diversion_tag: the tag whose diversion is hatched; diversion_s: (start, end) or None.
        speed_tag: the blender speed setpoint tag (right axis of the top row).
        feeder_setpoints: the feeders' setpoint tags, in the order of their flow factors.
    """
    table = result.table
    tags = list(result.scenario.spec_limits)
    fig = Figure(figsize=(WIDTH_IN, 1.2 + ROW_HEIGHT_IN * (1 + len(tags))), dpi=DPI,
                 layout="constrained")  # fmt: skip
    axes = fig.subplots(1 + len(tags), 1, sharex=True, squeeze=False)[:, 0]
    t = table["time_min"].to_numpy()
    factors = [c for c in table.columns if c.endswith(".flow_factor")]
    for column, setpoint in zip(factors, feeder_setpoints, strict=True):
        delivered = table[column] * table[setpoint]
        axes[0].plot(t, 100.0 * delivered / delivered.iloc[0], label=column.split(".")[0],
                     linewidth=1.2)  # fmt: skip
    axes[0].set_ylabel("delivered flow\n[% of start]")
    axes[0].legend(loc="lower left", fontsize="x-small", ncols=len(factors))
    speed = axes[0].twinx()
    speed.plot(t, table[speed_tag], color="0.4", linestyle=":", linewidth=1.0)
    speed.set_ylabel(f"{speed_tag}\n[{units.get(speed_tag, '')}]", fontsize="x-small")
    for ax, tag in zip(axes[1:], tags, strict=True):
        low, high = result.scenario.spec_limits[tag]
        ax.plot(t, table[f"predicted.{tag}"], color="C1", linewidth=1.4, label="twin")
        for limit in (low, high):
            ax.axhline(limit, color="C3", linestyle="--", linewidth=0.9)
        for window in result.windows[tag]:
            ax.axvspan(window.start_s / 60, window.end_s / 60, color="C3", alpha=0.15, lw=0)
        if tag == diversion_tag and diversion_s is not None:
            ax.axvspan(diversion_s[0] / 60, diversion_s[1] / 60, fill=False, hatch="//",
                       edgecolor="0.5", lw=0, label="rule's diversion")  # fmt: skip
            ax.legend(loc="lower right", fontsize="x-small")
        ax.set_ylabel(f"{tag}\n[{units.get(tag, '')}]", fontsize="small")
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("time from scenario start [min]")
    fig.suptitle(f"scenario {result.scenario.name}: {result.scenario.description}"[:110],
                 fontsize="medium")  # fmt: skip
    return fig
