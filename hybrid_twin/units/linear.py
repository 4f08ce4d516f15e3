"""A learned linear state-space prior: for a plant with no mechanistic model worth writing yet.

    dx/dt = A x + B (u - u_nom)          y = C x + d
    A = S - S^T - L L^T - eps I          (stable by construction)

x is n abstract states (deviations from the nominal operating point), u the unit's inputs, y
its outputs; B, C, d are learnable parameters (`b_i_j`, `c_k_i`, `d_k`, 1-based), and so is
A, through S (strictly lower triangular, `s_i_j`, i > j) and L (lower triangular, `l_i_j`,
i >= j). x^T A x = -|L^T x|^2 - eps |x|^2 < 0 for every x != 0, so every eigenvalue of A has
a negative real part whatever the optimiser does: A entered directly, one epoch at the Cascaded
Tanks experiment's learning rate gave A an unstable mode and a loss of 1e9, then inf. eps I
(eps = 1e-3 / tau, less where the chain's damping is smaller) keeps A invertible, so the steady
state -A^-1 B (u - u_nom) always exists.

The initial model is a chain of n first-order lags of time constant tau with unit gain from
each input's scale to each output's scale: dx_1/dt = (b(u - u_nom) - x_1)/tau,
dx_i/dt = (x_(i-1) - x_i)/tau, y = d + x_n (S and L start where A is exactly that chain), so
an untrained prior already responds with the right sign and order of magnitude, and the
mechanistic kind of the twin becomes a linear system-identification fit (the benchmarks'
"best linear approximation"). A hybrid on it adds the neural residual to a linear model.
"""

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hybrid_twin.errors import ConfigError
from hybrid_twin.specs import InputSpec, OutputSpec, ParamSpec, StateSpec
from hybrid_twin.units.base import AbstractUnit, positive_int


def _chain_of_lags(n: int, tau: float) -> tuple[Tensor, Tensor, float]:
    """S, L and eps with S - S^T - L L^T - eps I = (N - I) / tau, N ones below the diagonal:
    a chain of n lags. Its damping -(A + A^T) / 2 = (I - (N + N^T) / 2) / tau is positive
    definite (smallest eigenvalue (1 - cos(pi / (n + 1))) / tau); eps takes at most half of it.
    """
    chain = (torch.diag(torch.ones(n - 1, dtype=torch.float64), -1)
             - torch.eye(n, dtype=torch.float64)) / tau  # fmt: skip
    damping = -(chain + chain.T) / 2.0
    eps = min(1e-3, 0.5 * (1.0 - math.cos(math.pi / (n + 1)))) / tau
    factor = torch.linalg.cholesky(damping - eps * torch.eye(n, dtype=torch.float64))
    skew = torch.tril((chain - chain.T) / 2.0, -1)
    return skew, factor, eps


def _signal_specs(signals: Mapping[str, object], key: str, where: str) -> list[dict]:
    """{name: {unit, nominal, range (inputs) or scale (outputs)}} -> checked plain dicts."""
    if not signals:
        raise ConfigError(f"{where}.{key}: expected at least one {{name: {{unit, nominal, ...}}}}")
    out = []
    for name, spec in dict(signals).items():
        spec = dict(spec)  # type: ignore[call-overload]
        for field in ("unit", "nominal"):
            if field not in spec:
                raise ConfigError(f"{where}.{key}.{name}: missing {field!r}")
        out.append({"name": str(name), **spec})
    return out


class LinearStateSpace(AbstractUnit):
    """dx/dt = A x + B (u - u_nom), y = C x + d, A = S - S^T - L L^T - eps I, every entry of
    S, L, B, C and d learnable.

    Args:
        name, components: given by the flowsheet (the unit exchanges no stream).
        inputs: {name: {unit, nominal, range: [low, high]}}: the unit's inputs.
        outputs: {name: {unit, nominal, scale}}: its outputs; nominal is d's initial value,
            scale (default 1) the output change per input scale in the initial gain.
        n_states: n.
        time_constant_s: tau of the initial chain of lags, s.
        params: overrides of s_i_j, l_i_j, b_i_j, c_k_i, d_k.

    Raises:
        ConfigError: no inputs or outputs, a missing field, n_states < 1, tau <= 0.
    """

    accepts_inflow = False

    def __init__(
        self,
        name: str,
        components: Sequence[str],
        inputs: Mapping[str, object],
        outputs: Mapping[str, object],
        n_states: int = 2,
        time_constant_s: float = 100.0,
        params: Mapping[str, object] | None = None,
    ) -> None:
        ins = _signal_specs(inputs, "inputs", name)
        outs = _signal_specs(outputs, "outputs", name)
        n = positive_int(n_states, "n_states", name)
        if not time_constant_s > 0:
            raise ConfigError(f"{name}.time_constant_s: expected > 0 s, got {time_constant_s}")
        tau = float(time_constant_s)
        scales = [float(o.get("scale", 1.0)) for o in outs]
        skew, factor, self.eps_1_s = _chain_of_lags(n, tau)
        specs = [ParamSpec(f"s_{i + 1}_{j + 1}", "1/s", float(skew[i, j]))
                 for i in range(n) for j in range(i)]  # fmt: skip
        specs += [ParamSpec(f"l_{i + 1}_{j + 1}", "1/s^0.5", float(factor[i, j]))
                  for i in range(n) for j in range(i + 1)]  # fmt: skip
        for i in range(n):
            for j, signal in enumerate(ins):
                low, high = signal.get("range", (-1.0, 1.0))
                width = max((float(high) - float(low)) / 2.0, 1e-12)
                value = scales[0] / width / tau if i == 0 else 0.0
                specs.append(ParamSpec(f"b_{i + 1}_{j + 1}", "state/(input s)", value))
        for k in range(len(outs)):  # B carries the first output's scale; C the ratio to it
            for i in range(n):
                gain = scales[k] / scales[0] if i == n - 1 else 0.0
                specs.append(ParamSpec(f"c_{k + 1}_{i + 1}", "output/state", gain))
        for k, signal in enumerate(outs):
            specs.append(ParamSpec(f"d_{k + 1}", signal["unit"], float(signal["nominal"])))
        super().__init__(name, components, specs, params)
        self.n_x, self.n_u, self.n_y = n, len(ins), len(outs)
        self.n_skew, self.n_factor = n * (n - 1) // 2, n * (n + 1) // 2
        # where each s / l parameter goes in its n x n matrix (row-major positions)
        self.register_buffer("skew_at", torch.tensor(
            [i * n + j for i in range(n) for j in range(i)], dtype=torch.long))
        self.register_buffer("factor_at", torch.tensor(
            [i * n + j for i in range(n) for j in range(i + 1)], dtype=torch.long))
        self.register_buffer("u_nominal", torch.tensor([[float(s["nominal"]) for s in ins]]))
        self.state_specs = tuple(
            StateSpec(f"x{i + 1}", "1", "linear state", max(scales), nonnegative=False)
            for i in range(n)
        )
        self.input_specs = tuple(
            InputSpec(
                s["name"],
                s["unit"],
                tuple(float(v) for v in s.get("range", (-1e12, 1e12))),
                float(s["nominal"]),
            )
            for s in ins
        )
        self.output_specs = tuple(OutputSpec(s["name"], s["unit"]) for s in outs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        # Weights saved when A was learnt entry by entry (a_i_j) have as many values as S and
        # L: loaded as those, they made another, wrong A without a word. Those files lack
        # the S / L positions.
        if prefix + "skew_at" not in state_dict:
            raise ConfigError(
                f"{self.unit_name}: these weights were saved when the linear "
                "prior's A was learnt entry by entry (a_i_j); it is now S - S^T - L L^T - eps I "
                "(s_i_j, l_i_j), and they do not convert: train the run again"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip

    def _matrix(self, theta: list[Tensor], start: int, rows: int, cols: int) -> Tensor:
        """Parameters theta[start : start + rows * cols] as (1 or batch, rows, cols)."""
        return torch.cat(theta[start : start + rows * cols], dim=1).reshape(-1, rows, cols)

    def _triangle(self, theta: list[Tensor], start: int, count: int, at: Tensor) -> Tensor:
        """Parameters theta[start : start + count] placed at `at` of an n x n matrix of
        zeros, (1 or batch, n, n)."""
        n = self.n_x
        if count == 0:  # n = 1 has no skew part
            return torch.zeros(theta[0].shape[0], n, n, dtype=theta[0].dtype,
                               device=theta[0].device)  # fmt: skip
        values = torch.cat(theta[start : start + count], dim=1)
        flat = torch.zeros(values.shape[0], n * n, dtype=values.dtype, device=values.device)
        return flat.index_copy(1, at, values).reshape(-1, n, n)

    def state_matrix(self, theta: list[Tensor]) -> Tensor:
        """A = S - S^T - L L^T - eps I, (1 or batch, n, n), 1/s."""
        skew = self._triangle(theta, 0, self.n_skew, self.skew_at)
        factor = self._triangle(theta, self.n_skew, self.n_factor, self.factor_at)
        eye = torch.eye(self.n_x, dtype=factor.dtype, device=factor.device)
        damping = torch.matmul(factor, factor.transpose(1, 2)) + self.eps_1_s * eye
        return skew - skew.transpose(1, 2) - damping

    @staticmethod
    def _times(matrix: Tensor, v: Tensor) -> Tensor:
        """matrix (1 or batch, r, c) times each row of v (batch, c): (batch, r). One matrix
        for the batch (the parameters) is a 2-D product: broadcast (1, r, c) against a
        dynamic batch, torch.export fixed the batch to != 1 and the twin's export failed."""
        if matrix.shape[0] == 1:
            return torch.matmul(v, matrix[0].transpose(0, 1))
        return torch.matmul(matrix, v.unsqueeze(-1)).squeeze(-1)

    def derivative(
        self, x: Tensor, u: Tensor, inflow: Tensor, theta: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """See `AbstractUnit.derivative`; no stream in or out."""
        n, m = self.n_x, self.n_u
        a = self.state_matrix(theta)
        b = self._matrix(theta, n * n, n, m)
        dx = self._times(a, x) + self._times(b, u - self.u_nominal)
        return dx, torch.zeros_like(inflow)

    def outputs(self, x: Tensor, theta: list[Tensor]) -> Tensor:
        """y = C x + d, (batch, n_outputs)."""
        n, m, p = self.n_x, self.n_u, self.n_y
        c = self._matrix(theta, n * n + n * m, p, n)
        d = torch.cat(theta[n * n + n * m + p * n :], dim=1)
        return self._times(c, x) + d

    def inventory(self, x: Tensor) -> Tensor:
        """No material: zeros, (batch, n_components)."""
        return torch.zeros(x.shape[0], self.n_components, dtype=x.dtype, device=x.device)

    def steady_state(self, u: Tensor, inflow: Tensor, theta: list[Tensor]) -> tuple[Tensor, Tensor]:
        """x = -A^-1 B (u - u_nom) (A is invertible: stable by construction)."""
        n, m = self.n_x, self.n_u
        a = self.state_matrix(theta)
        b = self._matrix(theta, n * n, n, m)
        rhs = -self._times(b, u - self.u_nominal)
        if a.shape[0] == 1:  # one A for the batch: one solve, the batch as columns
            x = torch.linalg.solve(a[0], rhs.transpose(0, 1)).transpose(0, 1).contiguous()
        else:
            x = torch.linalg.solve(a, rhs.unsqueeze(-1)).squeeze(-1)
        return x, torch.zeros_like(inflow)
