"""InnovationMonitor / fit_monitor: false-alarm rate, detection, isolation, masks, scripting."""

import io

import pytest
import torch
from tolerances import tol

from hybrid_twin import (
    ConfigError,
    InnovationMonitor,
    MonitorDataError,
    ShapeError,
    chi2_quantile,
    fit_monitor,
)
from hybrid_twin.monitoring import masked_hotelling

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.(save|load)` is deprecated:DeprecationWarning"
)

N_TAGS = 5
# Correlated tags (0-1-2 strongly, 3-4), as neighbouring PAT readings are.
CORR = torch.tensor(
    [
        [1.0, 0.6, 0.3, 0.0, 0.0],
        [0.6, 1.0, 0.4, 0.0, 0.2],
        [0.3, 0.4, 1.0, 0.1, 0.0],
        [0.0, 0.0, 0.1, 1.0, 0.5],
        [0.0, 0.2, 0.0, 0.5, 1.0],
    ],
    dtype=torch.float64,
)
# True innovation spread per tag (tag units) and the miscalibrated one the "filter" reports:
# the fitted mean/std must absorb the difference.
SPREAD = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0], dtype=torch.float64)
REPORTED = SPREAD / torch.tensor([1.2, 0.8, 1.0, 1.0, 1.5], dtype=torch.float64)


def normal_innovations(rng, runs: int, steps: int, ar: float = 0.3):
    """Gaussian innovations (runs, steps, 5), AR(1) in time, bias 0.1 spread, multi-rate:
    tags 0-2 every step with 2 % dropouts, tag 3 every 2nd step, tag 4 every 6th (an assay)."""
    eps = torch.randn(runs, steps, N_TAGS, generator=rng) @ torch.linalg.cholesky(CORR).T
    w = torch.empty_like(eps)
    w[:, 0] = eps[:, 0]
    for k in range(1, steps):
        w[:, k] = ar * w[:, k - 1] + (1.0 - ar**2) ** 0.5 * eps[:, k]
    innovation = (w + 0.1) * SPREAD
    variance = REPORTED.pow(2).expand_as(innovation).clone()
    k = torch.arange(steps).view(1, -1)
    mask = torch.ones(runs, steps, N_TAGS, dtype=torch.bool)
    mask[:, :, :3] = torch.rand(runs, steps, 3, generator=rng) > 0.02
    mask[:, :, 3] = (k % 2 == 0).expand(runs, -1)
    mask[:, :, 4] = (k % 6 == 0).expand(runs, -1)
    innovation = torch.where(mask, innovation, torch.full_like(innovation, float("nan")))
    return innovation, variance, mask


def run_monitor(monitor, innovation, variance, mask):
    """Step through (lines, steps, tags); stacked outputs over time."""
    state = monitor.initial_state(innovation.shape[0])
    outputs = []
    for k in range(innovation.shape[1]):
        out = monitor.step(state, innovation[:, k], variance[:, k], mask[:, k])
        state = out.state
        outputs.append(out)
    return {
        "t2": torch.stack([o.t2 for o in outputs], 1),
        "ewma_stat": torch.stack([o.ewma_stat for o in outputs], 1),
        "alarm": torch.stack([o.alarm for o in outputs], 1),
        "contributions": torch.stack([o.contributions for o in outputs], 1),
        "ewma": torch.stack([o.state.ewma for o in outputs], 1),
        "t2_limit": torch.stack([monitor.t2_limit(mask[:, k]) for k in range(mask.shape[1])], 1),
    }


@pytest.fixture
def fitted(float64, rng):
    """A monitor fitted on 100 normal runs of 1000 steps at a 1 % per-step rate."""
    data = normal_innovations(rng, 100, 1000)
    return fit_monitor(*data, false_alarm_rate=0.01, ewma_lambda=0.1), rng


def test_false_alarm_rate_on_fresh_normal_data_is_near_target(fitted):
    monitor, rng = fitted
    assert monitor.fit_exceed_rate == pytest.approx(0.01, rel=0.01)
    innovation, variance, mask = normal_innovations(rng, 100, 1000)
    out = run_monitor(monitor, innovation, variance, mask)
    monitored = mask.any(dim=2)
    rate = float(out["alarm"][monitored].double().mean())
    # Seeds 0-5 gave 0.0090-0.0114: exceedances cluster (AR innovations, EWMA memory), so the
    # 1e5 steps count as far fewer independent trials; +-30 % is about 3 of those spreads.
    assert rate == pytest.approx(0.01, rel=0.3)


def test_t2_limits_of_gaussian_innovations_are_near_chi_square(fitted):
    monitor, _ = fitted
    # The standardisation undoes the miscalibrated variances: T^2 of the fully sampled steps is
    # then chi-square(5) (AR in time does not change the per-step law), at level fit_level.
    assert bool(monitor.t2_limit_empirical[5])
    expected = chi2_quantile(1.0 - monitor.fit_level, N_TAGS)
    assert float(monitor.t2_limits[5]) == pytest.approx(expected, rel=0.05)
    assert not bool(monitor.t2_limit_empirical[1])  # one tag alone: too rare, chi-square ...
    # ... times the tails of the best-sampled count (3 tags: every odd step), near 1 for
    # Gaussian innovations
    ratio = float(monitor.t2_limits[3]) / chi2_quantile(1.0 - monitor.fit_level, 3)
    assert ratio == pytest.approx(1.0, rel=0.05)
    assert float(monitor.t2_limits[1]) == pytest.approx(
        chi2_quantile(1.0 - monitor.fit_level, 1) * ratio, rel=1e-12
    )


def test_a_rare_tag_count_takes_no_more_than_its_share_of_heavy_tailed_false_alarms(float64):
    # Student-t(3) innovations: 3 tags every step, a 4th every 12th step (an assay). 4 tags is
    # too rare for an empirical limit; its plain chi-square limit (17 against 86 for 3 tags)
    # gave those steps 0.032 exceedances per step on fresh data at a level of 0.0018.
    def draw(seed: int):
        torch.manual_seed(seed)
        innovation = torch.distributions.StudentT(3.0).sample((10, 1400, 4))
        mask = torch.ones_like(innovation, dtype=torch.bool)
        mask[:, :, 3] = False
        mask[:, ::12, 3] = True
        return innovation, torch.ones_like(innovation), mask

    monitor = fit_monitor(*draw(0), false_alarm_rate=0.005, ewma_lambda=0.05)
    assert bool(monitor.t2_limit_empirical[3]) and not bool(monitor.t2_limit_empirical[4])
    assert float(monitor.t2_limits[4]) > float(monitor.t2_limits[3])  # a tag more, never lower
    innovation, variance, mask = draw(1)
    t2 = run_monitor(monitor, innovation, variance, mask)["t2"]
    rare = mask[:, :, 3]
    rate = float((t2[rare] > monitor.t2_limits[4]).double().mean())
    # measured 0.0017 at a level of 0.0027 (1170 steps: a few exceedances either way)
    assert rate < 3 * monitor.fit_level


def test_step_bias_in_one_tag_raises_alarm_and_has_the_largest_contribution(fitted):
    monitor, rng = fitted
    innovation, variance, mask = normal_innovations(rng, 50, 200)
    onset, faulty = 100, 2
    innovation[:, onset:, faulty] += 6.0 * SPREAD[faulty]
    out = run_monitor(monitor, innovation, variance, mask)
    sampled = mask[:, onset:, faulty]
    alarms = out["alarm"][:, onset:]
    assert bool(torch.all(alarms[sampled].double().mean() > 0.95))
    first = alarms.double().argmax(dim=1)
    assert bool(torch.all(alarms.any(dim=1))) and int(first.max()) <= 3
    top = out["contributions"][:, onset:].argmax(dim=2)
    assert float((top[sampled & alarms] == faulty).double().mean()) > 0.95
    assert bool(torch.all(out["contributions"][:, onset:].mean(dim=1).argmax(dim=1) == faulty))


def test_slow_ramp_is_caught_by_ewma_before_t2(fitted):
    monitor, rng = fitted
    innovation, variance, mask = normal_innovations(rng, 60, 800)
    onset, faulty = 100, 1
    ramp = torch.clamp(torch.arange(800, dtype=torch.float64) - onset, min=0.0) / 700.0
    innovation[:, :, faulty] += 3.0 * SPREAD[faulty] * ramp  # 0 -> 3 spreads over 700 steps
    out = run_monitor(monitor, innovation, variance, mask)
    after = slice(onset, None)
    ewma_over = (out["ewma_stat"][:, after] > monitor.ewma_limit).any(dim=2)
    t2_over = out["t2"][:, after] > out["t2_limit"][:, after]

    def first_of_three(over):
        # first step of 3 consecutive exceedances: one random exceedance is not a detection
        run = over[:, :-2] & over[:, 1:-1] & over[:, 2:]
        return torch.where(run.any(dim=1), run.double().argmax(dim=1), float(run.shape[1]))

    ewma_delay, t2_delay = first_of_three(ewma_over), first_of_three(t2_over)
    assert float(ewma_delay.median()) < 0.6 * float(t2_delay.median())
    assert float((ewma_delay < t2_delay).double().mean()) > 0.9


def test_masked_tags_contribute_zero_and_do_not_count(fitted):
    monitor, rng = fitted
    innovation, variance, mask = normal_innovations(rng, 4, 20)
    mask[:, :, :] = True
    innovation = torch.randn(4, 20, N_TAGS, generator=rng) * SPREAD
    state = monitor.initial_state(4)
    for k in range(19):
        state = monitor.step(state, innovation[:, k], variance[:, k], mask[:, k]).state
    m = torch.tensor([True, True, False, True, False]).expand(4, -1)
    wild = innovation[:, 19].clone()
    wild[:, 2], wild[:, 4] = 1e6, float("nan")
    out = monitor.step(state, wild, variance[:, 19], m)
    assert bool(torch.all(out.contributions[:, ~m[0]] == 0.0))
    # T^2 with the sub-matrix of the sampled tags only.
    rows = torch.tensor([0, 1, 3])
    ratio = innovation[:, 19, rows] / variance[:, 19, rows].sqrt()
    z = (ratio - monitor.mean[rows]) / monitor.std[rows]
    sub = monitor.corr[rows][:, rows]
    t2 = (z @ torch.linalg.inv(sub) * z).sum(dim=1)
    torch.testing.assert_close(out.t2, t2, rtol=tol("algebra"), atol=tol("algebra"))
    assert bool(torch.all(monitor.t2_limit(m) == monitor.t2_limits[3]))
    torch.testing.assert_close(out.state.ewma[:, ~m[0]], state.ewma[:, ~m[0]], rtol=0.0, atol=0.0)
    assert not torch.equal(out.state.ewma[:, m[0]], state.ewma[:, m[0]])


def test_step_with_nothing_sampled_holds_statistics_and_alarm(fitted):
    monitor, _ = fitted
    state = monitor.initial_state(2)
    state = state._replace(ewma=torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0], [0.0] * 5]))
    state = state._replace(run_length=torch.tensor([4, 0]))
    out = monitor.step(
        state,
        torch.zeros(2, N_TAGS),
        torch.ones(2, N_TAGS),
        torch.zeros(2, N_TAGS, dtype=torch.bool),
    )
    assert out.t2.tolist() == [0.0, 0.0]
    assert out.state.run_length.tolist() == [4, 0]
    assert out.alarm.tolist() == [True, False]
    assert torch.equal(out.state.ewma, state.ewma)


def _hand_monitor(persistence: int) -> InnovationMonitor:
    """Identity correlation, T^2 limit 10 for any count, EWMA limit 3 with lambda 1 (|z|)."""
    n = 2
    return InnovationMonitor(
        torch.zeros(n),
        torch.ones(n),
        torch.eye(n),
        torch.tensor([float("inf"), 10.0, 10.0]),
        torch.ones(n),
        100.0,
        1.0,
        persistence,
    )


@pytest.mark.parametrize(
    ("persistence", "expected"), [(1, [1, 1, 0, 1, 1, 1, 1, 0]), (3, [0, 0, 0, 0, 0, 0, 1, 0])]
)
def test_persistence_needs_k_consecutive_exceedances(float64, persistence, expected):
    monitor = _hand_monitor(persistence)
    # T^2 = z0^2 + z1^2: 16 exceeds 10, 1 does not. Step 4 has nothing sampled: it neither
    # counts nor breaks the run, so steps 3, 5, 6 are the three consecutive exceedances.
    big, small = [4.0, 0.0], [1.0, 0.0]
    sequence = [big, big, small, big, None, big, big, small]
    state = monitor.initial_state(1)
    alarms = []
    for values in sequence:
        sampled = values is not None
        innovation = torch.tensor([values if sampled else [0.0, 0.0]])
        mask = torch.full((1, 2), sampled)
        out = monitor.step(state, innovation, torch.ones(1, 2), mask)
        state = out.state
        alarms.append(int(out.alarm[0]))
    assert alarms == expected


def test_contributions_are_reconstruction_based(float64, rng):
    # RBC_i = T^2 - T^2 after replacing z_i by its best estimate from the other tags.
    z = torch.randn(3, N_TAGS, generator=rng)
    used = torch.ones(3, N_TAGS, dtype=torch.bool)
    t2, contributions = masked_hotelling(z, used, CORR)
    for i in range(N_TAGS):
        others = [j for j in range(N_TAGS) if j != i]
        c_oo, c_io = CORR[others][:, others], CORR[i, others]
        reconstructed = z.clone()
        reconstructed[:, i] = z[:, others] @ torch.linalg.solve(c_oo, c_io)
        t2_rec = (reconstructed @ torch.linalg.inv(CORR) * reconstructed).sum(dim=1)
        torch.testing.assert_close(contributions[:, i], t2 - t2_rec, rtol=1e-10, atol=1e-10)


def test_scripted_monitor_reloaded_matches_eager(fitted):
    monitor, rng = fitted
    # In memory: concurrent pytest sessions of one user prune each other's tmp_path roots.
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(monitor), buffer)
    buffer.seek(0)
    scripted = torch.jit.load(buffer)
    innovation, variance, mask = normal_innovations(rng, 3, 60)
    innovation[:, 30:, 0] += 4.0
    eager_out = run_monitor(monitor, innovation, variance, mask)
    scripted_out = run_monitor(scripted, innovation, variance, mask)
    for key, value in eager_out.items():
        torch.testing.assert_close(
            scripted_out[key], value, rtol=0.0, atol=tol("scripted_vs_eager")
        )
    assert bool(eager_out["alarm"].any())


def test_chi2_quantile_matches_tabulated_values():
    # scipy.stats.chi2.ppf values
    assert chi2_quantile(0.99, 1) == pytest.approx(6.634896601021214, rel=1e-10)
    assert chi2_quantile(0.95, 8) == pytest.approx(15.507313055865453, rel=1e-10)
    assert chi2_quantile(0.999, 3) == pytest.approx(16.26623619623813, rel=1e-10)


def _bad(kind):
    g = torch.Generator().manual_seed(1)
    e = torch.randn(2, 50, 3, generator=g)
    v = torch.ones(2, 50, 3)
    m = torch.ones(2, 50, 3, dtype=torch.bool)
    if kind == "empty":
        return (e[:, :0], v[:, :0], m[:, :0]), {}
    if kind == "nan":
        e[1, 7, 2] = float("nan")
    if kind == "nan_unsampled_is_fine":
        e[1, 7, 2] = float("nan")
        m[1, 7, 2] = False
    if kind == "var":
        v[0, 3, 1] = 0.0
    if kind == "shape":
        v = v[:, :40]
    if kind == "dtype":
        m = m.int()
    if kind == "rank":
        e, v, m = e[0, 0], v[0, 0], m[0, 0]
    if kind == "sparse":
        m[:, 10:, 1] = False
    if kind == "type":
        e = e.numpy()
    return (e, v, m), {"tags": ["NIR.API", "PRESS.WEIGHT", "BLEND.SPEED"]}


@pytest.mark.parametrize(
    ("kind", "error", "match"),
    [
        ("empty", MonitorDataError, "innovation: empty"),
        ("nan", MonitorDataError, "innovation: 1 sampled .* run 1, step 7, tag 'BLEND.SPEED'"),
        ("var", MonitorDataError, "innovation_var: .* run 0, step 3, tag 'PRESS.WEIGHT'"),
        ("shape", ShapeError, r"innovation_var: expected .* \(2, 50, 3\), got \(2, 40, 3\)"),
        ("dtype", ShapeError, "mask: expected dtype torch.bool"),
        ("rank", ShapeError, r"innovation: expected \(time, n_tags\) or \(runs, time, n_tags\)"),
        ("sparse", MonitorDataError, "mask: tag 'PRESS.WEIGHT' is sampled 20 times"),
        ("type", ShapeError, "innovation: expected a torch.Tensor, got ndarray"),
    ],
)
def test_fit_refuses_bad_input_naming_the_argument(float64, kind, error, match):
    args, kwargs = _bad(kind)
    with pytest.raises(error, match=match):
        fit_monitor(*args, **kwargs)


def test_fit_accepts_nan_where_not_sampled(float64):
    args, kwargs = _bad("nan_unsampled_is_fine")
    monitor = fit_monitor(*args, **kwargs)
    assert monitor.n_tags == 3


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"false_alarm_rate": 0.0}, "false_alarm_rate"),
        ({"ewma_lambda": 1.5}, "ewma_lambda"),
        ({"persistence": 0}, "persistence"),
        ({"shrinkage": 1.0}, "shrinkage"),
        ({"tags": ["a"]}, "tags: expected 3 names"),
    ],
)
def test_fit_refuses_bad_options(float64, option, match):
    (e, v, m), _ = _bad("ok")
    with pytest.raises((ConfigError, ShapeError), match=match):
        fit_monitor(e, v, m, **option)


def test_the_padding_of_a_shorter_run_does_not_change_the_fit(float64):
    rng = torch.Generator().manual_seed(1)

    def innovations(steps):  # autocorrelated, as a filter's innovations are
        e, x = torch.zeros(steps, 3), torch.zeros(3)
        for k in range(steps):
            x = 0.95 * x + 0.3 * torch.randn(3, generator=rng)
            e[k] = x + 0.2 * torch.randn(3, generator=rng)
        return e

    long_run, short_run = innovations(1500), innovations(400)

    def fit(total):  # fit_monitor's docstring: pad short runs with mask False
        e, m = torch.zeros(2, total, 3), torch.zeros(2, total, 3, dtype=torch.bool)
        e[0, :1500], m[0, :1500] = long_run, True
        e[1, :400], m[1, :400] = short_run, True
        return fit_monitor(e, torch.ones_like(e), m, false_alarm_rate=0.01, ewma_lambda=0.05)

    padded, more = fit(1500), fit(6000)
    # the held EWMA of the padding weighed the third tag's spread by pad length (2.4x at 30k)
    torch.testing.assert_close(more.ewma_rms, padded.ewma_rms, rtol=1e-12, atol=0.0)
    assert float(more.ewma_limit) == pytest.approx(float(padded.ewma_limit), rel=1e-12)


def test_a_monitor_fitted_for_a_float64_twin_keeps_the_fit_s_digits(float64, rng):
    # the fit runs in float64, but its limits were rounded to float32 before a float64
    # twin's file took them (ewma_limit 8.951200485229492)
    data = normal_innovations(rng, 20, 500)
    wide = fit_monitor(*data, false_alarm_rate=0.01, ewma_lambda=0.1, dtype=torch.float64)
    narrow = fit_monitor(*data, false_alarm_rate=0.01, ewma_lambda=0.1, dtype=torch.float32)
    for name in ("mean", "std", "corr", "t2_limits", "ewma_rms", "ewma_limit"):
        value, rounded = getattr(wide, name), getattr(narrow, name)
        assert value.dtype == torch.float64 and rounded.dtype == torch.float32, name
        assert torch.equal(value.to(torch.float32), rounded), name
    assert not torch.equal(wide.std, wide.std.to(torch.float32).to(torch.float64))
