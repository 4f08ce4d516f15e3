"""Zero-order-held inputs for torchdiffeq: `odeint` / `odeint_adjoint` on the data grid.

The reference and training-comparison path beside `hybrid_twin.solvers`. Same convention:
u: (batch, time, n_inputs), u[:, k] holds on [k dt_s, (k + 1) dt_s); result (batch, time + 1,
n_states). Three ways to hand torchdiffeq the input steps:

- "intervals": one odeint call per input interval, restarting at each step (works with every
  method and with odeint_adjoint; the adjoint runs interval by interval as well);
- "jump_t": one call over the whole grid; adaptive methods get the step times as `jump_t`,
  fixed-grid methods step on the grid with `perturb=True` so each stage sees the right input;
- "naive": one call with no jump information: the adaptive solver then finds every input
  step by step rejection. Kept only as the baseline the benchmark measures.
"""

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from hybrid_twin.errors import ConfigError, unknown_key_message
from hybrid_twin.solvers import check_zoh_arguments

MODES = ("intervals", "jump_t", "naive")
# torchdiffeq's fixed-grid methods (its FixedGridODESolver subclasses; a test holds the list to
# torchdiffeq's): they step on a grid, the others take `jump_t`.
FIXED_GRID_METHODS = (
    "euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams",
)  # fmt: skip
MULTISTEP_METHODS = ("explicit_adams", "implicit_adams", "fixed_adams")


class ZeroOrderHold(nn.Module):
    """u(t) held constant between grid times, right-continuous: u(t) = u[:, k] on [t_k, t_(k+1)).

    Args:
        u: (batch, time, n_inputs).
        grid: (time + 1,) grid times t_k, s; torchdiffeq must receive these exact values.
    """

    def __init__(self, u: Tensor, grid: Tensor) -> None:
        super().__init__()
        self.u, self.grid = u, grid

    def forward(self, t: Tensor) -> Tensor:
        """Inputs at time t (scalar tensor), (batch, n_inputs)."""
        k = int(torch.searchsorted(self.grid, t.reshape(1), right=True)) - 1
        return self.u[:, min(max(k, 0), self.u.shape[1] - 1)]


class _FieldOfTime(nn.Module):
    """torchdiffeq signature f(t, x) for a vector field f(x, u) with u = hold(t)."""

    def __init__(self, vector_field: nn.Module, hold: nn.Module) -> None:
        super().__init__()
        self.vector_field, self.hold = vector_field, hold

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.vector_field(x, self.hold(t))


class _ConstantInput(nn.Module):
    def __init__(self, u: Tensor) -> None:
        super().__init__()
        self.u = u

    def forward(self, t: Tensor) -> Tensor:
        return self.u


def odeint_zoh(
    vector_field: nn.Module,
    x0: Tensor,
    u: Tensor,
    dt_s: float,
    method: str = "dopri5",
    mode: str = "intervals",
    adjoint: bool = False,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    options: Mapping[str, object] | None = None,
) -> Tensor:
    """Integrate f(x, u) under zero-order-held u with torchdiffeq.

    Args:
        vector_field: module called as vector_field(x, u) -> dx/dt (e.g. HybridVectorField).
        x0: (batch, n_states).
        u: (batch, time, n_inputs).
        dt_s: grid step, s.
        method: a torchdiffeq method ("dopri5", "rk4", ...).
        mode: "intervals", "jump_t" or "naive" (module docstring).
        adjoint: use odeint_adjoint (gradients by the adjoint ODE, to x0, the parameters of
            vector_field and u).
        rtol, atol: tolerances of adaptive methods (torchdiffeq's defaults).
        options: extra torchdiffeq options, e.g. {"step_size": dt_s / 2} for fixed-grid methods
            (default one step per interval). In "jump_t" and "naive" modes each interval takes
            ceil(dt_s / step_size) equal steps, none longer than step_size, as torchdiffeq's
            own grid does in "intervals" mode (whose last step of an interval is shorter).

    Returns:
        States (batch, time + 1, n_states), states[:, 0] = x0.

    Raises:
        ShapeError: bad x0 / u shapes; ConfigError: unknown mode, dt_s <= 0, or a multistep
            method in mode "jump_t".
    """
    check_zoh_arguments(vector_field, x0, u, dt_s)
    if mode not in MODES:
        raise ConfigError(unknown_key_message("odeint_zoh mode", mode, MODES))
    if mode == "jump_t" and method in MULTISTEP_METHODS:
        raise ConfigError(
            f"odeint_zoh: {method} is a multistep method, whose history would reach across "
            "the input steps in mode 'jump_t'; use mode 'intervals' (it restarts at each step)"
        )
    opts = dict(options or {})
    fixed = method in FIXED_GRID_METHODS
    if fixed:
        opts.setdefault("step_size", dt_s)
    if u.shape[1] == 0:  # no interval: the hold of "jump_t" / "naive" has no input to read
        return x0.unsqueeze(1)
    grid = torch.arange(u.shape[1] + 1, dtype=x0.dtype, device=x0.device) * dt_s
    if mode == "intervals":
        states, x = [x0], x0
        for k in range(u.shape[1]):
            held = u[:, k]  # one tensor: the field reads it, the adjoint differentiates it
            func = _FieldOfTime(vector_field, _ConstantInput(held))
            x = _integrate(func, held, adjoint, x, grid[:2], rtol=rtol, atol=atol,
                           method=method, options=opts)[-1]  # fmt: skip
            states.append(x)
        return torch.stack(states, dim=1)
    _add_jump_options(opts, mode, fixed, grid, dt_s)
    func = _FieldOfTime(vector_field, ZeroOrderHold(u, grid))
    states = _integrate(func, u, adjoint, x0, grid, rtol=rtol, atol=atol, method=method,
                        options=opts)  # fmt: skip
    return states.transpose(0, 1)


def _integrate(func: _FieldOfTime, u: Tensor, adjoint: bool, *args, **kwargs) -> Tensor:
    """odeint, or odeint_adjoint with the held inputs among the adjoint parameters: they are
    no module parameters, so by default the adjoint would give them no gradient."""
    if not adjoint:
        return odeint(func, *args, **kwargs)
    params = (*func.vector_field.parameters(), *((u,) if u.requires_grad else ()))
    return odeint_adjoint(func, *args, adjoint_params=params, **kwargs)


def _add_jump_options(opts: dict, mode: str, fixed: bool, grid: Tensor, dt_s: float) -> None:
    """torchdiffeq options that tell a one-call solve where the inputs step (or not, if naive)."""
    if mode == "jump_t":
        if fixed:
            opts["perturb"] = True
            opts["grid_constructor"] = _grid_with_substeps(grid, float(opts.pop("step_size")), dt_s)
        elif grid.shape[0] > 2:
            opts["jump_t"] = grid[1:-1]
    elif fixed:  # naive fixed grid: no perturbation; the stage at t_(k+1) sees u[:, k+1]
        opts["grid_constructor"] = _grid_with_substeps(grid, float(opts.pop("step_size")), dt_s)


def _grid_with_substeps(grid: Tensor, step_s: float, dt_s: float) -> Callable[..., Tensor]:
    """A torchdiffeq grid_constructor whose grid contains every input time exactly: each
    interval of the times it is asked for in n equal steps of at most step_s. Built from those
    times, not from `grid`: the adjoint asks for one interval at a time, backwards."""
    n = max(1, math.ceil(dt_s / step_s - 1e-9))
    fractions = torch.arange(n, dtype=grid.dtype, device=grid.device) / n

    def constructor(func: object, y0: Tensor, t: Tensor) -> Tensor:
        fine = (t[:-1, None] + fractions[None, :] * (t[1:] - t[:-1])[:, None]).flatten()
        return torch.cat([fine, t[-1:]])

    return constructor
