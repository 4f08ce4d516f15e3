"""Hybrid vector field kinds, residual bounds, closure form, observation model, gradients."""

import pytest
import torch
from tolerances import tol

from hybrid_twin import (
    RK4,
    ConfigError,
    Dopri5,
    HybridVectorField,
    ModelConfig,
    Normaliser,
    ObservationModel,
    ResidualNet,
    ShapeError,
    build_flowsheet,
    cdc_line_flowsheet_spec,
)


@pytest.fixture
def line_point(cdc_flowsheet, make_inputs, rng):
    """States near the nominal steady state (+-10 %) and inputs, batch of 8."""
    u = make_inputs(cdc_flowsheet, 8, 1, rng)[:, 0]
    x = cdc_flowsheet.steady_state(u, cdc_flowsheet.theta()).detach()
    return x * (1.0 + 0.1 * torch.rand(x.shape, generator=rng)), u


@pytest.mark.parametrize("closure", [[], ["blender.holdup_ref_kg", "feeder_api.feed_factor"]])
def test_fresh_hybrid_equals_its_mechanistic_model(cdc_flowsheet, line_point, rng, closure):
    field = HybridVectorField(cdc_flowsheet, {"kind": "hybrid", "closure": closure}, generator=rng)
    x, u = line_point
    # Additive: exactly equal. Closure: theta * exp(0) per row, and kernels broadcasting a
    # (batch, 1) column may round differently from a (1, 1) one: last bits only.
    exact = 0.0 if not closure else tol("algebra")
    torch.testing.assert_close(field(x, u), cdc_flowsheet(x, u), rtol=exact, atol=exact)


def test_additive_residual_stays_inside_its_per_state_bound(
    cdc_flowsheet, random_hybrid, line_point
):
    field = random_hybrid(cdc_flowsheet, hidden=(16,))
    with torch.no_grad():
        field.net.layers[-1].weight.mul_(1e3)  # saturate the tanh: the bound must still hold
    x, u = line_point
    ratio = ((field(x, u) - cdc_flowsheet(x, u)).abs() / field.derivative_scale).detach()
    assert float(ratio.max()) <= 1.0 + tol("algebra")
    assert float(ratio.max()) > 0.99  # and the network can reach it


def test_black_box_derivative_is_the_scaled_network_alone(cdc_flowsheet, random_hybrid, line_point):
    field = random_hybrid(cdc_flowsheet, kind="black_box")
    x, u = line_point
    expected = field.residual(x, u) * field.derivative_scale
    torch.testing.assert_close(field(x, u), expected, rtol=0.0, atol=0.0)


def test_closure_form_corrects_only_the_named_parameters_within_bounds(
    cdc_flowsheet, random_hybrid, line_point
):
    names = ["blender.holdup_ref_kg", "feeder_api.feed_factor"]
    field = random_hybrid(cdc_flowsheet, closure=names)
    x, u = line_point
    g = field.residual(x, u).detach()
    theta = cdc_flowsheet.theta().detach().expand(x.shape[0], -1).clone()
    index = [cdc_flowsheet.param_names.index(name) for name in names]
    factor = torch.exp(0.5 * g)  # closure_log_bound defaults to 0.5
    theta[:, index] = theta[:, index] * factor
    torch.testing.assert_close(
        field(x, u), cdc_flowsheet.rhs(x, u, theta), rtol=tol("algebra"), atol=tol("algebra")
    )
    assert float(factor.max()) < 1.6488 and float(factor.min()) > 1 / 1.6488  # exp(+-0.5)


@pytest.mark.parametrize("name", ["feeder_api.response_tau_s", "blender.drive_tau_s",
                                  "press.weight_tau_s"])  # fmt: skip
def test_a_closure_correction_keeps_a_time_constant_inside_its_bounds(name, float64, rng):
    # exp(-0.5) took a time constant learned at 2.2 s (its floor: 2 s) to 1.33 s, where one
    # 5 s RK4 step diverges: the state reached 1e22 within 40 steps of a setpoint step
    spec = cdc_line_flowsheet_spec()
    unit, param = name.split(".")
    spec["units"][unit].setdefault("params", {})[param] = 2.2
    flowsheet = build_flowsheet(spec)
    field = HybridVectorField(flowsheet, {"kind": "hybrid", "closure": [name]}, generator=rng)
    with torch.no_grad():
        field.net.layers[-1].bias.fill_(-5.0)  # saturated: g = tanh(-5), theta' -> theta e^-0.5
    u0 = flowsheet.nominal_inputs()
    x0 = flowsheet.steady_state(u0, flowsheet.theta()).detach()
    low = flowsheet.param_specs[flowsheet.param_names.index(name)].bounds[0]
    assert field.closure_low.tolist() == [low] == [2.0]
    u = (u0 * 1.3).unsqueeze(1).repeat(1, 40, 1)  # every setpoint 30 % up
    with torch.no_grad():
        states = RK4(field)(x0, u, 5.0).states
    assert bool(torch.isfinite(states).all())
    assert float(states.abs().max()) < 10 * float(x0.abs().max() + 1.0)


def test_mechanistic_kind_trains_theta_only_and_black_box_has_a_network(cdc_flowsheet, rng):
    mechanistic = HybridVectorField(cdc_flowsheet, {"kind": "mechanistic"})
    assert mechanistic.net is None
    assert all(name.endswith("params.raw") for name, _ in mechanistic.named_parameters())
    black_box = HybridVectorField(cdc_flowsheet, {"kind": "black_box"}, generator=rng)
    assert any(name.startswith("net.") for name, _ in black_box.named_parameters())


def test_one_seed_gives_one_network_whatever_the_default_dtype():
    def initial_weights(dtype):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            net = ResidualNet(11, 8, (16, 16), False, torch.Generator().manual_seed(7))
        finally:
            torch.set_default_dtype(previous)
        return net.state_dict()

    weights32, weights64 = initial_weights(torch.float32), initial_weights(torch.float64)
    for name, value in weights64.items():
        assert value.dtype == torch.float64
        assert torch.equal(value, weights32[name].to(torch.float64)), name


def test_model_config_errors_name_the_bad_key(cdc_flowsheet):
    with pytest.raises(
        ConfigError, match="unknown kind 'grey_box'; valid: black_box, hybrid, mechanistic"
    ):
        ModelConfig.from_mapping({"kind": "grey_box"})
    with pytest.raises(
        ConfigError, match="model: unknown key 'hiden'; valid: closure, kind, readout, residual"
    ):
        ModelConfig.from_mapping({"hiden": [64]})
    with pytest.raises(ConfigError, match="model.residual: unknown key 'width'"):
        ModelConfig.from_mapping({"residual": {"width": 64}})
    with pytest.raises(ConfigError, match="only the hybrid kind has a closure form"):
        ModelConfig.from_mapping({"kind": "black_box", "closure": ["blender.holdup_ref_kg"]})
    with pytest.raises(
        ConfigError, match="unknown parameter 'blender.holdup'; valid: blender.drive_tau_s"
    ):
        HybridVectorField(cdc_flowsheet, {"closure": ["blender.holdup"]})
    with pytest.raises(ConfigError, match="mechanistic kind has no network to correct a readout"):
        ModelConfig.from_mapping({"kind": "mechanistic", "readout": ["PRESS.COMP_FORCE"]})


@pytest.mark.parametrize("kind", ["hybrid", "black_box"])
def test_readout_correction_starts_at_zero_and_stays_inside_its_bound(cdc_flowsheet, rng, kind):
    config = {"kind": kind, "readout": ["PRESS.COMP_FORCE", "NIR.API_CONC"],
              "residual": {"hidden": [8], "readout_log_bound": 0.2}}
    field = HybridVectorField(cdc_flowsheet, config, generator=rng)
    x = cdc_flowsheet.steady_state(cdc_flowsheet.nominal_inputs(), cdc_flowsheet.theta())
    x = x * (1.0 + 0.3 * torch.randn(64, x.shape[1], generator=rng))
    assert torch.equal(field.readout_correction(x), torch.zeros(64, 2))  # zero-initialised
    with torch.no_grad():
        for parameter in field.readout_net.parameters():
            parameter.uniform_(-3.0, 3.0, generator=rng)
    g = field.readout_correction(x)
    assert g.shape == (64, 2) and bool((g.abs() < 1.0).all()) and bool((g.abs() > 0).any())
    assert field.readout_log_bound == 0.2
    mechanistic = HybridVectorField(cdc_flowsheet, {"kind": "mechanistic"})
    assert mechanistic.readout_correction(x).shape == (64, 0)


def test_observation_model_reads_the_tags_at_the_nominal_point(cdc_flowsheet):
    observation = ObservationModel(cdc_flowsheet)
    u = cdc_flowsheet.nominal_inputs()
    x = cdc_flowsheet.steady_state(u, cdc_flowsheet.theta())
    y = observation(
        x.unsqueeze(1).expand(2, 3, -1)
    )  # (batch, time, n_states) -> (batch, time, n_tags)
    assert y.shape == (2, 3, 8)
    got = dict(zip(observation.tags, y[0, 0].tolist(), strict=True))
    expected = {
        "FEED_API.MASSFLOW": 3.0,
        "FEED_EXC.MASSFLOW": 26.7,
        "FEED_LUB.MASSFLOW": 0.3,
        "BLEND.SPEED": 400.0,
        "NIR.API_CONC": 10.0,
        "PRESS.COMP_FORCE": 15.0,
        "PRESS.TABLET_WEIGHT": 400.0,
        "PRESS.TABLET_API": 100.0,
    }
    assert got == pytest.approx(expected, rel=1e-12)
    assert observation.tag_units[observation.tags.index("NIR.API_CONC")] == "%w/w"


def test_nir_calibration_gain_and_offset_act_on_the_nir_tag_only(cdc_flowsheet):
    observation = ObservationModel(cdc_flowsheet)
    x = cdc_flowsheet.steady_state(cdc_flowsheet.nominal_inputs(), cdc_flowsheet.theta())
    before = observation(x).detach()
    with torch.no_grad():
        observation.calibration.raw.add_(0.3)  # moves the gain and the offset
    after = observation(x).detach()
    nir = observation.tags.index("NIR.API_CONC")
    gain, offset = observation.calibration.values().tolist()
    torch.testing.assert_close(after[0, nir], before[0, nir] * gain + offset)
    others = [i for i in range(len(observation.tags)) if i != nir]
    torch.testing.assert_close(after[:, others], before[:, others], rtol=0.0, atol=0.0)


def test_observation_errors_name_the_tag(cdc_flowsheet):
    with pytest.raises(ConfigError, match="unknown tag 'NIR.API'; valid: BLEND.SPEED"):
        ObservationModel(cdc_flowsheet, tags=["NIR.API"])
    with pytest.raises(ConfigError, match="'NIR.API_CONC' is not one of the predicted tags"):
        ObservationModel(cdc_flowsheet, tags=["BLEND.SPEED"])


def test_normaliser_round_trips_and_rejects_non_positive_std(float64, rng):
    v = torch.randn(5, 7, 3, generator=rng) * 4.0 + 2.0
    normaliser = Normaliser.fit(v)
    torch.testing.assert_close(
        normaliser.denormalise(normaliser(v)), v, rtol=tol("algebra"), atol=tol("algebra")
    )
    with pytest.raises(ConfigError, match="every std must be finite and > 0"):
        Normaliser(torch.zeros(2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ShapeError, match=r"equal shape \(n,\), got \(2,\) and \(3,\)"):
        Normaliser(torch.zeros(2), torch.ones(3))


@pytest.mark.parametrize("solver_type", [RK4, Dopri5])
def test_gradcheck_theta_and_phi_on_a_two_state_three_step_problem(
    feeder_flowsheet, random_hybrid, solver_type
):
    field = random_hybrid(feeder_flowsheet, hidden=(4,))
    options = {"adaptive": False} if solver_type is Dopri5 else {}
    solver = solver_type(
        field, **options
    )  # fixed steps: an adaptive step sequence is not differentiable
    x0, u = torch.tensor([[5.0, 2.5]]), torch.tensor([[[3.0], [4.5], [2.0]]])
    names, values = zip(
        *[(n, p.detach().clone().requires_grad_()) for n, p in solver.named_parameters()],
        strict=True,
    )
    assert any("params.raw" in n for n in names) and any(
        ".net." in n for n in names
    )  # theta and phi

    def states(*params):
        values = dict(zip(names, params, strict=True))
        return torch.func.functional_call(solver, values, (x0, u, 5.0)).states

    assert torch.autograd.gradcheck(
        states, values, eps=1e-6, atol=tol("finite_difference"), rtol=tol("finite_difference")
    )


def test_line_loss_gradients_match_finite_differences(
    cdc_flowsheet, random_hybrid, make_inputs, rng
):
    field = random_hybrid(cdc_flowsheet, hidden=(16,))
    observation = ObservationModel(cdc_flowsheet)
    u = make_inputs(cdc_flowsheet, 2, 8, rng)
    x0 = cdc_flowsheet.steady_state(u[:, 0], cdc_flowsheet.theta()).detach()
    scale = observation(x0).detach().abs().unsqueeze(1) + 1.0
    target = observation(x0).detach().unsqueeze(1) * 1.05

    def loss() -> torch.Tensor:
        y = observation(RK4(field)(x0, u, 5.0).states)
        return (((y - target) / scale) ** 2).mean()

    blender = cdc_flowsheet.units[cdc_flowsheet.unit_names.index("blender")].params.raw
    press = cdc_flowsheet.units[cdc_flowsheet.unit_names.index("press")].params.raw
    probes = [
        (blender, 0),
        (blender, 1),
        (press, 0),
        (press, 2),
        (observation.calibration.raw, 0),
        (field.net.layers[0].weight, (3, 7)),
        (field.net.layers[-1].bias, 21),
    ]
    grads = torch.autograd.grad(loss(), [p for p, _ in probes])
    step = 1e-6
    for (param, index), grad in zip(probes, grads, strict=True):
        with torch.no_grad():
            param[index] += step
            up = float(loss())
            param[index] -= 2 * step
            down = float(loss())
            param[index] += step
        numeric = (up - down) / (2 * step)
        assert float(grad[index]) == pytest.approx(numeric, rel=tol("finite_difference"), abs=1e-10)
