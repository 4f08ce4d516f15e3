"""ExtendedKalmanFilter: exact on linear Gaussian systems, masked tags, pins, scripting."""

import copy
import io

import pytest
import torch
from tolerances import tol
from torch import Tensor, nn

from hybrid_twin import (
    ConfigError,
    ExtendedKalmanFilter,
    ObservationModel,
    ShapeError,
    ZOHSolution,
    build_solver,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.(save|load)` is deprecated:DeprecationWarning"
)

# Central differences of a linear map have no truncation error, only rounding: about
# eps |Phi| / h ~ 2e-16 / 6e-6 ~ 4e-11 per entry; 1e-9 leaves a margin of 25.
FD_LINEAR = 1e-9
# The filter through 40 steps with that Jacobian, against the closed-form Kalman filter.
FILTER_LINEAR = 1e-8


class ExactLinearSolver(nn.Module):
    """The exact ZOH step of dx/dt = A x + B u (matrix exponential), with the solver signature."""

    def __init__(self, vector_field: nn.Module) -> None:
        super().__init__()
        self.vector_field = vector_field

    def forward(
        self,
        x0: Tensor,
        u: Tensor,
        dt_s: float,
        pin_index: Tensor | None = None,
        pin_values: Tensor | None = None,
    ) -> ZOHSolution:
        a, b = self.vector_field.a, self.vector_field.b
        n, m = a.shape[0], b.shape[1]
        big = torch.zeros(n + m, n + m, dtype=a.dtype)
        big[:n, :n] = a
        big[:n, n:] = b
        step = torch.linalg.matrix_exp(big * dt_s)[:n]
        states = [x0]
        x = x0
        for k in range(u.shape[1]):
            x = torch.cat([x, u[:, k]], dim=1) @ step.T
            if pin_index is not None and pin_values is not None:
                x = x.index_copy(1, pin_index, pin_values[:, k])
            states.append(x)
        status = torch.zeros(x0.shape[0], dtype=torch.long)
        return ZOHSolution(torch.stack(states, dim=1), status, status)


class LinearObservation(nn.Module):
    """y = C x + d for states (..., n)."""

    def __init__(self, c: Tensor, d: Tensor) -> None:
        super().__init__()
        self.register_buffer("c", c.clone())
        self.register_buffer("d", d.clone())

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.c.T + self.d


@pytest.fixture
def linear_setup(linear_problem):
    """4 states, 2 inputs, 3 tags; dt 0.2 s; exact one-interval map."""
    field, _ = linear_problem
    for p in field.parameters():
        p.requires_grad_(False)
    c = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 1.0, 0.0], [0.2, 0.0, 0.0, 1.0]])
    d = torch.tensor([0.1, -0.2, 0.3])
    q = torch.tensor([1e-3, 2e-3, 5e-4, 1e-3])
    r = torch.tensor([0.01, 0.04, 0.02])
    dt_s = 0.2
    ekf = ExtendedKalmanFilter(ExactLinearSolver(field), LinearObservation(c, d), dt_s, q, r)
    n, m = field.a.shape[0], field.b.shape[1]
    big = torch.zeros(n + m, n + m)
    big[:n, :n], big[:n, n:] = field.a, field.b
    step = torch.linalg.matrix_exp(big * dt_s)[:n]
    return {
        "ekf": ekf,
        "field": field,
        "c": c,
        "d": d,
        "q": q,
        "r": r,
        "dt_s": dt_s,
        "a_d": step[:, :n],
        "b_d": step[:, n:],
    }


def _kalman_reference(s, x, P, u, y, mask):
    """The textbook discrete Kalman filter, one line at a time, with only the sampled rows."""
    x_pred = s["a_d"] @ x + s["b_d"] @ u
    P_pred = s["a_d"] @ P @ s["a_d"].T + torch.diag(s["q"])
    rows = torch.nonzero(mask).flatten()
    if rows.numel() == 0:
        return x_pred, P_pred
    c, d, r = s["c"][rows], s["d"][rows], s["r"][rows]
    S = c @ P_pred @ c.T + torch.diag(r)
    K = P_pred @ c.T @ torch.linalg.inv(S)
    x_new = x_pred + K @ (y[rows] - c @ x_pred - d)
    P_new = (torch.eye(x.shape[0]) - K @ c) @ P_pred
    return x_new, 0.5 * (P_new + P_new.T)


def _random_run(rng, batch: int, steps: int, n_in: int, n_tags: int):
    u = torch.randn(batch, steps, n_in, generator=rng)
    y = torch.randn(batch, steps, n_tags, generator=rng)
    mask = torch.rand(batch, steps, n_tags, generator=rng) < 0.6
    y = torch.where(mask, y, torch.full_like(y, float("nan")))  # unsampled: NaN, as in data
    return u, y, mask


def test_jacobian_of_exact_linear_step_equals_matrix_exponential(linear_setup, rng):
    ekf, s = linear_setup["ekf"], linear_setup
    x = 3.0 * torch.randn(5, 4, generator=rng)
    u = torch.randn(5, 2, generator=rng)
    x_next, F, status = ekf.transition_jacobian(x, u)
    torch.testing.assert_close(F, s["a_d"].expand(5, 4, 4), rtol=0.0, atol=FD_LINEAR)
    torch.testing.assert_close(
        x_next, x @ s["a_d"].T + u @ s["b_d"].T, rtol=0.0, atol=tol("algebra")
    )
    assert status.tolist() == [0] * 5
    y, H = ekf.observation_jacobian(x_next)
    torch.testing.assert_close(H, s["c"].expand(5, 3, 4), rtol=0.0, atol=FD_LINEAR)
    torch.testing.assert_close(y, x_next @ s["c"].T + s["d"], rtol=0.0, atol=tol("algebra"))


def test_jacobian_of_rk4_interval_equals_its_stability_polynomial(linear_problem, rng):
    # Two RK4 steps of h on x' = A x map x to R(hA)^2 x with R(Z) = I + Z + Z^2/2 + Z^3/6 + Z^4/24.
    field, _ = linear_problem
    dt_s, n_sub = 0.3, 2
    observation = LinearObservation(torch.eye(4), torch.zeros(4))
    ekf = ExtendedKalmanFilter(
        build_solver(field, {"name": "rk4", "n_substeps": n_sub}),
        observation,
        dt_s,
        torch.zeros(4),
        torch.ones(4),
    )
    z = field.a.detach() * (dt_s / n_sub)
    eye = torch.eye(4)
    stage = eye + z + z @ z / 2 + z @ z @ z / 6 + z @ z @ z @ z / 24
    x = torch.randn(3, 4, generator=rng)
    with torch.no_grad():
        _, F, _ = ekf.transition_jacobian(x, torch.randn(3, 2, generator=rng))
    torch.testing.assert_close(F, (stage @ stage).expand(3, 4, 4), rtol=0.0, atol=FD_LINEAR)


@pytest.mark.parametrize("fd_scheme", ["central", "forward"])
def test_float32_difference_quotients_divide_by_the_steps_actually_taken(linear_problem, fd_scheme):
    # x + h rounds where |x| is large; for maps whose differences are exact (x' = 0, y = x)
    # both Jacobians are exactly I when a quotient divides by the step taken (by the step
    # intended they were off by ~eps |x| / h: up to 9e-5 here).
    field = copy.deepcopy(linear_problem[0]).float()
    with torch.no_grad():
        field.a.zero_(), field.b.zero_()
    ekf = ExtendedKalmanFilter(
        build_solver(field, "rk4"),
        LinearObservation(torch.eye(4), torch.zeros(4)),
        0.3,
        torch.zeros(4),
        torch.ones(4),
        fd_scheme=fd_scheme,
    ).float()
    x = torch.tensor([[1000.37, -2047.11, 3.3, 65000.9]], dtype=torch.float32)
    eye = torch.eye(4, dtype=torch.float32).unsqueeze(0)
    with torch.no_grad():
        _, F, _ = ekf.transition_jacobian(x, torch.zeros(1, 2, dtype=torch.float32))
        _, H = ekf.observation_jacobian(x)
    torch.testing.assert_close(F, eye, rtol=0.0, atol=0.0)
    torch.testing.assert_close(H, eye, rtol=0.0, atol=0.0)


def test_the_filter_takes_the_models_dtype_not_torchs_default(linear_problem, float64):
    field = copy.deepcopy(linear_problem[0]).float()  # a float32 model, the default float64
    ekf = ExtendedKalmanFilter(build_solver(field, "rk4"),
                               LinearObservation(torch.eye(4)[:2], torch.zeros(2)).float(),
                               0.2, torch.full((4,), 1e-4), torch.full((2,), 1e-2))  # fmt: skip
    assert {ekf.q.dtype, ekf.r.dtype, ekf.state_scale.dtype, ekf.state_floor.dtype} == {
        torch.float32
    }
    x, P = torch.zeros(1, 4, dtype=torch.float32), torch.eye(4, dtype=torch.float32)[None]
    u, y = torch.ones(1, 2, dtype=torch.float32), torch.ones(1, 2, dtype=torch.float32)
    with torch.no_grad():
        for _ in range(2):  # it failed in the solver: "expected m1 and m2 to have the same dtype"
            step = ekf(x, P, u, y, torch.ones(1, 2, dtype=torch.bool))
            x, P = step.x, step.P
    assert x.dtype == P.dtype == torch.float32 and torch.isfinite(P).all()


def test_jacobians_on_the_cdc_line_match_autograd(cdc_flowsheet, random_hybrid, make_inputs, rng):
    field = random_hybrid(cdc_flowsheet)
    solver = build_solver(field, "rk4")
    observation = ObservationModel(cdc_flowsheet)
    scale = field.state_normaliser.std.clone()  # the scale the network sees states on
    n_tags = observation.n_tags
    ekf = ExtendedKalmanFilter(
        solver, observation, 5.0, torch.zeros(scale.shape[0]), torch.ones(n_tags), scale
    )
    u = make_inputs(cdc_flowsheet, 2, 1, rng)[:, 0]
    x = cdc_flowsheet.steady_state(u, cdc_flowsheet.theta()).detach()
    x = x * (1.0 + 0.05 * torch.randn(x.shape, generator=rng))
    with torch.no_grad():
        x_next, F, status = ekf.transition_jacobian(x, u)
        y, H = ekf.observation_jacobian(x)
    assert status.tolist() == [0, 0]
    for row in range(2):
        exact_f = torch.autograd.functional.jacobian(
            lambda v, row=row: solver(v.unsqueeze(0), u[row : row + 1, None], 5.0).states[0, -1],
            x[row],
        )
        exact_h = torch.autograd.functional.jacobian(
            lambda v: observation(v.unsqueeze(0))[0], x[row]
        )
        # Dimensionless: change of output i (in its scale) per change of state j (in its scale).
        # Measured: ~5e-11 (eps^(2/3)); the project's finite-difference tolerance is 1e-5.
        fd = tol("finite_difference")
        y_scale = y[row].abs().clamp_min(1.0).unsqueeze(1)
        torch.testing.assert_close(
            F[row] * scale / scale.unsqueeze(1),
            exact_f * scale / scale.unsqueeze(1),
            rtol=fd,
            atol=fd,
        )
        torch.testing.assert_close(
            H[row] * scale / y_scale, exact_h * scale / y_scale, rtol=fd, atol=fd
        )


def test_forward_difference_jacobian_on_the_cdc_line_matches_autograd_and_central(
    cdc_flowsheet, random_hybrid, make_inputs, rng
):
    """fd_scheme="forward" (n + 1 solver rows, for latency): F within 1e-6 of autograd in
    float64 (scaled as above; sqrt(eps) theory ~1.5e-8), and one filter step within 1e-6
    of the central-difference reference (states in state_scale, P in scale_i scale_j)."""
    field = random_hybrid(cdc_flowsheet)
    solver = build_solver(field, "rk4")
    observation = ObservationModel(cdc_flowsheet)
    scale = field.state_normaliser.std.clone()
    n, n_tags = scale.shape[0], observation.n_tags
    q, r = (1e-3 * scale) ** 2, torch.full((n_tags,), 1e-2)
    central = ExtendedKalmanFilter(solver, observation, 5.0, q, r, scale)
    forward = ExtendedKalmanFilter(solver, observation, 5.0, q, r, scale, fd_scheme="forward")
    u = make_inputs(cdc_flowsheet, 2, 1, rng)[:, 0]
    x = cdc_flowsheet.steady_state(u, cdc_flowsheet.theta()).detach()
    x = x * (1.0 + 0.05 * torch.randn(x.shape, generator=rng))
    with torch.no_grad():
        x_c, F_c, _ = central.transition_jacobian(x, u)
        x_f, F_f, status = forward.transition_jacobian(x, u)
    assert status.tolist() == [0, 0]
    # The unperturbed row: the same solver on another batch size (last bits may differ).
    torch.testing.assert_close(x_f, x_c, rtol=1e-12, atol=0.0)
    ratio = scale / scale.unsqueeze(1)
    for row in range(2):
        exact_f = torch.autograd.functional.jacobian(
            lambda v, row=row: solver(v.unsqueeze(0), u[row : row + 1, None], 5.0).states[0, -1],
            x[row],
        )
        torch.testing.assert_close(F_f[row] * ratio, exact_f * ratio, rtol=1e-6, atol=1e-6)
    P = torch.diag_embed((0.1 * scale).expand(2, n)) ** 2
    with torch.no_grad():
        y = observation(torch.maximum(x_c, central.state_floor)) * 1.01
        mask = torch.ones(2, n_tags, dtype=torch.bool)
        ref = central(x, P, u, y, mask)
        got = forward(x, P, u, y, mask)
    torch.testing.assert_close(got.x / scale, ref.x / scale, rtol=0.0, atol=1e-6)
    pscale = scale.unsqueeze(1) * scale
    torch.testing.assert_close(got.P / pscale, ref.P / pscale, rtol=0.0, atol=1e-6)


def test_filter_on_linear_gaussian_system_equals_exact_kalman_filter(linear_setup, rng):
    ekf, s = linear_setup["ekf"], linear_setup
    batch, steps = 2, 40
    u, y, mask = _random_run(rng, batch, steps, 2, 3)
    x = torch.randn(batch, 4, generator=rng)
    P = torch.diag(torch.tensor([1.0, 0.5, 2.0, 0.3])).expand(batch, 4, 4).clone()
    reference = [(x[i], P[i]) for i in range(batch)]
    for k in range(steps):
        x, P, innovation, innovation_var, y_pred = ekf(x, P, u[:, k], y[:, k], mask[:, k])[:5]
        reference = [
            _kalman_reference(s, xr, Pr, u[i, k], y[i, k], mask[i, k])
            for i, (xr, Pr) in enumerate(reference)
        ]
        for i, (xr, Pr) in enumerate(reference):
            torch.testing.assert_close(x[i], xr, rtol=0.0, atol=FILTER_LINEAR)
            torch.testing.assert_close(P[i], Pr, rtol=0.0, atol=FILTER_LINEAR)
        assert bool(torch.all(innovation[~mask[:, k]] == 0.0))
        assert bool(torch.all(innovation_var > s["r"]))


def test_masked_update_equals_update_with_only_the_sampled_rows(linear_setup, rng):
    ekf, s = linear_setup["ekf"], linear_setup
    x_pred = torch.randn(1, 4, generator=rng)
    A = torch.randn(4, 4, generator=rng)
    P_pred = (A @ A.T + 0.1 * torch.eye(4)).unsqueeze(0)
    y = torch.randn(1, 3, generator=rng)
    mask = torch.tensor([[True, False, True]])
    x, P, innovation, innovation_var, _ = ekf.update(x_pred, P_pred, y, mask)
    rows = torch.tensor([0, 2])
    sub = ExtendedKalmanFilter(
        ekf.solver, LinearObservation(s["c"][rows], s["d"][rows]), s["dt_s"], s["q"], s["r"][rows]
    )
    x_sub, P_sub, innovation_sub, var_sub, _ = sub.update(
        x_pred, P_pred, y[:, rows], torch.ones(1, 2, dtype=torch.bool)
    )
    torch.testing.assert_close(x, x_sub, rtol=0.0, atol=tol("algebra"))
    torch.testing.assert_close(P, P_sub, rtol=0.0, atol=tol("algebra"))
    torch.testing.assert_close(innovation[:, rows], innovation_sub, rtol=0.0, atol=0.0)
    torch.testing.assert_close(innovation_var[:, rows], var_sub, rtol=0.0, atol=tol("algebra"))


def test_masked_measurement_changes_neither_state_nor_covariance(linear_setup, rng):
    ekf = linear_setup["ekf"]
    x_pred = torch.randn(1, 4, generator=rng)
    P_pred = torch.diag(torch.tensor([1.0, 0.5, 2.0, 0.3])).unsqueeze(0)
    y = torch.randn(1, 3, generator=rng)
    mask = torch.tensor([[True, False, True]])
    base = ekf.update(x_pred, P_pred, y, mask)
    for wild in (1e6, float("nan"), float("inf")):
        changed = y.clone()
        changed[0, 1] = wild
        other = ekf.update(x_pred, P_pred, changed, mask)
        torch.testing.assert_close(other[0], base[0], rtol=0.0, atol=0.0)
        torch.testing.assert_close(other[1], base[1], rtol=0.0, atol=0.0)
    # A NaN reading of a tag marked sampled counts as not sampled.
    nan_sampled = y.clone()
    nan_sampled[0, 1] = float("nan")
    other = ekf.update(x_pred, P_pred, nan_sampled, torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(other[0], base[0], rtol=0.0, atol=0.0)


def test_all_masked_step_equals_predict_only(linear_setup, rng):
    ekf = linear_setup["ekf"]
    x = torch.randn(2, 4, generator=rng)
    P = torch.diag(torch.tensor([1.0, 0.5, 2.0, 0.3])).expand(2, 4, 4).clone()
    u = torch.randn(2, 2, generator=rng)
    x_pred, P_pred, _ = ekf.predict(x, P, u)
    step = ekf(x, P, u, torch.randn(2, 3, generator=rng), torch.zeros(2, 3, dtype=torch.bool))
    torch.testing.assert_close(step.x, x_pred, rtol=0.0, atol=0.0)
    torch.testing.assert_close(step.P, P_pred, rtol=0.0, atol=0.0)
    assert bool(torch.all(step.innovation == 0.0))


def test_covariance_stays_symmetric_positive_definite(linear_setup, rng):
    # Tiny r against a large prior: here the short form (I - K H) P, even symmetrised, reaches an
    # eigenvalue of -2e-3 within 60 steps (seed 0); the Joseph form stays above q.
    s = linear_setup
    ekf = ExtendedKalmanFilter(
        s["ekf"].solver,
        s["ekf"].observation,
        s["dt_s"],
        torch.full((4,), 1e-10),
        torch.full((3,), 1e-9),
    )
    u, y, mask = _random_run(rng, 3, 60, 2, 3)
    x = torch.zeros(3, 4)
    P = 1e4 * torch.eye(4).expand(3, 4, 4).clone()
    for k in range(u.shape[1]):
        x, P = ekf(x, P, u[:, k], y[:, k], mask[:, k])[:2]
        assert bool(torch.all(P == P.transpose(1, 2)))
        assert float(torch.linalg.eigvalsh(P).min()) > 0.0


def test_pinned_states_take_measured_values_and_stay_out_of_the_update(linear_setup, rng):
    ekf = linear_setup["ekf"]
    x = torch.randn(2, 4, generator=rng)
    P = torch.diag(torch.tensor([1.0, 0.5, 2.0, 0.3])).expand(2, 4, 4).clone()
    u = torch.randn(2, 2, generator=rng)
    pin_index = torch.tensor([0, 3])
    pin_values = torch.tensor([[1.5, -0.5], [2.0, 0.25]])
    x_pred, P_pred, status = ekf.predict(x, P, u, pin_index, pin_values)
    torch.testing.assert_close(x_pred[:, pin_index], pin_values, rtol=0.0, atol=0.0)
    assert bool(torch.all(P_pred[:, pin_index] == 0.0))
    assert bool(torch.all(P_pred[:, :, pin_index] == 0.0))
    assert float(torch.linalg.eigvalsh(P_pred[:, 1:3, 1:3]).min()) > 0.0
    x_new, P_new = ekf.update(
        x_pred, P_pred, torch.randn(2, 3, generator=rng), torch.ones(2, 3, dtype=torch.bool)
    )[:2]
    torch.testing.assert_close(x_new[:, pin_index], pin_values, rtol=0.0, atol=0.0)
    assert bool(torch.all(P_new[:, pin_index] == 0.0))
    # The free states are filtered as if the pinned ones were known exactly.
    assert not torch.equal(x_new[:, 1:3], x_pred[:, 1:3])


def test_lines_in_a_batch_are_independent(linear_setup, rng):
    ekf = linear_setup["ekf"]
    u, y, mask = _random_run(rng, 2, 10, 2, 3)
    x = torch.randn(2, 4, generator=rng)
    P = torch.eye(4).expand(2, 4, 4).clone()
    singles = [(x[i : i + 1], P[i : i + 1]) for i in range(2)]
    for k in range(u.shape[1]):
        x, P = ekf(x, P, u[:, k], y[:, k], mask[:, k])[:2]
        singles = [
            ekf(xi, Pi, u[i : i + 1, k], y[i : i + 1, k], mask[i : i + 1, k])[:2]
            for i, (xi, Pi) in enumerate(singles)
        ]
    for i, (xi, Pi) in enumerate(singles):
        torch.testing.assert_close(xi[0], x[i], rtol=0.0, atol=tol("algebra"))
        torch.testing.assert_close(Pi[0], P[i], rtol=0.0, atol=tol("algebra"))


def _script_and_reload(module: nn.Module) -> torch.jit.ScriptModule:
    # In memory: concurrent pytest sessions of one user prune each other's tmp_path roots.
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def test_scripted_filter_on_the_cdc_hybrid_reloaded_matches_eager(
    cdc_flowsheet, random_hybrid, make_inputs, rng
):
    field = random_hybrid(cdc_flowsheet)
    observation = ObservationModel(cdc_flowsheet)
    scale = field.state_normaliser.std.clone()  # the scale the network sees states on
    ekf = ExtendedKalmanFilter(
        build_solver(field, "rk4"),
        observation,
        5.0,
        (1e-3 * scale) ** 2,
        torch.full((observation.n_tags,), 0.01),
        scale,
        state_floor=1e-6 * scale,
    )
    u = make_inputs(cdc_flowsheet, 2, 3, rng)
    x = cdc_flowsheet.steady_state(u[:, 0], cdc_flowsheet.theta()).detach()
    P = torch.diag_embed((0.01 * scale).pow(2).expand(2, -1))
    with torch.no_grad():
        y = observation(x) * (1.0 + 0.01 * torch.randn(2, observation.n_tags, generator=rng))
    mask = torch.rand(2, observation.n_tags, generator=rng) < 0.7
    pins = (torch.tensor([0, 2]), x[:, [0, 2]] * 0.9)
    scripted = _script_and_reload(ekf)
    with torch.no_grad():
        eager_step = ekf(x, P, u[:, 0], y, mask, *pins)
        scripted_step = scripted(x, P, u[:, 0], y, mask, *pins)
    for eager_value, scripted_value in zip(eager_step, scripted_step, strict=True):
        torch.testing.assert_close(
            scripted_value, eager_value, rtol=tol("scripted_vs_eager"), atol=tol("algebra")
        )
    assert eager_step.status.tolist() == [0, 0]


def test_scripted_linear_filter_matches_eager(linear_setup, rng):
    ekf = linear_setup["ekf"]
    scripted = _script_and_reload(ekf)
    u, y, mask = _random_run(rng, 2, 5, 2, 3)
    x = torch.randn(2, 4, generator=rng)
    P = torch.eye(4).expand(2, 4, 4).clone()
    xs, Ps = x, P
    for k in range(u.shape[1]):
        x, P = ekf(x, P, u[:, k], y[:, k], mask[:, k])[:2]
        xs, Ps = scripted(xs, Ps, u[:, k], y[:, k], mask[:, k])[:2]
    torch.testing.assert_close(xs, x, rtol=0.0, atol=tol("scripted_vs_eager"))
    torch.testing.assert_close(Ps, P, rtol=0.0, atol=tol("scripted_vs_eager"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"q": torch.ones(4, 1)}, ShapeError, "expected q"),
        ({"q": torch.tensor([1.0, -1.0, 1.0, 1.0])}, ConfigError, "q: expected finite >= 0"),
        ({"r": torch.tensor([0.1, 0.0, 0.1])}, ConfigError, "r: expected finite > 0"),
        ({"dt_s": 0.0}, ConfigError, "dt_s"),
        ({"state_scale": torch.ones(3)}, ShapeError, "state_scale: expected \\(4,\\)"),
        ({"state_scale": torch.zeros(4)}, ConfigError, "state_scale: expected finite > 0"),
        ({"fd_rel_step": 2.0}, ConfigError, "fd_rel_step"),
        ({"fd_scheme": "backward"}, ConfigError, "fd_scheme"),
    ],
)
def test_constructor_refuses_bad_arguments(linear_setup, kwargs, error, match):
    s = linear_setup
    arguments = {"dt_s": s["dt_s"], "q": s["q"], "r": s["r"], **kwargs}
    with pytest.raises(error, match=match):
        ExtendedKalmanFilter(s["ekf"].solver, s["ekf"].observation, **arguments)
