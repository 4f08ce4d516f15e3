"""Residence-time based diversion: which tablets carry out-of-specification material.

Place in the data flow: `twin scenario` (training/scenario.py) hands each scenario's predicted
quality trajectory here. `out_of_spec_windows` finds the intervals where a quality attribute
(the tablets' API content, by default) leaves its specification, with the mass and tablet
count pressed meanwhile; `DiversionRule` is the plant's rule (divert from the disturbance's
start + delay to its end + margin) and `check_rule` says whether it covers every window and
by how much it misses or over-diverts. `step_window_tanks_in_series` is the analytic
reference the tests hold the twin to: a step in the API feed through a first-order feeder
lag and N ideal tanks (Erlang residence-time distribution, mean residence time =
hold-up / throughput, docs/model.md).

Convention: samples on a uniform grid of dt_s; row k is the material leaving at t_k and
stands for [t_k, t_k + dt). A window runs from its first out-of-spec row to the first row
back in spec (or the end of the trajectory, marked `open_end`).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hybrid_twin import ConfigError


@dataclass(frozen=True)
class OutOfSpecWindow:
    """One contiguous out-of-spec interval of a quality attribute.

    Attributes:
        start_s, end_s: first out-of-spec row's time, first in-spec row's time after it, s.
        worst: the value farthest outside the limits in the window, tag units.
        mass_kg: material pressed in the window (throughput x dt summed over its rows).
        tablets: that mass / the target tablet weight.
        open_end: True when the trajectory ends out of spec (end_s is its last row + dt).
    """

    start_s: float
    end_s: float
    worst: float
    mass_kg: float
    tablets: float
    open_end: bool

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def out_of_spec_windows(
    time_s: np.ndarray, values: np.ndarray, limits: tuple[float, float],
    throughput_kg_h: np.ndarray, tablet_weight_mg: np.ndarray,
) -> list[OutOfSpecWindow]:  # fmt: skip
    """The out-of-spec windows of one trajectory, in time order.

    Args:
        time_s: (T,) uniform grid, s; values: (T,) the attribute, tag units.
        limits: (low, high) specification, inclusive.
        throughput_kg_h: (T,) material through the press; tablet_weight_mg: (T,) target weight.

    Raises:
        ValueError: arrays of different lengths, fewer than 2 rows, or a non-finite value.
    """
    t = np.asarray(time_s, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    flow, weight = np.asarray(throughput_kg_h, float), np.asarray(tablet_weight_mg, float)
    if not (t.shape == v.shape == flow.shape == weight.shape) or t.ndim != 1 or t.size < 2:
        raise ValueError(f"out_of_spec_windows: expected equal 1-d arrays of >= 2 rows, got "
                         f"{t.shape}, {v.shape}, {flow.shape}, {weight.shape}")  # fmt: skip
    if not np.isfinite(v).all():
        raise ValueError(
            f"out_of_spec_windows: non-finite value at row {np.flatnonzero(~np.isfinite(v))[0]}"
        )
    dt = float(t[1] - t[0])
    low, high = limits
    out = (v < low) | (v > high)
    edges = np.diff(np.concatenate([[0], out.astype(np.int8), [0]]))
    windows = []
    for k0, k1 in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
        rows = slice(k0, k1)
        excess = np.maximum(low - v[rows], v[rows] - high)
        mass_kg = float((flow[rows] * dt / 3600.0).sum())
        tablets = float((flow[rows] * dt / 3600.0 * 1e6 / weight[rows]).sum())
        end = t[k1] if k1 < t.size else t[-1] + dt
        windows.append(OutOfSpecWindow(float(t[k0]), float(end), float(v[rows][excess.argmax()]),
                                       mass_kg, tablets, bool(k1 >= t.size)))  # fmt: skip
    return windows


@dataclass(frozen=True)
class DiversionRule:
    """Divert from a disturbance's start + delay_s to its end + margin_s (both may be 0)."""

    delay_s: float
    margin_s: float

    @classmethod
    def from_config(cls, raw, where: str = "diversion.rule") -> "DiversionRule":
        """{delay_s, margin_s} -> rule. Raises ConfigError naming the key for a bad value."""
        try:
            rule = cls(float(raw["delay_s"]), float(raw["margin_s"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(
                f"{where}: expected {{delay_s, margin_s}} in s, got {raw!r}"
            ) from error
        if rule.margin_s < 0:
            raise ConfigError(f"{where}.margin_s: must be >= 0 s, got {rule.margin_s:g}")
        return rule

    def window(self, disturbance_start_s: float, disturbance_end_s: float) -> tuple[float, float]:
        """(start, end) of the diversion the rule orders, s.

        Raises:
            ConfigError: a delay that starts the diversion after it ends.
        """
        start, end = disturbance_start_s + self.delay_s, disturbance_end_s + self.margin_s
        if start > end:
            raise ConfigError(
                f"diversion.rule.delay_s: {self.delay_s:g} s starts the diversion at "
                f"{start / 60:g} min, after its end at {end / 60:g} min (the disturbance ends "
                f"at {disturbance_end_s / 60:g} min, margin_s {self.margin_s:g} s)"
            )
        return start, end


@dataclass(frozen=True)
class RuleCheck:
    """Whether a rule's diversion covers the out-of-spec windows.

    Attributes:
        covered: every window lies inside the diversion (False while undetermined).
        missed_before_s, missed_after_s: out-of-spec time before / after the diversion, s.
        extra_s: diverted time that was in spec (the rule's cost), s; with a horizon, only
            the diverted time up to it counts (nothing after it was predicted).
        undetermined: nothing is missed up to the horizon, but a window is still open there,
            so whether the diversion covers the rest of it cannot be told.
    """

    covered: bool
    missed_before_s: float
    missed_after_s: float
    extra_s: float
    undetermined: bool = False

    @property
    def verdict(self) -> str:
        """'covers', 'does NOT cover' or 'cannot tell whether it covers'."""
        if self.undetermined:
            return "cannot tell whether it covers"
        return "covers" if self.covered else "does NOT cover"


def check_rule(
    windows: Sequence[OutOfSpecWindow], diversion: tuple[float, float],
    horizon_s: float | None = None,
) -> RuleCheck:  # fmt: skip
    """Compare the windows with a diversion interval (start, end), s.

    Args:
        horizon_s: where the predicted trajectory ends (its last row + dt), s; the diversion
            is judged up to it. None: the windows are the whole story (none is open).
    """
    start, end = diversion
    if horizon_s is not None:
        end = min(end, horizon_s)
    before = sum((max(0.0, min(w.end_s, start) - w.start_s) for w in windows), 0.0)
    after = sum((max(0.0, w.end_s - max(w.start_s, end)) for w in windows), 0.0)
    inside = sum((max(0.0, min(w.end_s, end) - max(w.start_s, start)) for w in windows), 0.0)
    missed = before > 0 or after > 0  # known to miss, whatever happens after the horizon
    undetermined = horizon_s is not None and not missed and any(w.open_end for w in windows)
    covered = not missed and not undetermined
    return RuleCheck(covered, before, after, max(0.0, end - start) - inside, undetermined)


def lagged_erlang_cdf(t_s: np.ndarray, n_tanks: int, k_per_s: float, lag_s: float) -> np.ndarray:
    """CDF of a first-order lag (time constant lag_s) followed by n_tanks ideal tanks of rate k.

    With lag_s = 0 it is the Erlang CDF P(N, k t) (regularised lower incomplete gamma). For
    lag rate a = 1 / lag_s != k the convolution is closed-form (hypoexponential):
    F(t) = P(N, k t) - (k / (k - a))^N [e^(-a t) - e^(-k t) sum_(j<N) ((k - a) t)^j / j!].

    Args:
        t_s: (T,) times after the step, s (negative: 0).

    Raises:
        ValueError: a nonpositive rate or n_tanks, or a lag rate equal to k.
    """
    t = np.maximum(np.asarray(t_s, dtype=np.float64), 0.0)
    if n_tanks < 1 or k_per_s <= 0 or lag_s < 0:
        raise ValueError(f"lagged_erlang_cdf: n_tanks {n_tanks}, k {k_per_s}, lag {lag_s}")
    kt = k_per_s * t
    erlang = 1.0 - np.exp(-kt) * sum(kt**j / math.factorial(j) for j in range(n_tanks))
    if lag_s == 0:
        return erlang
    a = 1.0 / lag_s
    if math.isclose(a, k_per_s, rel_tol=1e-9):
        raise ValueError("lagged_erlang_cdf: lag rate equals the tank rate (not implemented)")
    d = (k_per_s - a) * t
    tail = np.exp(-a * t) - np.exp(-kt) * sum(d**j / math.factorial(j) for j in range(n_tanks))
    return erlang - (k_per_s / (k_per_s - a)) ** n_tanks * tail


def step_window_tanks_in_series(
    api_kg_h: float, total_kg_h: float, drop_kg_h: float, start_s: float, end_s: float,
    low_pct: float, n_tanks: int, k_per_s: float, lag_s: float, horizon_s: float,
    resolution_s: float = 0.01,
) -> tuple[float, float] | None:  # fmt: skip
    """Analytic out-of-spec window of the outlet API fraction for a pulse in the API feed.

    The API feed drops by drop_kg_h on [start_s, end_s); with a constant tank rate k each
    component's outlet flow is its inlet flow through the lagged Erlang RTD, so the outlet
    API fraction is 100 (api - drop R(t)) / (total - drop R(t)) %w/w with
    R(t) = F(t - start) - F(t - end). Solved on a grid of resolution_s.

    Returns:
        (first time below low_pct, first time back at or above it), s; None if it never
        falls below; the end is horizon_s if it has not recovered by then.
    """
    t = np.arange(0.0, horizon_s, resolution_s)
    response = lagged_erlang_cdf(t - start_s, n_tanks, k_per_s, lag_s)
    response = response - lagged_erlang_cdf(t - end_s, n_tanks, k_per_s, lag_s)
    concentration = 100.0 * (api_kg_h - drop_kg_h * response) / (total_kg_h - drop_kg_h * response)
    below = np.flatnonzero(concentration < low_pct)
    if below.size == 0:
        return None
    back = np.flatnonzero(concentration[below[0] :] >= low_pct)
    return float(t[below[0]]), float(t[below[0] + back[0]]) if back.size else horizon_s
