"""Solvers: convergence order, ZOH exactness, agreement with torchdiffeq, status codes, errors."""

import math

import pytest
import torch
from tolerances import tol

from hybrid_twin import (
    ConfigError,
    HybridVectorField,
    ShapeError,
    SolverError,
    SolverStatus,
    build_solver,
    check_status,
    integrate_zoh,
    odeint_zoh,
)
from hybrid_twin.zoh import FIXED_GRID_METHODS


@pytest.fixture
def linear_case(linear_problem):
    field, exact = linear_problem
    x0 = torch.tensor([[1.0, -0.5, 0.3, 2.0]])
    # Four input steps of 0.5 s: the solver must restart at each one to keep its order.
    u = torch.tensor([[[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0], [0.0, 1.0]]])
    return field, x0, u, 0.5, exact(field.a.detach(), field.b.detach(), x0, u, 0.5)


def _observed_order(field, x0, u, dt_s, truth, method, substeps, **options) -> float:
    errors, steps = [], []
    for n in substeps:
        with torch.no_grad():
            states = integrate_zoh(
                field, x0, u, dt_s, method=method, n_substeps=n, **options
            ).states
        errors.append((states - truth).abs().max().item())
        steps.append(dt_s / n)
    log_h = torch.tensor([math.log2(h) for h in steps])
    log_e = torch.tensor([math.log2(e) for e in errors])
    centred = log_h - log_h.mean()
    return float((centred * (log_e - log_e.mean())).sum() / (centred**2).sum())


def test_rk4_global_error_is_fourth_order(linear_case):
    slope = _observed_order(*linear_case, method="rk4", substeps=[2, 4, 8, 16, 32, 64])
    assert abs(slope - 4.0) < 0.3, f"observed order {slope:.3f}"


def test_dopri5_global_error_is_fifth_order(linear_case):
    # Error control off: the fifth-order solution with equal steps (errors 2e-5 .. 1e-11).
    slope = _observed_order(
        *linear_case, method="dopri5", substeps=[4, 8, 16, 32, 64, 128], adaptive=False
    )
    assert abs(slope - 5.0) < 0.3, f"observed order {slope:.3f}"


def test_euler_global_error_is_first_order(linear_case):
    slope = _observed_order(*linear_case, method="euler", substeps=[16, 32, 64, 128, 256, 512])
    assert abs(slope - 1.0) < 0.3, f"observed order {slope:.3f}"


@pytest.fixture
def lag_case(float64, rng, linear_problem):
    """First-order lag dx/dt = (K u - x) / tau, K = 2, tau = 3 s, 20 random input steps of 5 s."""
    field_type = type(linear_problem[0])
    tau, gain, dt_s = 3.0, 2.0, 5.0
    field = field_type(torch.tensor([[-1.0 / tau]]), torch.tensor([[gain / tau]]))
    u = torch.rand(2, 20, 1, generator=rng) * 10.0
    x0 = torch.tensor([[0.0], [5.0]])
    decay = math.exp(-dt_s / tau)
    states, x = [x0], x0
    for k in range(u.shape[1]):
        x = gain * u[:, k] + (x - gain * u[:, k]) * decay  # closed form on each interval
        states.append(x)
    return field, x0, u, dt_s, torch.stack(states, dim=1)


def test_dopri5_matches_first_order_lag_closed_form_with_capped_steps(lag_case):
    field, x0, u, dt_s, truth = lag_case
    solution = integrate_zoh(
        field, x0, u, dt_s, method="dopri5", rtol=1e-8, atol=1e-10, max_steps=32
    )
    assert solution.status.tolist() == [SolverStatus.SUCCESS] * 2
    # Restarting at each input step, an interval of 5 s / tau = 3 s takes 15-17 steps at
    # rtol 1e-8 (seeds 0-4); hunting the step by rejection would take hundreds.
    assert int(solution.n_steps.max()) <= 20 * u.shape[1]
    # rtol 1e-8 per step on states up to 20, over 20 intervals: 1e-7 (measured 2.5e-8).
    torch.testing.assert_close(solution.states.detach(), truth, rtol=0.0, atol=1e-7)


@pytest.mark.parametrize("mode", ["intervals", "jump_t"])
def test_torchdiffeq_zoh_modes_match_first_order_lag_closed_form(lag_case, mode):
    field, x0, u, dt_s, truth = lag_case
    with torch.no_grad():
        states = odeint_zoh(
            field, x0, u[:, :8], dt_s, method="dopri5", mode=mode, rtol=1e-8, atol=1e-10
        )
    torch.testing.assert_close(states, truth[:, :9], rtol=0.0, atol=1e-7)  # as for our dopri5 above


@pytest.mark.parametrize("mode", ["intervals", "jump_t", "naive"])
def test_torchdiffeq_zoh_with_no_interval_returns_the_start(lag_case, mode):
    field, x0, u, dt_s, _ = lag_case
    states = odeint_zoh(field, x0, u[:, :0], dt_s, method="dopri5", mode=mode)
    assert torch.equal(states, x0.unsqueeze(1))


class _Counting(torch.nn.Module):
    def __init__(self, field):
        super().__init__()
        self.field, self.calls = field, 0
        self.n_states, self.n_inputs = field.n_states, field.n_inputs

    def forward(self, x, u):
        self.calls += 1
        return self.field(x, u)


def test_naive_torchdiffeq_hunts_every_input_step(lag_case):
    field, x0, u, dt_s, _ = lag_case
    counts = {}
    for mode in ("jump_t", "naive"):
        counting = _Counting(field)
        with torch.no_grad():
            odeint_zoh(counting, x0, u[:, :8], dt_s, method="dopri5", mode=mode)
        counts[mode] = counting.calls
    assert counts["naive"] > 3 * counts["jump_t"], counts


def test_own_dopri5_matches_torchdiffeq_dopri5_on_linear_problem(linear_case):
    field, x0, u, dt_s, truth = linear_case
    with torch.no_grad():
        ours = integrate_zoh(
            field, x0, u, dt_s, method="dopri5", rtol=1e-12, atol=1e-14, max_steps=200
        ).states
        theirs = odeint_zoh(field, x0, u, dt_s, method="dopri5", rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=tol("solver_vs_torchdiffeq"))
    torch.testing.assert_close(ours, truth, rtol=0.0, atol=tol("solver_vs_torchdiffeq"))


def test_own_dopri5_matches_torchdiffeq_dopri5_on_the_hybrid_line(
    cdc_flowsheet, random_hybrid, make_inputs, rng
):
    field = random_hybrid(cdc_flowsheet, hidden=(8,))
    u = make_inputs(cdc_flowsheet, 2, 4, rng)
    x0 = cdc_flowsheet.steady_state(u[:, 0], cdc_flowsheet.theta()).detach()
    with torch.no_grad():
        ours = integrate_zoh(
            field, x0, u, 5.0, method="dopri5", rtol=1e-10, atol=1e-10, max_steps=200
        ).states
        theirs = odeint_zoh(
            field, x0, u, 5.0, method="dopri5", mode="jump_t", rtol=1e-10, atol=1e-10
        )
    # States reach 400 (mg, rpm): both solvers hold rtol 1e-10 per step, so compare relatively.
    torch.testing.assert_close(
        ours, theirs, rtol=tol("solver_vs_torchdiffeq"), atol=tol("solver_vs_torchdiffeq")
    )


def test_rk4_matches_torchdiffeq_rk4_interval_by_interval_at_fine_steps(linear_case):
    field, x0, u, dt_s, _ = linear_case
    with torch.no_grad():
        ours = integrate_zoh(field, x0, u, dt_s, method="rk4", n_substeps=64).states
        # torchdiffeq's rk4 is the 3/8 rule: same order, different error constant.
        theirs = odeint_zoh(
            field, x0, u, dt_s, method="rk4", mode="jump_t", options={"step_size": dt_s / 64}
        )
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=1e-9)


class _CubicDecay(torch.nn.Module):
    """dx/dt = -k x^3: x(t) = x0 / sqrt(1 + 2 k x0^2 t), dx/dx0 = (1 + 2 k x0^2 t)^(-3/2).
    A whole-interval first trial from x0 = 10 overflows, so it is rejected."""

    n_states, n_inputs = 1, 1

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor([k], dtype=torch.float64))

    def theta(self):
        return self.k.view(1, 1)

    def rhs(self, x, u, theta):
        return -theta * x.pow(3)

    def forward(self, x, u):
        return self.rhs(x, u, self.theta())


def test_dopri5_gradient_is_finite_after_a_rejected_overflowing_trial():
    field, dt_s, k, x0_value = _CubicDecay(1.0), 10.0, 1.0, 10.0
    x0 = torch.tensor([[x0_value]], dtype=torch.float64, requires_grad=True)
    u = torch.zeros(1, 3, 1, dtype=torch.float64)
    solution = integrate_zoh(field, x0, u, dt_s, method="dopri5", max_steps=200)
    assert solution.status.tolist() == [SolverStatus.SUCCESS]
    (grad_x0,) = torch.autograd.grad(solution.states[0, -1, 0], x0)
    stretch = 1.0 + 2.0 * k * x0_value**2 * 3 * dt_s
    assert float(solution.states[0, -1, 0].detach()) == pytest.approx(x0_value / math.sqrt(stretch),
                                                             rel=1e-5)  # fmt: skip
    # measured: NaN before the fix; 2.1514e-06 against the exact 2.1511e-06 after it
    assert float(grad_x0) == pytest.approx(stretch**-1.5, rel=1e-3)


def test_adjoint_gradients_equal_direct_backprop(feeder_flowsheet, random_hybrid, rng):
    field = random_hybrid(feeder_flowsheet, hidden=(8,))
    u = torch.tensor([[[3.0], [4.0], [2.0]]])
    x0 = torch.tensor([[5.0, 2.5]])
    grads = []
    for adjoint in (False, True):
        field.zero_grad()
        states = odeint_zoh(
            field, x0, u, 5.0, method="dopri5", adjoint=adjoint, rtol=1e-10, atol=1e-12
        )
        states[:, -1].pow(2).sum().backward()
        grads.append(
            torch.cat([p.grad.flatten() for p in field.parameters() if p.grad is not None])
        )
    # Two numerical routes to the same gradient at rtol 1e-10: agreement to ~1e-7 relative.
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-9)


def test_the_fixed_grid_method_list_is_torchdiffeqs():
    from torchdiffeq._impl.odeint import SOLVERS
    from torchdiffeq._impl.solvers import FixedGridODESolver

    fixed = {name for name, solver in SOLVERS.items() if issubclass(solver, FixedGridODESolver)}
    assert set(FIXED_GRID_METHODS) == fixed


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2", "heun3", "rk4"])
def test_every_one_step_fixed_grid_method_sees_the_held_input_in_jump_t(lag_case, method):
    field, x0, u, dt_s, _ = lag_case
    step = {"step_size": dt_s / 4}
    with torch.no_grad():
        restarted = odeint_zoh(field, x0, u[:, :6], dt_s, method=method, options=step)
        one_call = odeint_zoh(field, x0, u[:, :6], dt_s, method=method, mode="jump_t", options=step)
    torch.testing.assert_close(one_call, restarted, rtol=0.0, atol=1e-12)


def test_a_multistep_method_in_jump_t_is_refused(lag_case):
    field, x0, u, dt_s, _ = lag_case
    with pytest.raises(ConfigError, match=r"fixed_adams is a multistep method.*'intervals'"):
        odeint_zoh(field, x0, u, dt_s, method="fixed_adams", mode="jump_t")


def test_a_step_size_that_does_not_divide_the_interval_is_not_exceeded(lag_case):
    field, x0, u, dt_s, _ = lag_case
    counting = _Counting(field)
    with torch.no_grad():  # dt / 1.4: two rk4 steps (4 evaluations each) per interval, not one
        odeint_zoh(counting, x0, u[:, :3], dt_s, method="rk4", mode="jump_t",
                   options={"step_size": dt_s / 1.4})  # fmt: skip
    assert counting.calls == 3 * 2 * 4


@pytest.mark.parametrize(("method", "mode"), [("rk4", "jump_t"), ("rk4", "naive"),
                                              ("dopri5", "intervals"), ("rk4", "intervals")])
def test_adjoint_gives_the_direct_gradients_to_x0_u_and_parameters(lag_case, method, mode):
    field, x0, u, dt_s, _ = lag_case
    # fine fixed steps: the adjoint ODE is solved backwards, not the forward steps differentiated
    options = {"step_size": dt_s / 64} if method == "rk4" else None
    grads = []
    for adjoint in (False, True):
        field.zero_grad()
        x0_, u_ = x0.clone().requires_grad_(True), u[:, :4].clone().requires_grad_(True)
        states = odeint_zoh(field, x0_, u_, dt_s, method=method, mode=mode, adjoint=adjoint,
                            rtol=1e-10, atol=1e-12, options=options)  # fmt: skip
        states[:, -1].pow(2).sum().backward()
        grads.append([x0_.grad, u_.grad, *(p.grad for p in field.parameters())])
    for direct, adjoint in zip(*grads, strict=True):
        # the adjoint ODE solved by the same method: agreement to its error, ~1e-7 relative
        torch.testing.assert_close(adjoint, direct, rtol=1e-6, atol=1e-9)


def test_max_steps_and_non_finite_become_status_codes(linear_problem):
    field_type = type(linear_problem[0])
    stiff = field_type(torch.tensor([[-1e4]]), torch.tensor([[1.0]]))
    u = torch.ones(1, 2, 1)
    solution = integrate_zoh(stiff, torch.ones(1, 1), u, 5.0, method="dopri5", max_steps=3)
    assert solution.status.tolist() == [SolverStatus.MAX_STEPS_REACHED]
    exploding = field_type(torch.tensor([[1e3]]), torch.tensor([[0.0]]))
    solution = integrate_zoh(exploding, torch.ones(1, 1), torch.zeros(1, 200, 1), 1.0, method="rk4")
    assert solution.status.tolist() == [SolverStatus.NON_FINITE]
    with pytest.raises(SolverError, match=r"1 trajectories failed \(rows 0\): NON_FINITE"):
        check_status(solution)


def test_unknown_solver_and_option_errors_list_the_valid_ones(linear_problem):
    field = linear_problem[0]
    with pytest.raises(ConfigError, match="unknown solver 'rk45'; valid: dopri5, euler, rk4"):
        build_solver(field, "rk45")
    with pytest.raises(ConfigError, match="unknown option 'substeps'; valid: n_substeps"):
        build_solver(field, {"name": "rk4", "substeps": 2})
    with pytest.raises(ConfigError, match="n_substeps: expected an integer >= 1, got 0"):
        build_solver(field, {"name": "rk4", "n_substeps": 0})
    # atol 0 would stall on a state that is exactly 0 (0/0 in the error norm)
    with pytest.raises(ConfigError, match="expected rtol > 0 and atol > 0, got rtol=1e-06, atol=0"):
        build_solver(field, {"name": "dopri5", "atol": 0.0})


def test_shape_errors_say_what_was_expected_and_what_arrived(linear_problem):
    field = linear_problem[0]
    with pytest.raises(ShapeError, match=r"x0: expected \(batch, 4\), got \(2, 3\)"):
        integrate_zoh(field, torch.zeros(2, 3), torch.zeros(2, 5, 2), 1.0)
    with pytest.raises(ShapeError, match=r"u: expected \(2, time, 2\), got \(2, 5, 3\)"):
        integrate_zoh(field, torch.zeros(2, 4), torch.zeros(2, 5, 3), 1.0)
    with pytest.raises(ConfigError, match="dt_s: expected > 0 s, got 0.0"):
        integrate_zoh(field, torch.zeros(2, 4), torch.zeros(2, 5, 2), 0.0)


def test_states_of_another_dtype_than_the_field_are_refused(cdc_flowsheet):
    field = HybridVectorField(cdc_flowsheet, {"kind": "mechanistic"}).to(torch.float32)
    x0 = torch.zeros(2, cdc_flowsheet.n_states, dtype=torch.float64)
    u = torch.zeros(2, 3, cdc_flowsheet.n_inputs, dtype=torch.float64)
    # it used to run in mixed precision (float32 parameters, float64 states), silently
    with pytest.raises(ShapeError, match=r"x0: dtype torch.float64 differs from the vector "
                                         r"field's parameters' torch.float32"):  # fmt: skip
        integrate_zoh(field, x0, u, 5.0)


@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5"])
def test_pinned_states_take_their_values_and_unpinned_ones_see_them(linear_case, method, float64):
    field, x0, u, dt_s, _ = linear_case
    solver = build_solver(field, {"name": method, "n_substeps": 4})
    with torch.no_grad():
        free = solver(x0, u, dt_s).states
        # Pinned to the free trajectory's own values, nothing changes (up to rounding).
        index = torch.tensor([1, 3])
        same = solver(x0, u, dt_s, index, free[:, 1:].index_select(2, index)).states
        assert torch.allclose(same, free, rtol=0, atol=1e-12)
        # Pinned elsewhere: those states read the values at every grid point after x0 ...
        values = torch.arange(8, dtype=x0.dtype).reshape(1, 4, 2)
        pinned = solver(x0, u, dt_s, index, values).states
    assert torch.equal(pinned[:, 1:].index_select(2, index), values)
    assert torch.equal(pinned[:, 0], x0)
    # ... and the coupled states follow them (field.a couples every state to every other).
    assert not torch.allclose(pinned[:, 2:, 0], free[:, 2:, 0])
