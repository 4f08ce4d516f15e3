"""Parameter specs and the bounding transforms (softplus / sigmoid, never clamping)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import tol

from hybrid_twin import ConfigError, ParameterSet, ParamSpec

# Property tests: few examples (2 shared cores), no deadline (first calls pay torch's warm-up);
# the function-scoped fixtures only set the dtype, so reusing them across examples is fine.
PROPERTY_SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

SPECS = [
    ParamSpec("free", "1", -3.0),
    ParamSpec("positive_s", "s", 5.0, (2.0, math.inf)),
    ParamSpec("capped_kg", "kg", 1.0, (-math.inf, 4.0)),
    ParamSpec("share", "1", 0.2, (0.0, 1.0)),
    ParamSpec("fixed_mg", "mg", 25.0, (1.0, 100.0), learnable=False),
]


def test_initial_values_round_trip_through_the_transforms(float64):
    values = ParameterSet(SPECS).values()
    expected = torch.tensor([s.default for s in SPECS])
    torch.testing.assert_close(values.detach(), expected, rtol=tol("algebra"), atol=tol("algebra"))


@PROPERTY_SETTINGS
@given(raw=st.lists(st.floats(-50.0, 50.0), min_size=4, max_size=4))
def test_any_unconstrained_value_maps_inside_the_bounds(float64, raw):
    parameters = ParameterSet(SPECS)
    with torch.no_grad():
        parameters.raw.copy_(torch.tensor(raw))
    values = parameters.values().tolist()
    for spec, value in zip(SPECS, values, strict=True):
        assert spec.bounds[0] <= value <= spec.bounds[1], (spec.name, value)


def test_bounded_values_keep_a_gradient_near_their_bounds(float64):
    parameters = ParameterSet(SPECS)
    with torch.no_grad():
        parameters.raw.copy_(torch.tensor([0.0, -8.0, -8.0, 8.0]))  # close to the bounds
    parameters.values().sum().backward()
    assert bool((parameters.raw.grad.abs() > 1e-4).all()), (
        parameters.raw.grad
    )  # a clamp would give 0


def test_fixed_parameters_are_buffers_not_parameters(float64):
    parameters = ParameterSet(SPECS)
    assert parameters.raw.numel() == 4
    assert float(parameters.fixed[0]) == 25.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            lambda: ParamSpec("tau_s", "s", 0.5, (2.0, 300.0)),
            r"'tau_s': value 0.5 s is not strictly inside bounds \[2.0, 300.0\] s",
        ),
        (
            lambda: ParamSpec("share", "1", 1.0, (0.0, 1.0)),
            r"'share': value 1.0 is not strictly inside bounds \[0.0, 1.0\]",
        ),
        (
            lambda: ParamSpec("bad", "1", 1.0, (2.0, 1.0)),
            r"'bad': bounds \(2.0, 1.0\) need low < high",
        ),
        (lambda: ParamSpec("tight", "1", 1e-300, (0.0, 1e30)), "too close to its bounds"),
    ],
)
def test_invalid_specs_raise_config_errors_with_value_and_bounds(spec, message):
    with pytest.raises(ConfigError, match=message):
        spec()
    # A fixed parameter may sit on its bound.
    assert ParamSpec("share", "1", 1.0, (0.0, 1.0), learnable=False).default == 1.0


@pytest.mark.parametrize(("value", "bounds"), [(0.99999999, (0.0, 1.0)), (19.9999999, (0.1, 20.0))])
def test_a_value_that_rounds_onto_its_bound_in_float32_is_refused_there(value, bounds):
    spec = ParamSpec("near", "1", value, bounds)  # inside in float64
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        ParameterSet([spec])  # float64 keeps it inside
        torch.set_default_dtype(torch.float32)  # training's dtype: on the bound, zero gradient
        with pytest.raises(ConfigError, match=r"'near': .*too close to its bounds .* in "
                                              r"torch.float32"):  # fmt: skip
            ParameterSet([spec])
    finally:
        torch.set_default_dtype(previous)
