"""Fixtures for the hybrid_twin tests: analytic problems, the built-in line, small hybrids.

Everything numerical here is float64 (the `float64` fixture from tests/conftest.py) and seeded
through the `rng` fixture; helpers are returned by fixtures rather than imported.
"""

import pytest
import torch
from torch import Tensor, nn

from hybrid_twin import HybridVectorField, build_flowsheet, cdc_line_flowsheet_spec


class LinearField(nn.Module):
    """dx/dt = A x + B u with the vector-field interface (theta(), rhs()); analytic reference."""

    def __init__(self, a: Tensor, b: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())
        self.b = nn.Parameter(b.clone())
        self.n_states, self.n_inputs = a.shape[0], b.shape[1]

    @torch.jit.export
    def theta(self) -> Tensor:
        return torch.zeros(1, 0, dtype=self.a.dtype)

    @torch.jit.export
    def rhs(self, x: Tensor, u: Tensor, theta: Tensor) -> Tensor:
        return x @ self.a.T + u @ self.b.T

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        return self.rhs(x, u, self.theta())


def linear_zoh_exact(a: Tensor, b: Tensor, x0: Tensor, u: Tensor, dt_s: float) -> Tensor:
    """Exact states (batch, time + 1, n) of dx/dt = A x + B u under ZOH u, by matrix exponentials.

    Per interval: [x; u]' = [[A, B], [0, 0]] [x; u], so exp(dt M) maps (x_k, u_k) to x_(k+1).
    """
    n, m = a.shape[0], b.shape[1]
    big = torch.zeros(n + m, n + m, dtype=a.dtype)
    big[:n, :n], big[:n, n:] = a, b
    step = torch.linalg.matrix_exp(big * dt_s)[:n]
    states, x = [x0], x0
    for k in range(u.shape[1]):
        x = torch.cat([x, u[:, k]], dim=1) @ step.T
        states.append(x)
    return torch.stack(states, dim=1)


@pytest.fixture
def linear_problem(float64):
    """A fixed stable 4x4 A (eigenvalues about -1.0 +- 2.0i, -1.76, -1.23) and a 4x2 B."""
    a = torch.tensor(
        [
            [-1.0, 2.0, 0.0, 0.0],
            [-2.0, -1.0, 0.5, 0.0],
            [0.0, 0.0, -0.5, 1.0],
            [0.3, 0.0, -1.0, -2.5],
        ]
    )
    b = torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.2, 0.0], [0.0, 1.0]])
    return LinearField(a, b), linear_zoh_exact


@pytest.fixture
def cdc_flowsheet(float64):
    return build_flowsheet(cdc_line_flowsheet_spec())


@pytest.fixture
def cdc_fixed_label_claim_spec():
    """The built-in line with the press's `label_claim: fixed` (API %LC against 40 mg)."""
    spec = cdc_line_flowsheet_spec()
    press = spec["units"]["press"]
    for key in ("label_claim", "nominal_feed_sp_kg_h", "feed_sp_range_kg_h"):
        press.pop(key)
    spec["inputs"] = {
        tag: target[0] if isinstance(target, list) else target
        for tag, target in spec["inputs"].items()
    }
    return spec


@pytest.fixture
def make_inputs():
    """u (batch, steps, n_inputs): nominal inputs times (1 + rel * N(0, 1)), new draw every step."""

    def make(
        flowsheet, batch: int, steps: int, generator: torch.Generator, rel: float = 0.1
    ) -> Tensor:
        nominal = flowsheet.nominal_inputs().to(torch.get_default_dtype())
        noise = torch.randn(batch, steps, flowsheet.n_inputs, generator=generator)
        return nominal.unsqueeze(1) * (1.0 + rel * noise).clamp_min(0.0)

    return make


@pytest.fixture
def random_hybrid(rng):
    """A hybrid of the given flowsheet whose residual is non-zero (last layer not zeroed)."""

    def make(
        flowsheet, hidden=(16, 16), kind: str = "hybrid", closure=(), bound: float = 1.0
    ) -> HybridVectorField:
        config = {
            "kind": kind,
            "closure": list(closure),
            "residual": {"hidden": list(hidden), "zero_init": False, "bound": bound},
        }
        return HybridVectorField(flowsheet, config, generator=rng)

    return make


@pytest.fixture
def feeder_flowsheet(float64):
    """One feeder, two states (hopper, feed rate): the small problem for gradient checks."""
    spec = {
        "components": ["api"],
        "units": {
            "feeder": {
                "type": "liw_feeder",
                "component": "api",
                "nominal_flow_kg_h": 3.0,
                "flow_range_kg_h": [0.0, 10.0],
                "hopper_nominal_kg": 5.0,
                "params": {"starve_mass_kg": 0.1},
            }
        },
        "streams": [],
    }
    return build_flowsheet(spec)
