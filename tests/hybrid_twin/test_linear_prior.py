"""The learned linear state-space prior: a chain of lags at first, exact as a linear system."""

import pytest
import torch
from tolerances import tol

from hybrid_twin import FLOWSHEETS, UNITS, ConfigError, build_flowsheet, integrate_zoh


def test_steady_state_is_an_equilibrium_and_reads_the_initial_unit_gain(float64):
    flowsheet = build_flowsheet(FLOWSHEETS["cascaded_tanks_linear"]())
    theta = flowsheet.theta()
    u = torch.tensor([[1.8], [2.8], [4.3]])
    x = flowsheet.steady_state(u, theta)
    torch.testing.assert_close(
        flowsheet.rhs(x, u, theta), torch.zeros_like(x), rtol=0.0, atol=tol("algebra")
    )
    # Gain: output scale 2.2 V per input half-range 5 V, around the nominal 5.6 V at 2.8 V.
    expected = 5.6 + 2.2 / 5.0 * (u - 2.8)
    torch.testing.assert_close(flowsheet.outputs(x, theta), expected, rtol=0.0, atol=tol("algebra"))


def test_step_response_matches_the_closed_form_of_two_lags(float64):
    flowsheet = build_flowsheet(FLOWSHEETS["cascaded_tanks_linear"]())
    theta = flowsheet.theta()
    x0 = flowsheet.steady_state(torch.tensor([[2.8]]), theta)
    u = torch.full((1, 200, 1), 3.8)
    solution = integrate_zoh(flowsheet, x0, u, 1.0, "rk4", n_substeps=4)
    t = torch.arange(201, dtype=torch.float64) / 100.0  # t / tau
    step = 2.2 / 5.0 * (1.0 - torch.exp(-t) * (1.0 + t))  # two equal lags, unit step
    y = flowsheet.outputs(solution.states[0], theta)[:, 0] - 5.6
    torch.testing.assert_close(y, step, rtol=0.0, atol=1e-7)  # RK4 at h = tau / 400


def test_scripted_linear_prior_matches_eager(float64):
    flowsheet = build_flowsheet(FLOWSHEETS["cascaded_tanks_linear"]())
    scripted = torch.jit.script(flowsheet)
    x, u = torch.tensor([[0.3, -0.2]]), torch.tensor([[3.1]])
    theta = flowsheet.theta()
    torch.testing.assert_close(
        scripted.rhs(x, u, theta),
        flowsheet.rhs(x, u, theta),
        rtol=0.0,
        atol=tol("scripted_vs_eager"),
    )
    torch.testing.assert_close(
        scripted.steady_state(u, theta),
        flowsheet.steady_state(u, theta),
        rtol=0.0,
        atol=tol("scripted_vs_eager"),
    )


def test_linear_prior_without_outputs_names_the_key():
    spec = FLOWSHEETS["cascaded_tanks_linear"]()
    spec["units"]["linear"]["outputs"] = {}
    with pytest.raises(ConfigError, match="linear.outputs: expected at least one"):
        build_flowsheet(spec)


def test_each_output_starts_with_its_own_scale_as_gain(float64):
    unit = UNITS["linear_state_space"](
        "linear",
        ["water"],
        inputs={"pump_v": {"unit": "V", "nominal": 2.8, "range": [0.0, 10.0]}},
        outputs={
            "level_v": {"unit": "V", "nominal": 5.6, "scale": 2.2},
            "flow_l_min": {"unit": "l/min", "nominal": 1.0, "scale": 22.0},
        },
    )
    theta = unit.theta()
    half_range_up = torch.tensor([[2.8 + 5.0]])  # one input scale above nominal
    x, _ = unit.steady_state(half_range_up, torch.zeros(1, 1), theta)
    torch.testing.assert_close(
        unit.outputs(x, theta), torch.tensor([[5.6 + 2.2, 1.0 + 22.0]]), rtol=0.0, atol=1e-9
    )


def test_the_state_matrix_stays_stable_for_any_parameters(float64):
    # A entered entry by entry took an unstable mode in one epoch of the Cascaded Tanks
    # experiment (loss 1e9, then inf); as S - S^T - L L^T - eps I it cannot
    unit = UNITS["linear_state_space"](
        "linear", ["water"], n_states=4, time_constant_s=50.0,
        inputs={"pump_v": {"unit": "V", "nominal": 2.8, "range": [0.0, 10.0]}},
        outputs={"level_v": {"unit": "V", "nominal": 5.6, "scale": 2.2}},
    )  # fmt: skip
    chain = (torch.diag(torch.ones(3), -1) - torch.eye(4)).double() / 50.0
    torch.testing.assert_close(unit.state_matrix(unit.theta())[0], chain, rtol=0.0, atol=1e-15)
    generator = torch.Generator().manual_seed(0)
    n_matrix = 16  # s and l entries come first
    for _ in range(200):
        theta = [t.detach().clone() for t in unit.theta()]
        for k in range(n_matrix):
            theta[k] = 10.0 * torch.randn(1, 1, generator=generator, dtype=torch.float64)
        eigenvalues = torch.linalg.eigvals(unit.state_matrix(theta)[0])
        assert float(eigenvalues.real.max()) < 0.0


def test_weights_of_the_entry_by_entry_a_are_refused_not_misread(float64):
    # a_i_j and s_i_j + l_i_j are both n^2 values: old weights loaded as S and L without a
    # word and made an oscillating A out of a chain of lags
    flowsheet = build_flowsheet(FLOWSHEETS["cascaded_tanks_linear"]())
    state = {k: v for k, v in flowsheet.state_dict().items() if not k.endswith(("skew_at",
                                                                                "factor_at"))}
    with pytest.raises(ConfigError, match=r"learnt entry by entry \(a_i_j\).*train the run"):
        flowsheet.load_state_dict(state, strict=False)
    flowsheet.load_state_dict(flowsheet.state_dict())  # its own weights load
