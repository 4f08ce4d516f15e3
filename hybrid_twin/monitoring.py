"""Fault detection on the twin's innovations: Hotelling T^2, EWMA, thresholds, contributions.

Place in the data flow: `ExtendedKalmanFilter` (hybrid_twin/estimation.py) gives, per grid
step and line, innovations e = y - y_hat_(k|k-1), their variances s and the mask of sampled
tags. `fit_monitor` learns from those arrays on normal runs how they really behave (mean and
spread per tag, correlation between tags, thresholds for a chosen false-alarm rate, set on
those runs or, split-conformal, on other normal runs) and returns an `InnovationMonitor`: a
scriptable module that holds the result as buffers and whose `step` turns one step of
innovations into T^2, EWMA statistics, an alarm and per-tag contributions. docs/monitoring.md
has the equations, the rate definition and the choices; docs/evaluation.md the split option.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from hybrid_twin.errors import ConfigError, ShapeError, TwinError
from hybrid_twin.spd import spd_solve


class MonitorDataError(TwinError, ValueError):
    """Normal-operation data given to `fit_monitor` cannot be used (empty, NaN, too sparse)."""


class MonitorState(NamedTuple):
    """Per-line memory of the monitor. ewma: (batch, n_tags) EWMA of the standardised
    innovations; run_length: (batch,) int64 consecutive monitored steps over a threshold."""

    ewma: Tensor
    run_length: Tensor


class MonitorStep(NamedTuple):
    """Result of `InnovationMonitor.step`.

    state: the new MonitorState; t2: (batch,) Hotelling T^2 over the sampled tags (0 if none);
    ewma_stat: (batch, n_tags) |EWMA| in units of its normal-operation RMS;
    alarm: (batch,) bool; contributions: (batch, n_tags) reconstruction-based contribution of
    each tag to T^2 (0 for unsampled tags).
    """

    state: MonitorState
    t2: Tensor
    ewma_stat: Tensor
    alarm: Tensor
    contributions: Tensor


def standardise(
    innovation: Tensor, innovation_var: Tensor, mask: Tensor, mean: Tensor, std: Tensor
) -> tuple[Tensor, Tensor]:
    """z = (e / sqrt(s) - mean) / std on the usable tags, 0 elsewhere.

    Args:
        innovation, innovation_var: (..., n_tags), tag units and tag units^2.
        mask: (..., n_tags) bool, True where sampled.
        mean, std: (n_tags,) normal-operation statistics of e / sqrt(s).

    Returns:
        z (..., n_tags); used (..., n_tags) bool: mask and e finite and s finite and > 0.
    """
    used = mask & torch.isfinite(innovation) & torch.isfinite(innovation_var) & (innovation_var > 0)
    safe_var = torch.where(used, innovation_var, torch.ones_like(innovation_var))
    safe_e = torch.where(used, innovation, torch.zeros_like(innovation))
    z = (safe_e / safe_var.sqrt() - mean) / std
    return torch.where(used, z, torch.zeros_like(z)), used


def masked_hotelling(z: Tensor, used: Tensor, corr: Tensor) -> tuple[Tensor, Tensor]:
    """T^2 on the used tags with the sub-matrix of corr, and reconstruction-based contributions.

    Unused tags get identity rows/columns and z = 0, so T^2 = z_S^T C_SS^-1 z_S exactly, with
    S the used set. Contribution of tag i: RBC_i = (C^-1 z)_i^2 / (C^-1)_ii, the drop in T^2
    when tag i alone is reconstructed from the others (Alcala & Qin 2009); >= 0, 0 if unused.

    Args:
        z: (batch, n_tags) standardised, 0 where unused; used: (batch, n_tags) bool;
        corr: (n_tags, n_tags) symmetric positive definite.

    Returns:
        t2 (batch,); contributions (batch, n_tags).
    """
    n = z.shape[1]
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    both = used.unsqueeze(2) & used.unsqueeze(1)
    sub = torch.where(both, corr, eye)
    # One solve for C^-1 z and C^-1: [z | I] as right-hand sides.
    solved = spd_solve(sub, torch.cat([z.unsqueeze(2), eye.expand_as(sub)], dim=2))
    w = solved[:, :, 0]
    inverse_diag = torch.diagonal(solved[:, :, 1:], dim1=1, dim2=2)
    t2 = (z * w).sum(dim=1)
    contributions = torch.where(used, w.pow(2) / inverse_diag, torch.zeros_like(w))
    return t2, contributions


def ewma_update(ewma: Tensor, z: Tensor, used: Tensor, lam: float) -> Tensor:
    """E <- lam z + (1 - lam) E on used tags; an unsampled tag's EWMA holds its value."""
    return torch.where(used, ewma + lam * (z - ewma), ewma)


class InnovationMonitor(nn.Module):
    """Fitted detector: buffers from `fit_monitor`, per-step statistics and alarm.

    Args:
        mean, std: (n_tags,) of e / sqrt(s) on normal data (std > 0).
        corr: (n_tags, n_tags) shrunk correlation of the standardised innovations (SPD).
        t2_limits: (n_tags + 1,) T^2 threshold by number of sampled tags (index 0 unused).
        ewma_rms: (n_tags,) > 0 normal-operation RMS of each tag's EWMA.
        ewma_limit: threshold on max over tags of ewma_stat.
        ewma_lambda: EWMA weight in (0, 1].
        persistence: alarm after this many consecutive monitored steps over a threshold (>= 1).
        t2_limit_empirical: (n_tags + 1,) bool, which limits are empirical quantiles (the rest
            chi-square); a record only, default all False.

    Attributes:
        fit_level, fit_exceed_rate: set by `fit_monitor` (NaN otherwise): the per-statistic
            level a and the exceedance rate reached on the fitting data.
        calibration_scale, calibration_exceed_rate: set by `fit_monitor` (NaN otherwise): the
            factor applied to the in-sample limits (1 for calibration "in_sample") and the
            exceedance rate on the data that set it (the fitting or the calibration runs).

    Raises:
        ShapeError: buffers of inconsistent shapes. ConfigError: values out of range.
    """

    def __init__(
        self,
        mean: Tensor,
        std: Tensor,
        corr: Tensor,
        t2_limits: Tensor,
        ewma_rms: Tensor,
        ewma_limit: float,
        ewma_lambda: float,
        persistence: int = 1,
        t2_limit_empirical: Tensor | None = None,
    ) -> None:
        super().__init__()
        n = mean.shape[0] if mean.dim() == 1 else -1
        shapes = {
            "mean": (mean, (n,)),
            "std": (std, (n,)),
            "corr": (corr, (n, n)),
            "t2_limits": (t2_limits, (n + 1,)),
            "ewma_rms": (ewma_rms, (n,)),
        }
        for name, (value, shape) in shapes.items():
            if n < 1 or tuple(value.shape) != shape:
                raise ShapeError(
                    f"InnovationMonitor: {name}: expected {shape} for {n} tags, "
                    f"got {tuple(value.shape)}"
                )
        _check_options(ewma_lambda, persistence, where="InnovationMonitor")
        if not (bool(torch.all(std > 0)) and bool(torch.all(ewma_rms > 0)) and ewma_limit > 0):
            raise ConfigError("InnovationMonitor: std, ewma_rms and ewma_limit must be > 0")
        # the statistics' own dtype (fit_monitor's `dtype`): limits fitted in float64 keep
        # their digits in a float64 twin
        dtype = mean.dtype if mean.is_floating_point() else torch.get_default_dtype()
        for name, (value, _) in shapes.items():
            self.register_buffer(name, value.detach().to(dtype).clone())
        self.register_buffer("ewma_limit", torch.tensor(float(ewma_limit), dtype=dtype))
        if t2_limit_empirical is None:
            t2_limit_empirical = torch.zeros(n + 1, dtype=torch.bool)
        self.register_buffer("t2_limit_empirical", t2_limit_empirical.to(torch.bool).clone())
        self.fit_level = float("nan")
        self.fit_exceed_rate = float("nan")
        self.calibration_scale = float("nan")
        self.calibration_exceed_rate = float("nan")
        self.ewma_lambda = float(ewma_lambda)
        self.persistence = int(persistence)
        self.n_tags = n

    @torch.jit.export
    def initial_state(self, batch: int) -> MonitorState:
        """Zero EWMA and run length for `batch` lines (start of a run or after a reset)."""
        ewma = torch.zeros(batch, self.n_tags, dtype=self.mean.dtype, device=self.mean.device)
        run = torch.zeros(batch, dtype=torch.long, device=self.mean.device)
        return MonitorState(ewma, run)

    @torch.jit.export
    def t2_limit(self, mask: Tensor) -> Tensor:
        """T^2 threshold per line for its number of sampled tags, (batch,); inf if none."""
        return self.t2_limits.index_select(0, mask.sum(dim=1))

    @torch.jit.export
    def step(
        self, state: MonitorState, innovation: Tensor, innovation_var: Tensor, mask: Tensor
    ) -> MonitorStep:
        """Statistics and alarm for one grid step.

        Args:
            state: MonitorState of the previous step (`initial_state` at the start).
            innovation: (batch, n_tags) y - y_hat, tag units; innovation_var: (batch, n_tags)
                its predicted variance, tag units^2 (`ExtendedKalmanFilter.update`).
            mask: (batch, n_tags) bool, True where sampled; NaN innovations count as unsampled.

        Returns:
            MonitorStep(state, t2, ewma_stat, alarm, contributions). A step with no usable tag
            leaves EWMA, run length and alarm as they were.
        """
        z, used = standardise(innovation, innovation_var, mask, self.mean, self.std)
        t2, contributions = masked_hotelling(z, used, self.corr)
        ewma = ewma_update(state.ewma, z, used, self.ewma_lambda)
        ewma_stat = ewma.abs() / self.ewma_rms
        exceed = (t2 > self.t2_limit(used)) | (ewma_stat > self.ewma_limit).any(dim=1)
        monitored = used.any(dim=1)
        run = torch.where(exceed, state.run_length + 1, torch.zeros_like(state.run_length))
        run = torch.where(monitored, run, state.run_length)
        alarm = run >= self.persistence
        return MonitorStep(MonitorState(ewma, run), t2, ewma_stat, alarm, contributions)

    def forward(
        self, state: MonitorState, innovation: Tensor, innovation_var: Tensor, mask: Tensor
    ) -> MonitorStep:
        """Same as `step`."""
        return self.step(state, innovation, innovation_var, mask)


def _check_options(ewma_lambda: float, persistence: int, where: str) -> None:
    if not 0.0 < ewma_lambda <= 1.0:
        raise ConfigError(f"{where}: ewma_lambda: expected in (0, 1], got {ewma_lambda}")
    if isinstance(persistence, bool) or not isinstance(persistence, int) or persistence < 1:
        raise ConfigError(f"{where}: persistence: expected an integer >= 1, got {persistence!r}")


def _as_runs(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise ShapeError(
            f"fit_monitor: {name}: expected a torch.Tensor, got {type(value).__name__}"
        )
    if value.dim() == 2:
        value = value.unsqueeze(0)
    if value.dim() != 3:
        raise ShapeError(
            f"fit_monitor: {name}: expected (time, n_tags) or (runs, time, n_tags), "
            f"got {tuple(value.shape)}"
        )
    return value


def _check_fit_data(
    innovation: Tensor,
    innovation_var: Tensor,
    mask: Tensor,
    tags: Sequence[str],
    min_samples: int,
    label: str = "",
) -> None:
    """label prefixes the argument names in messages ("calibration_data " for that set)."""
    if innovation.numel() == 0:
        raise MonitorDataError(
            f"fit_monitor: {label}innovation: empty, shape {tuple(innovation.shape)}"
        )
    if innovation.shape[-1] != len(tags):
        raise ShapeError(
            f"fit_monitor: {label}innovation: expected {len(tags)} tags (last dim), got "
            f"{innovation.shape[-1]}"
        )
    for name, value in (("innovation_var", innovation_var), ("mask", mask)):
        if value.shape != innovation.shape:
            raise ShapeError(
                f"fit_monitor: {label}{name}: expected the shape of innovation "
                f"{tuple(innovation.shape)}, got {tuple(value.shape)}"
            )
    if mask.dtype != torch.bool:
        raise ShapeError(f"fit_monitor: {label}mask: expected dtype torch.bool, got {mask.dtype}")
    for name, value, bad in (
        ("innovation", innovation, ~torch.isfinite(innovation)),
        (
            "innovation_var",
            innovation_var,
            ~(torch.isfinite(innovation_var) & (innovation_var > 0)),
        ),
    ):
        where = torch.nonzero(bad & mask)
        if where.shape[0] > 0:
            run, step, tag = where[0].tolist()
            raise MonitorDataError(
                f"fit_monitor: {label}{name}: {where.shape[0]} sampled entries are not "
                f"{'finite' if name == 'innovation' else 'finite and > 0'}; first at run {run}, "
                f"step {step}, tag {tags[tag]!r}: {value[run, step, tag].item()}"
            )
    counts = mask.sum(dim=(0, 1))
    for i, count in enumerate(counts.tolist()):
        if count < min_samples:
            raise MonitorDataError(
                f"fit_monitor: mask: tag {tags[i]!r} is sampled {count} times; at least "
                f"{min_samples} are needed to estimate its statistics"
            )


def _correlation(z: Tensor, used: Tensor, shrinkage: float, min_eigenvalue: float) -> Tensor:
    """Pairwise correlation over co-sampled steps, shrunk towards I until SPD."""
    flat_z = z.reshape(-1, z.shape[-1])
    flat_u = used.reshape(-1, used.shape[-1]).to(z.dtype)
    pairs = flat_u.T @ flat_u
    corr = (flat_z.T @ flat_z) / pairs.clamp_min(1.0)
    corr = torch.where(pairs > 0, corr, torch.zeros_like(corr))  # never co-sampled: 0
    corr = 0.5 * (corr + corr.T)
    corr.fill_diagonal_(1.0)
    lowest = float(torch.linalg.eigvalsh(corr).min())
    # (1 - a) C + a I has eigenvalues (1 - a) e + a: pick a so the lowest is >= min_eigenvalue.
    needed = (min_eigenvalue - lowest) / (1.0 - lowest) if lowest < min_eigenvalue else 0.0
    amount = max(shrinkage, needed)
    eye = torch.eye(corr.shape[0], dtype=corr.dtype)
    return (1.0 - amount) * corr + amount * eye


def chi2_quantile(p: float, dof: int) -> float:
    """Quantile of the chi-square distribution with dof degrees of freedom (bisection on the
    regularised lower incomplete gamma function; relative accuracy ~1e-12)."""
    dof_t = torch.tensor(dof / 2.0, dtype=torch.float64)
    lo, hi = 0.0, max(1.0, float(dof))
    while float(torch.special.gammainc(dof_t, torch.tensor(hi / 2.0, dtype=torch.float64))) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        cdf = float(torch.special.gammainc(dof_t, torch.tensor(mid / 2.0, dtype=torch.float64)))
        lo, hi = (mid, hi) if cdf < p else (lo, mid)
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


class _NormalSeries(NamedTuple):
    t2: Tensor  # (N,) over monitored steps
    count: Tensor  # (N,) sampled tags per monitored step
    ewma_max: Tensor  # (N,) max over tags of ewma_stat


def _sorted_quantile(values: Tensor, p: float) -> float:
    """torch.quantile(values, p) ("linear") of an ascending 1-D tensor, without re-sorting."""
    position = p * (values.numel() - 1)
    below = min(int(math.floor(position)), values.numel() - 1)
    above = min(below + 1, values.numel() - 1)
    low, high = float(values[below]), float(values[above])
    return low + (position - below) * (high - low)


# How fit_monitor sets the limits (docs/evaluation.md, "Fault detection"): "in_sample" on the
# runs that also give the standardisation; "split" scales them on other, held-out normal runs.
CALIBRATIONS = ("in_sample", "split")


def conformal_quantile(scores: Tensor, alpha: float) -> float:
    """Split-conformal threshold: the ceil((n + 1)(1 - alpha))-th smallest of n scores.

    For a new score exchangeable with these n, P(new > threshold) <= alpha; the plain empirical
    (1 - alpha) quantile falls short of that by up to 1 / n (Vovk et al. 2005; Lei et al. 2018).

    Args:
        scores: (n,) calibration scores, finite; alpha: target exceedance rate in (0, 1).

    Returns:
        The threshold; inf when n < (1 - alpha) / alpha (too few scores for any finite one).

    Raises:
        ShapeError: scores not 1-D or empty. ConfigError: alpha outside (0, 1).
    """
    if scores.dim() != 1 or scores.numel() == 0:
        raise ShapeError(
            f"conformal_quantile: scores: expected (n,) with n >= 1, got {tuple(scores.shape)}"
        )
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"conformal_quantile: alpha: expected in (0, 1), got {alpha}")
    n = scores.numel()
    # - 1e-9: an integer (n + 1)(1 - alpha) may come out a hair above it in floating point.
    rank = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
    if rank > n:
        return float("inf")
    return float(scores.sort().values[rank - 1])


class _Calibration:
    """Thresholds at a per-statistic exceedance level a on the normal series (eager only)."""

    def __init__(self, series: _NormalSeries, n_tags: int, min_count: int) -> None:
        self.series, self.n_tags = series, n_tags
        self.sorted_t2 = [series.t2[series.count == m].sort().values for m in range(n_tags + 1)]
        self.empirical = torch.tensor(
            [m > 0 and self.sorted_t2[m].numel() >= min_count for m in range(n_tags + 1)]
        )
        self.sorted_ewma = series.ewma_max.sort().values
        sizes = [t.numel() if bool(self.empirical[m]) else 0 for m, t in enumerate(self.sorted_t2)]
        self.dominant = max(range(n_tags + 1), key=lambda m: sizes[m]) if any(sizes) else None

    def limits(self, a: float) -> tuple[Tensor, float]:
        """T^2 limit per count and the EWMA limit, each exceeded by a fraction a of the normal
        steps: the empirical quantile where a count has enough steps, else the chi-square
        quantile times the ratio of the best-sampled count's empirical quantile to its own
        chi-square one.

        Why the ratio: the innovations' tails are those of the tags every step samples, also
        on the rare steps that add a tag (an assay). Plain chi-square limits there were 5x
        below the common count's (22 for 7 tags against 111 for 6), so the rare steps took
        5-20x the per-step rate and, in-sample, the level a of every other step fell."""
        limits = torch.full((self.n_tags + 1,), float("inf"), dtype=torch.float64)
        fallback = [m for m in range(1, self.n_tags + 1) if not bool(self.empirical[m])]
        for m in range(1, self.n_tags + 1):
            if bool(self.empirical[m]):
                limits[m] = _sorted_quantile(self.sorted_t2[m], 1.0 - a)
        ratio = 1.0
        if self.dominant is not None:
            ratio = float(limits[self.dominant]) / chi2_quantile(1.0 - a, self.dominant)
        for m in fallback:
            limits[m] = chi2_quantile(1.0 - a, m) * ratio
        return limits, _sorted_quantile(self.sorted_ewma, 1.0 - a)

    def rate(self, a: float) -> float:
        """Fraction of normal monitored steps where T^2 or the EWMA exceeds its limit."""
        limits, ewma_limit = self.limits(a)
        series = self.series
        exceed = (series.t2 > limits[series.count]) | (series.ewma_max > ewma_limit)
        return float(exceed.double().mean())

    def level_for(self, target: float) -> float:
        """Largest a in [0, target] with rate(a) <= target, by bisection (rate rises with a
        from 0 at a = 0 to about a..2a: the union of two statistics each exceeded at a)."""
        lo, hi = 0.0, target
        if self.rate(hi) <= target:
            return hi
        while hi - lo > 1e-4 * target:
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self.rate(mid) <= target else (lo, mid)
        return lo


def fit_monitor(
    innovation: Tensor,
    innovation_var: Tensor,
    mask: Tensor,
    false_alarm_rate: float = 0.01,
    ewma_lambda: float = 0.1,
    persistence: int = 1,
    shrinkage: float = 0.01,
    min_eigenvalue: float = 1e-3,
    min_count: int | None = None,
    tags: Sequence[str] | None = None,
    calibration: str = "in_sample",
    calibration_data: tuple[Tensor, Tensor, Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> InnovationMonitor:
    """Fit statistics and thresholds on innovations of normal operation.

    Args:
        innovation, innovation_var, mask: (runs, time, n_tags) or (time, n_tags): the
            `ExtendedKalmanFilter.update` outputs over normal runs, in time order (the EWMA
            runs along time; pad short runs with mask False).
        false_alarm_rate: target fraction of monitored steps (steps with >= 1 sampled tag)
            whose statistics exceed a threshold on normal data, in (0, 0.5).
        ewma_lambda: EWMA weight per sample, (0, 1]; ~2 / lambda samples of memory.
        persistence: alarm after k consecutive exceedances (thresholds are per step: k > 1
            lowers the alarm rate below false_alarm_rate and delays detection by k - 1 steps).
        shrinkage: minimum weight a of I in (1 - a) C + a I, [0, 1).
        min_eigenvalue: smallest eigenvalue the shrunk correlation may have, (0, 1).
        min_count: monitored steps with m sampled tags needed for an empirical T^2 quantile
            for count m (else the chi-square quantile); default ceil(10 / false_alarm_rate).
        tags: names for error messages; default "tag0", "tag1", ...
        calibration: "in_sample": limits exceeded at false_alarm_rate on the fitting data
            themselves; "split": those limits scaled by one factor c (T^2's by c, the
            EWMA's by sqrt(c)), the conformal quantile of the steps of `calibration_data`
            (`_split_scale`), so that runs the standardisation never saw set how wide the
            limits are.
        calibration_data: (innovation, innovation_var, mask) of other normal runs, shaped as
            above with the same n_tags; required by "split", refused by "in_sample".
        dtype: of the monitor's buffers (the fit runs in float64); None: torch's default.

    Returns:
        An InnovationMonitor; its attributes `fit_exceed_rate` (the rate reached on these
        data), `fit_level` (per-statistic level a), `calibration_scale`,
        `calibration_exceed_rate` and buffer `t2_limit_empirical` record how.

    Raises:
        ShapeError: wrong types, ranks, shapes, mask not bool.
        MonitorDataError: empty data, non-finite sampled innovations, non-positive variances,
            a tag sampled fewer than 30 times, a tag without spread, nothing monitored, too
            few calibration steps for a finite conformal limit.
        ConfigError: an option out of range, an unknown calibration, calibration_data
            missing for "split" or given for "in_sample".
    """
    innovation = _as_runs("innovation", innovation).detach().to(torch.float64)
    innovation_var = _as_runs("innovation_var", innovation_var).detach().to(torch.float64)
    mask = _as_runs("mask", mask)
    n_tags = innovation.shape[-1]
    tags = list(tags) if tags is not None else [f"tag{i}" for i in range(n_tags)]
    if len(tags) != n_tags:
        raise ShapeError(f"fit_monitor: tags: expected {n_tags} names, got {len(tags)}")
    _check_options(ewma_lambda, persistence, where="fit_monitor")
    if not 0.0 < false_alarm_rate < 0.5:
        raise ConfigError(
            f"fit_monitor: false_alarm_rate: expected in (0, 0.5), got {false_alarm_rate}"
        )
    if not 0.0 <= shrinkage < 1.0 or not 0.0 < min_eigenvalue < 1.0:
        raise ConfigError(
            f"fit_monitor: expected shrinkage in [0, 1) and min_eigenvalue in (0, 1), got "
            f"{shrinkage} and {min_eigenvalue}"
        )
    _check_calibration(calibration, calibration_data)
    _check_fit_data(innovation, innovation_var, mask, tags, min_samples=30)
    min_count = math.ceil(10.0 / false_alarm_rate) if min_count is None else int(min_count)

    mean, std, corr = _standardisation(
        innovation, innovation_var, mask, tags, shrinkage, min_eigenvalue
    )
    z, used = standardise(innovation, innovation_var, mask, mean, std)
    series, ewma_rms = _normal_series(z, used, corr, ewma_lambda)
    if series.t2.numel() == 0:
        raise MonitorDataError("fit_monitor: mask: no step has a sampled tag")
    fitted = _Calibration(series, n_tags, min_count)
    level = fitted.level_for(false_alarm_rate)
    limits, ewma_limit = fitted.limits(level)
    fit_rate = fitted.rate(level)
    scale, exceed_rate = 1.0, fit_rate
    if calibration == "split":
        assert calibration_data is not None  # _check_calibration
        reference = _Reference(mean, std, corr, ewma_rms, ewma_lambda, limits, ewma_limit)
        scale, exceed_rate = _split_scale(calibration_data, reference, tags, false_alarm_rate)
        limits, ewma_limit = limits * scale, ewma_limit * math.sqrt(scale)  # _split_scale

    dtype = dtype or torch.get_default_dtype()
    monitor = InnovationMonitor(
        mean.to(dtype),
        std.to(dtype),
        corr.to(dtype),
        limits.to(dtype),
        ewma_rms.to(dtype),
        ewma_limit,
        ewma_lambda,
        persistence,
        fitted.empirical,
    )
    monitor.fit_level = level
    monitor.fit_exceed_rate = fit_rate
    monitor.calibration_scale = scale
    monitor.calibration_exceed_rate = exceed_rate
    return monitor


def _check_calibration(calibration: str, calibration_data: object) -> None:
    if calibration not in CALIBRATIONS:
        raise ConfigError(
            f"fit_monitor: calibration: expected one of {', '.join(CALIBRATIONS)}, got "
            f"{calibration!r}"
        )
    if calibration == "split" and calibration_data is None:
        raise ConfigError(
            "fit_monitor: calibration 'split' needs calibration_data: the innovations of "
            "normal runs that the standardisation does not use"
        )
    if calibration == "in_sample" and calibration_data is not None:
        raise ConfigError(
            "fit_monitor: calibration_data given with calibration 'in_sample', which would "
            "ignore it; use calibration 'split'"
        )
    if calibration_data is not None and (
        not isinstance(calibration_data, (tuple, list)) or len(calibration_data) != 3
    ):
        raise ShapeError(
            "fit_monitor: calibration_data: expected a tuple (innovation, innovation_var, mask)"
        )


def _standardisation(
    innovation: Tensor,
    innovation_var: Tensor,
    mask: Tensor,
    tags: Sequence[str],
    shrinkage: float,
    min_eigenvalue: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and std per tag of e / sqrt(s) over the sampled steps; shrunk correlation."""
    ratio = torch.where(mask, innovation / innovation_var.clamp_min(1e-300).sqrt(), 0.0)
    counts = mask.sum(dim=(0, 1)).to(torch.float64)
    mean = ratio.sum(dim=(0, 1)) / counts
    std = (torch.where(mask, ratio - mean, 0.0).pow(2).sum(dim=(0, 1)) / counts).sqrt()
    if bool(torch.any(std <= 1e-12)):
        i = int(torch.nonzero(std <= 1e-12)[0])
        raise MonitorDataError(f"fit_monitor: innovation: tag {tags[i]!r} has no spread (std 0)")
    z, used = standardise(innovation, innovation_var, mask, mean, std)
    return mean, std, _correlation(z, used, shrinkage, min_eigenvalue)


class _Reference(NamedTuple):
    """What the fitting runs fixed: standardisation, EWMA scale and the in-sample limits."""

    mean: Tensor
    std: Tensor
    corr: Tensor
    ewma_rms: Tensor
    ewma_lambda: float
    t2_limits: Tensor  # (n_tags + 1,)
    ewma_limit: float


def _split_scale(
    data: tuple[Tensor, Tensor, Tensor], reference: _Reference, tags: Sequence[str], alpha: float
) -> tuple[float, float]:
    """Factor c on the reference limits from held-out normal runs, and their exceed rate at it.

    One score per monitored step, max(T^2 / its limit, (EWMA stat / its limit)^2), makes the
    union of the two tests a single threshold c, so the conformal quantile applies (and c may
    exceed the largest fitting-run value, which a level search on the reference cannot). The
    square puts both in T^2's units: innovations k times wider scale T^2 by k^2 and the EWMA
    statistic by k, so the T^2 limits take c and the EWMA limit sqrt(c) (one c on both
    over-widened the EWMA: it never alarmed at k = 1.6).
    The guarantee is for steps exchangeable with the calibration steps; steps of one run are
    not independent, so it is only as good as the calibration runs are typical
    (docs/evaluation.md, "Fault detection").
    """
    names = ("innovation", "innovation_var", "mask")
    e, v, m = (_as_runs(f"calibration_data {n}", x) for n, x in zip(names, data, strict=True))
    e, v = e.detach().to(torch.float64), v.detach().to(torch.float64)
    _check_fit_data(e, v, m, tags, min_samples=0, label="calibration_data ")
    z, used = standardise(e, v, m, reference.mean, reference.std)
    series, _ = _normal_series(z, used, reference.corr, reference.ewma_lambda, reference.ewma_rms)
    n = series.t2.numel()
    needed = math.ceil((1.0 - alpha) / alpha - 1e-9)
    if n < needed:
        raise MonitorDataError(
            f"fit_monitor: calibration_data: {n} monitored steps; a conformal limit at "
            f"false_alarm_rate {alpha} needs at least {needed}"
        )
    score = torch.maximum(
        series.t2 / reference.t2_limits[series.count],
        (series.ewma_max / reference.ewma_limit).pow(2),
    )
    scale = conformal_quantile(score, alpha)
    if not scale > 0.0:
        raise MonitorDataError(
            f"fit_monitor: calibration_data: conformal limit {scale} is not > 0 (statistics "
            f"of {n} steps all 0?)"
        )
    # the rate at the limits as scaled, compared as the monitor compares: score > scale can
    # miss the step whose score is the quantile, which the scaled limits round below
    exceed = (series.t2 > (reference.t2_limits * scale)[series.count]) | (
        series.ewma_max > reference.ewma_limit * math.sqrt(scale)
    )
    return scale, float(exceed.double().mean())


def _normal_series(
    z: Tensor, used: Tensor, corr: Tensor, ewma_lambda: float, ewma_rms: Tensor | None = None
) -> tuple[_NormalSeries, Tensor]:
    """T^2, count and max EWMA statistic over the monitored steps; per-tag EWMA RMS (its
    normal-operation value from these data unless `ewma_rms` gives it)."""
    runs, steps, n_tags = z.shape
    t2, _ = masked_hotelling(z.reshape(-1, n_tags), used.reshape(-1, n_tags), corr)
    t2 = t2.reshape(runs, steps)
    ewma = torch.zeros(runs, n_tags, dtype=z.dtype)
    seen = torch.zeros(runs, n_tags, dtype=torch.bool)
    history, seen_history = [], []
    for k in range(steps):
        ewma = ewma_update(ewma, z[:, k], used[:, k], ewma_lambda)
        seen = seen | used[:, k]
        history.append(ewma)
        seen_history.append(seen)
    ewma_all = torch.stack(history, dim=1)
    seen_all = torch.stack(seen_history, dim=1)
    monitored = used.any(dim=2)
    if ewma_rms is None:
        # RMS about 0 over the steps after each tag's first sample (before it the EWMA is 0
        # by construction and says nothing about its spread) up to the run's last monitored
        # step: the padding of a shorter run holds the EWMA and would weigh it by pad length.
        step = torch.arange(steps)
        last = torch.where(monitored, step, -1).amax(dim=1)
        counted = seen_all & (step[None, :] <= last[:, None])[:, :, None]
        square = torch.where(counted, ewma_all.pow(2), torch.zeros_like(ewma_all))
        ewma_rms = (square.sum(dim=(0, 1)) / counted.sum(dim=(0, 1)).clamp_min(1)).sqrt()
        ewma_rms = ewma_rms.clamp_min(1e-12)
    ewma_max = (ewma_all.abs() / ewma_rms).amax(dim=2)
    series = _NormalSeries(t2[monitored], used.sum(dim=2)[monitored], ewma_max[monitored])
    return series, ewma_rms
