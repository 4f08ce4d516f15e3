"""The cascaded-tanks unit (Torricelli prior of the Cascaded Tanks benchmark) as physics."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import tol

from hybrid_twin import UNITS, ConfigError, build_flowsheet, cascaded_tanks_flowsheet_spec

PROPERTY_SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
K = st.floats(1e-3, 0.5)


def _tanks(k1, k2, k3, k4, offset=0.0, saturation_v=10.0):
    params = {
        "k1_upper_outflow": k1,
        "k2_transfer": k2,
        "k3_lower_outflow": k3,
        "k4_pump_gain": k4,
        "sensor_offset_v": offset,
    }
    return UNITS["cascaded_tanks"]("tanks", ["water"], saturation_v=saturation_v, params=params)


def test_steady_state_is_an_equilibrium_of_the_torricelli_balances(float64):
    @PROPERTY_SETTINGS
    @given(k1=K, k2=K, k3=K, k4=K, offset=st.floats(-2.0, 2.0), u=st.floats(0.0, 8.0))
    def check(k1, k2, k3, k4, offset, u):
        # Any pump voltage, a trickle or none included: the drain law is inverted exactly.
        tanks = _tanks(k1, k2, k3, k4, offset, saturation_v=None)
        theta = tanks.theta()
        pump = torch.tensor([[u]])
        x, _ = tanks.steady_state(pump, torch.zeros(1, 1), theta)
        dx, _ = tanks.derivative(x, pump, torch.zeros(1, 1), theta)
        scale = 1.0 + float(k4 * u)
        torch.testing.assert_close(dx, torch.zeros_like(dx), rtol=0.0, atol=tol("algebra") * scale)

    check()


def test_with_the_pump_off_both_tanks_are_empty_and_stay_there(float64):
    tanks = _tanks(0.05, 0.04, 0.06, 0.05, offset=0.3, saturation_v=None)
    theta = tanks.theta()
    off = torch.zeros(1, 1)
    x, _ = tanks.steady_state(off, torch.zeros(1, 1), theta)
    torch.testing.assert_close(x, torch.tensor([[0.0, 0.3]]), rtol=0.0, atol=tol("algebra"))
    dx, _ = tanks.derivative(x, off, torch.zeros(1, 1), theta)
    torch.testing.assert_close(dx, torch.zeros_like(dx), rtol=0.0, atol=tol("algebra"))
    # A level pushed below empty (by a learned correction) drains nothing either.
    dx, _ = tanks.derivative(torch.tensor([[-0.4, -1.0]]), off, torch.zeros(1, 1), theta)
    torch.testing.assert_close(dx, torch.zeros_like(dx), rtol=0.0, atol=tol("algebra"))


def test_empty_tanks_do_not_drain_below_empty(float64):
    @PROPERTY_SETTINGS
    @given(k1=K, k2=K, k3=K, k4=K, u=st.floats(0.0, 10.0))
    def check(k1, k2, k3, k4, u):
        tanks = _tanks(k1, k2, k3, k4)
        dx, _ = tanks.derivative(
            torch.zeros(1, 2), torch.tensor([[u]]), torch.zeros(1, 1), tanks.theta()
        )
        # No water leaves an empty tank: sqrt(0 + 1e-6) - 1e-3 is 0 up to rounding.
        assert float(dx.detach().min()) >= -tol("algebra")

    check()


def test_the_reading_saturates_at_the_sensor_limit(float64):
    tanks = _tanks(0.05, 0.05, 0.05, 0.05)
    x = torch.tensor([[3.0, 4.0], [3.0, 10.0], [3.0, 12.5]])
    torch.testing.assert_close(
        tanks.outputs(x, tanks.theta()),
        torch.tensor([[4.0], [10.0], [10.0]]),
        rtol=0.0,
        atol=tol("algebra"),
    )


def test_built_in_flowsheet_maps_the_plant_tags_and_scripts(float64):
    flowsheet = build_flowsheet(cascaded_tanks_flowsheet_spec())
    assert flowsheet.state_names == ["tanks.upper_level_v", "tanks.lower_level_v"]
    assert flowsheet.input_tags == ["PUMP.VOLTAGE"]
    scripted = torch.jit.script(flowsheet)
    x, u = torch.tensor([[4.0, 6.0]]), torch.tensor([[2.8]])
    torch.testing.assert_close(
        scripted.rhs(x, u, flowsheet.theta()),
        flowsheet.rhs(x, u, flowsheet.theta()),
        rtol=0.0,
        atol=tol("scripted_vs_eager"),
    )


def test_nominal_pump_voltage_outside_its_range_names_the_key():
    with pytest.raises(ConfigError, match=r"tanks.nominal_pump_v: 12.0 V is outside pump_range_v"):
        UNITS["cascaded_tanks"]("tanks", ["water"], nominal_pump_v=12.0)
