"""Split-conformal limits of fit_monitor: the conformal quantile, the split calibration, errors."""

import math
import os

import pytest
import torch
from test_monitoring import normal_innovations, run_monitor

from hybrid_twin import ConfigError, MonitorDataError, ShapeError, fit_monitor
from hybrid_twin.monitoring import conformal_quantile

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.(save|load)` is deprecated:DeprecationWarning"
)


def test_conformal_quantile_is_the_corrected_order_statistic():
    scores = torch.arange(9.0, 0.0, -1.0)  # 9 .. 1, unsorted on purpose
    # rank ceil((9 + 1) * 0.9) = 9: the largest; the plain 0.9 quantile would be lower.
    assert conformal_quantile(scores, 0.1) == 9.0
    assert conformal_quantile(scores, 0.5) == 5.0  # ceil(10 * 0.5) = 5
    # 8 scores at alpha 0.1: rank ceil(8.1) = 9 > 8, no finite threshold is valid.
    assert conformal_quantile(scores[:8], 0.1) == math.inf


def test_conformal_quantile_exceed_rate_on_fresh_draws_is_within_the_binomial_bound(rng):
    # 20000 seeded trials: n = 49 calibration draws and one fresh draw of N(0, 1) each. The
    # fresh draw exceeds the threshold with probability (n + 1 - k) / (n + 1) exactly,
    # k = ceil((n + 1)(1 - alpha)) = 48: 0.04 <= alpha = 0.05. The trials are independent, so
    # the count is binomial; 4 sigma bounds it. The uncorrected rank 47 would give 0.06.
    trials, n, alpha = 20000, 49, 0.05
    calibration = torch.randn(trials, n, generator=rng, dtype=torch.float64)
    fresh = torch.randn(trials, generator=rng, dtype=torch.float64)
    threshold = torch.tensor([conformal_quantile(row, alpha) for row in calibration])
    rate = float((fresh > threshold).double().mean())
    expected = 2 / 50
    sigma = math.sqrt(expected * (1 - expected) / trials)
    assert abs(rate - expected) <= 4 * sigma
    assert rate <= alpha


def wider(data, factor: float):
    """The same innovations `factor` times wider while the filter reports the same variance:
    runs the fit never saw, on which the twin predicts worse than on its own fitting runs."""
    innovation, variance, mask = data
    return innovation * factor, variance, mask


@pytest.fixture(scope="module")
def split_fit():
    """Fit on 60 normal runs of 500 steps, calibrate on 60 runs 1.3x wider, at a 1 % per-step
    rate, in float64; fitted once for the module (seeded as the `rng` fixture)."""
    rng = torch.Generator().manual_seed(int(os.environ.get("TWIN_TEST_SEED", "0")))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        fit = normal_innovations(rng, 60, 500)
        calibration = wider(normal_innovations(rng, 60, 500), 1.3)
        kwargs = {"false_alarm_rate": 0.01, "ewma_lambda": 0.1}
        in_sample = fit_monitor(*fit, **kwargs)
        split = fit_monitor(*fit, calibration="split", calibration_data=calibration, **kwargs)
    finally:
        torch.set_default_dtype(default)
    return in_sample, split, rng


def test_split_calibration_holds_the_rate_on_fresh_runs_like_the_calibration_runs(
    float64, split_fit
):
    in_sample, split, rng = split_fit
    fresh = wider(normal_innovations(rng, 120, 500), 1.3)
    monitored = fresh[2].any(dim=2)
    rates = {}
    for name, monitor in (("in_sample", in_sample), ("split", split)):
        alarm = run_monitor(monitor, *fresh)["alarm"]
        rates[name] = float(alarm[monitored].double().mean())
    # In-sample limits are too narrow for the wider runs; the split limits widen to fit them.
    # +-30 %: exceedances cluster in time (AR innovations, EWMA), see test_monitoring.py.
    assert rates["in_sample"] > 3 * 0.01
    assert rates["split"] == pytest.approx(0.01, rel=0.3)
    assert split.calibration_scale > 1.3
    assert split.calibration_exceed_rate <= 0.01
    assert in_sample.calibration_scale == 1.0
    assert in_sample.calibration_exceed_rate == in_sample.fit_exceed_rate


def test_split_calibration_standardises_on_the_fit_runs_only(float64, split_fit):
    in_sample, split, _ = split_fit
    # The calibration runs never enter the standardisation: the statistics equal those of
    # the in-sample fit on the fit runs alone, and only the limits change: T^2's by the factor,
    # the EWMA's (linear in the innovations, T^2 quadratic) by its square root.
    for name in ("mean", "std", "corr", "ewma_rms"):
        torch.testing.assert_close(getattr(split, name), getattr(in_sample, name), rtol=0, atol=0)
    scale = split.calibration_scale
    finite = torch.isfinite(in_sample.t2_limits)
    torch.testing.assert_close(split.t2_limits[finite], scale * in_sample.t2_limits[finite])
    assert float(split.ewma_limit) == pytest.approx(math.sqrt(scale) * float(in_sample.ewma_limit))


def test_split_limits_keep_both_statistics_alarming_on_wider_runs(float64, split_fit):
    # 1.3x wider calibration and fresh runs: with one factor on both limits the EWMA's was
    # widened in T^2's squared units, and T^2 took the whole false-alarm budget (at 1.6x the
    # EWMA never exceeded). Each statistic keeps a share of the steps now.
    _, split, rng = split_fit
    fresh = wider(normal_innovations(rng, 120, 500), 1.3)
    out = run_monitor(split, *fresh)
    monitored = fresh[2].any(dim=2)
    t2_rate = float((out["t2"] > out["t2_limit"])[monitored].double().mean())
    ewma_rate = float((out["ewma_stat"] > split.ewma_limit).any(dim=2)[monitored].double().mean())
    assert t2_rate > 0.002 and ewma_rate > 0.002, (t2_rate, ewma_rate)


def test_split_calibrated_monitor_scripts(float64, split_fit):
    _, split, rng = split_fit
    innovation, variance, mask = normal_innovations(rng, 2, 50)
    scripted = torch.jit.script(split)
    state = scripted.initial_state(2)
    out = scripted.step(state, innovation[:, 0], variance[:, 0], mask[:, 0])
    expected = split.step(split.initial_state(2), innovation[:, 0], variance[:, 0], mask[:, 0])
    torch.testing.assert_close(out.t2, expected.t2)


def _with_nan(data):
    """A NaN innovation at run 1, step 4, tag 0, sampled."""
    innovation, variance, mask = (x.clone() for x in data)
    innovation[1, 4, 0] = float("nan")
    mask[1, 4, 0] = True
    return innovation, variance, mask


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"calibration": "conformal"}, ConfigError,
         "calibration: expected one of in_sample, split, got 'conformal'"),
        ({"calibration": "split"}, ConfigError, "calibration 'split' needs calibration_data"),
        ({"calibration_data": "given"}, ConfigError, "given with calibration 'in_sample'"),
        ({"calibration": "split", "calibration_data": "pair"}, ShapeError,
         r"calibration_data: expected a tuple \(innovation, innovation_var, mask\)"),
        ({"calibration": "split", "calibration_data": "tags"}, ShapeError,
         "calibration_data innovation: expected 5 tags"),
        ({"calibration": "split", "calibration_data": "short"}, MonitorDataError,
         "calibration_data: 50 monitored steps; .* false_alarm_rate 0.01 needs at least 99"),
        ({"calibration": "split", "calibration_data": "nan"}, MonitorDataError,
         "calibration_data innovation: 1 sampled entries are not finite; first at run 1"),
    ],
)  # fmt: skip
def test_split_calibration_refuses_bad_config_naming_it(float64, rng, kwargs, error, match):
    fit = normal_innovations(rng, 2, 200)
    good = normal_innovations(rng, 2, 200)
    data = {
        "given": good,
        "pair": good[:2],
        "tags": tuple(x[..., :3] for x in good),
        "short": tuple(x[:1, :50] for x in good),
        "nan": _with_nan(good),
    }
    if "calibration_data" in kwargs:
        kwargs = {**kwargs, "calibration_data": data[kwargs["calibration_data"]]}
    with pytest.raises(error, match=match):
        fit_monitor(*fit, false_alarm_rate=0.01, **kwargs)
