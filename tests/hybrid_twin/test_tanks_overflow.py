"""The cascaded tanks' overflow law (`overflow=True`): full tanks stop rising and spill."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import tol

from hybrid_twin import FLOWSHEETS, UNITS, ConfigError, build_flowsheet, integrate_zoh

PROPERTY_SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
WIDTH = 0.5
PARAMS = {
    "k1_upper_outflow": 0.05,
    "k2_transfer": 0.04,
    "k3_lower_outflow": 0.06,
    "k4_pump_gain": 0.05,
    "sensor_offset_v": 0.5,
    "upper_overflow_v": 8.0,
    "lower_overflow_v": 9.0,
    "k5_spill_to_lower": 0.3,
}


def _tanks(**overrides):
    params = {**PARAMS, **overrides}
    return UNITS["cascaded_tanks"](
        "tanks", ["water"], saturation_v=None, overflow=True, overflow_width_v=WIDTH, params=params
    )


def _drain_root(level: float) -> float:
    """Torricelli's sqrt(level) as the unit takes it: 0 at an empty tank, finite slope there."""
    return math.sqrt(level + 1e-6) - 1e-3


@torch.no_grad()
def test_a_full_upper_tank_holds_its_level_and_sends_k5_of_its_spill_down(float64):
    tanks = _tanks()
    x1, x2, u = 8.0 + WIDTH / 2, 4.0, 6.0  # upper at h1 + w/2, the level where it stops
    dx, _ = tanks.derivative(
        torch.tensor([[x1, x2]]), torch.tensor([[u]]), torch.zeros(1, 1), tanks.theta()
    )
    root1, root2 = _drain_root(x1), _drain_root(x2 - 0.5)
    spill = 0.05 * u - 0.05 * root1  # the net inflow the full tank cannot hold
    lower = 0.04 * root1 + 0.3 * spill - 0.06 * root2
    torch.testing.assert_close(dx, torch.tensor([[0.0, lower]]), rtol=0.0, atol=tol("algebra"))


@torch.no_grad()
def test_below_the_ramp_the_law_is_plain_torricelli(float64):
    plain = UNITS["cascaded_tanks"]("tanks", ["water"], saturation_v=None, params={
        k: v for k, v in PARAMS.items() if k not in
        ("upper_overflow_v", "lower_overflow_v", "k5_spill_to_lower")})  # fmt: skip
    tanks = _tanks()
    x = torch.tensor([[0.0, 0.5], [3.0, 2.0], [8.0 - WIDTH / 2, 9.0 - WIDTH / 2], [8.2, 1.0]])
    u = torch.tensor([[0.0], [2.5], [6.0], [0.0]])  # last row: in the ramp, but draining
    args = (x, u, torch.zeros(4, 1))
    torch.testing.assert_close(
        tanks.derivative(*args, tanks.theta())[0],
        plain.derivative(*args, plain.theta())[0],
        rtol=0.0,
        atol=tol("algebra"),
    )


@torch.no_grad()
def test_a_level_above_the_rim_spills_back_to_it_even_while_draining(float64):
    # The learned start or a residual may put a level above h + w/2 with no net inflow: it
    # used to drain by Torricelli alone there, to an equilibrium above the rim (u 4 V from
    # x1 20 V: 17.9 V against a rim at 13.2 V, in the stored benchmark run's parameters).
    flowsheet = build_flowsheet(_overflow_spec())
    theta = flowsheet.theta()
    # u 4 V: Torricelli alone would hold the upper tank at (k4 u / k1)^2 = 16 V, above its rim
    # at 8.25 V: overflowing, it stops at the rim; started at 20 V it has no net inflow
    pump = torch.full((1, 300, 1), 4.0)
    x0 = torch.tensor([[20.0, 14.0]])  # both above their rims, 8.25 and 9.25 V
    states = integrate_zoh(flowsheet, x0, pump, 4.0, "rk4", n_substeps=1).states[0]
    rims = torch.tensor([8.0, 9.0]) + WIDTH / 2
    settled = flowsheet.steady_state(torch.tensor([[4.0]]), theta)[0]
    assert float(settled[0]) == pytest.approx(float(rims[0]))  # the upper tank overflows
    assert bool((states[-1] <= rims + 1e-6).all()), states[-1]
    torch.testing.assert_close(states[-1], settled, rtol=0.0, atol=1e-4)  # was 16 V up there
    assert bool((states[1:, 0].diff() <= 1e-12).all())  # the upper level only falls


def test_steady_state_is_an_equilibrium_overflowing_or_not(float64):
    @PROPERTY_SETTINGS
    @given(
        h1=st.floats(2.0, 15.0),
        h2=st.floats(2.0, 12.0),
        k5=st.floats(0.05, 0.95),
        u=st.floats(0.5, 8.0),
    )
    def check(h1, h2, k5, u):
        tanks = _tanks(upper_overflow_v=h1, lower_overflow_v=h2, k5_spill_to_lower=k5)
        theta = tanks.theta()
        pump = torch.tensor([[u]])
        x, _ = tanks.steady_state(pump, torch.zeros(1, 1), theta)
        x = x.detach()
        assert float(x[0, 0]) <= h1 + WIDTH / 2 + 1e-12 and float(x[0, 1]) <= h2 + WIDTH / 2 + 1e-12
        dx, _ = tanks.derivative(x, pump, torch.zeros(1, 1), theta)
        torch.testing.assert_close(dx, torch.zeros_like(dx), rtol=0.0, atol=tol("algebra") * 10)

    check()


@torch.no_grad()
def test_filling_hard_rk4_stops_at_the_overflow_levels_and_settles(float64):
    # dt 4 s, one RK4 step, as the benchmark trains. The spill's slope at the rim, net inflow
    # / w = (k4 u - k1 sqrt(h1)) / w, times dt must stay under RK4's 2.78 (module docstring).
    u, dt = 8.0, 4.0
    assert dt * (0.05 * u - 0.05 * math.sqrt(8.0 + WIDTH / 2)) / WIDTH < 2.78
    flowsheet = build_flowsheet(_overflow_spec())
    theta = flowsheet.theta()
    x0 = flowsheet.steady_state(torch.tensor([[1.0]]), theta)
    pump = torch.full((1, 400, 1), u)
    states = integrate_zoh(flowsheet, x0, pump, dt, "rk4", n_substeps=1).states[0]
    limits = torch.tensor([8.0, 9.0]) + WIDTH / 2
    assert bool((states <= limits + 1e-9).all()), states.max(dim=0).values
    settled = flowsheet.steady_state(torch.tensor([[u]]), theta)[0]
    torch.testing.assert_close(states[-1], settled, rtol=0.0, atol=1e-6)
    torch.testing.assert_close(settled, limits, rtol=0.0, atol=tol("algebra"))


def test_scripted_overflow_matches_eager(float64):
    flowsheet = build_flowsheet(_overflow_spec())
    scripted = torch.jit.script(flowsheet)
    theta = flowsheet.theta()
    x = torch.tensor([[7.9, 8.95], [3.0, 4.0]])
    u = torch.tensor([[6.0], [2.0]])
    for name, args in (("rhs", (x, u, theta)), ("steady_state", (u, theta))):
        torch.testing.assert_close(
            getattr(scripted, name)(*args),
            getattr(flowsheet, name)(*args),
            rtol=0.0,
            atol=tol("scripted_vs_eager"),
        )


def test_a_non_positive_overflow_width_names_the_key():
    with pytest.raises(ConfigError, match=r"tanks.overflow_width_v: expected > 0 V, got 0.0"):
        UNITS["cascaded_tanks"]("tanks", ["water"], overflow=True, overflow_width_v=0.0)


def _overflow_spec():
    spec = FLOWSHEETS["cascaded_tanks_overflow"]()
    spec["units"]["tanks"]["params"] = PARAMS
    return spec
