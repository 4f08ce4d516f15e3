"""TorchScript-compatible integrators for vector fields driven by zero-order-held inputs.

Convention (every solver, `integrate_zoh` and `hybrid_twin.zoh.odeint_zoh`): inputs
u: (batch, time, n_inputs) on a uniform grid t_k = k dt_s; u[:, k] holds on [t_k, t_(k+1)).
The solution states: (batch, time + 1, n_states) has states[:, k] = x(t_k), states[:, 0] = x0.
Every input step is an interval boundary the solver lands on and restarts from, so no
solver ever hunts an input discontinuity by step rejection.

A vector field is a module with `theta()` -> (1, n_params) and `rhs(x, u, theta)` -> dx/dt
(`Flowsheet`, `HybridVectorField`); theta is evaluated once per solve. Solver trouble is data:
each trajectory gets an int status (`SolverStatus`), which eager callers turn into an error
with `check_status`.

Compiled steps (optional, every solver: `torch_compile`): eager calls hand each step of the
fixed-step solvers (all its stages and their combination; Dopri5: each evaluation of the vector
field) to `torch.compile` (inductor), which fuses the flowsheet's many small elementwise ops on
(batch, n_states) tensors into a few kernels, forward and backward. The arithmetic is the plain
path's, so results equal it to rounding (float64: ~1e-15 of their scale,
tests/hybrid_twin/test_solver_compile.py). `torch_compile: true` compiles on any device,
`cuda` only where the state lives on a CUDA device, `false` never (`build_solver`'s default).
`cuda` is the training configs' default: on a GPU the plain path is bound by kernel launches,
and a training step through CUDA graphs replays the fused kernels (benchmarks/gpu_training.md).
TorchScript, `torch.export`, tracing and an enclosing `torch.compile` use the plain path; a
backend that cannot compile (no C++ compiler) warns once and the solver goes on without. Each
new graph costs a one-off compile (10-30 s cold on 2 CPU cores, 1-3 s from inductor's disk
cache): one per grad mode, per requires_grad of the state and parameters and, on CPU, per
batch size 1 or > 1 (the batch dimension is dynamic), on CUDA per batch size (inductor then
sizes its reductions over the batch). On CPU, RK4 forward+backward over 200 steps ran 1.8x
(batch 1024) to 3.3x (batch 1) faster than scripted and 3.0-7.6x faster than torchdiffeq's rk4
(benchmarks/solvers.md; measured when the vector field, not the whole step, was the compiled
unit).

Pinned states (optional, every solver): `pin_index` (k,) names states a measured signal fixes
and `pin_values` (batch, time, k) gives their values at t_1..t_time; after integrating
interval k the solver overwrites those states with pin_values[:, k]. Between grid points the
vector field moves them as usual. The twin pins the hopper masses to their load cells this way,
so a refill (which no input carries) reaches the model when it shows on the scale.
"""

import enum
import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hybrid_twin.errors import ConfigError, ShapeError, SolverError, unknown_key_message


class SolverStatus(enum.IntEnum):
    """Per-trajectory result codes returned by every solver (int64 tensor, (batch,))."""

    SUCCESS = 0
    MAX_STEPS_REACHED = 1
    NON_FINITE = 2

    @property
    def message(self) -> str:
        return {
            0: "integration finished",
            1: "the adaptive solver used max_steps inside one input interval without reaching its "
            "end (stiff or badly scaled problem: raise max_steps, loosen rtol/atol or use rk4)",
            2: "the state became NaN or inf",
        }[int(self)]


class ZOHSolution(NamedTuple):
    """states: (batch, time + 1, n_states); status: (batch,) int64 SolverStatus codes;
    n_steps: (batch,) int64 steps attempted (accepted + rejected)."""

    states: Tensor
    status: Tensor
    n_steps: Tensor


# Dormand-Prince 5(4) tableau (Dormand & Prince 1980); B5 is also row 7 of A (FSAL).
_A = [
    [0.2],
    [3.0 / 40.0, 9.0 / 40.0],
    [44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
    [19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0],
    [9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0, 49.0 / 176.0, -5103.0 / 18656.0],
]
_B5 = [35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0]
# Fifth- minus fourth-order weights, over k1..k7.
_E = [
    71.0 / 57600.0,
    0.0,
    -71.0 / 16695.0,
    71.0 / 1920.0,
    -17253.0 / 339200.0,
    22.0 / 525.0,
    -1.0 / 40.0,
]


def _combine(ks: list[Tensor], coeffs: list[float]) -> Tensor:
    """sum_j coeffs[j] * ks[j], skipping zero weights."""
    total = ks[0] * coeffs[0]
    for j in range(1, len(ks)):
        if coeffs[j] != 0.0:
            total = total.add(ks[j], alpha=coeffs[j])
    return total


def _pin(x: Tensor, k: int, pin_index: Tensor | None, pin_values: Tensor | None) -> Tensor:
    """x with the pinned states set to their values at the end of interval k."""
    if pin_index is None or pin_values is None:
        return x
    return x.index_copy(1, pin_index, pin_values.select(1, k))


@torch.jit.unused
def _exporting_time_loop(u: Tensor) -> bool:
    """Under `torch.export` with a dynamic number of intervals (TorchScript never calls this: it
    only runs when not scripting). A fixed number (the EKF's one interval) stays a Python loop:
    unrolled, it needs no `while_loop` and its per-iteration overhead."""
    return torch.compiler.is_exporting() and isinstance(u.shape[1], torch.SymInt)


@torch.jit.unused
def _plain_eager_call() -> bool:
    """Not under `torch.export`, `torch.compile` tracing or `torch.jit.trace` (TorchScript never
    calls this): where `torch_compile` may hand a step to `torch.compile`."""
    return not (
        torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
    )


def _vector_field_rhs(vector_field: nn.Module, x: Tensor, u: Tensor, theta: Tensor) -> Tensor:
    """What Dopri5's `torch_compile` compiles: one evaluation of the vector field (module-level,
    so every solver and field of one structure share the compiled graphs)."""
    return vector_field.rhs(x, u, theta)


def _fixed_step(solver: nn.Module, x: Tensor, u: Tensor, theta: Tensor, h: float) -> Tensor:
    """What the fixed-step solvers' `torch_compile` compiles: one whole step, every stage."""
    return solver._step(x, u, theta, h)


@functools.cache
def _compiled(function: Callable[..., Tensor], static: bool = False) -> Callable[..., Tensor]:
    """`function` under `torch.compile`, made on first use (importing dynamo is slow); static:
    a graph per batch size (the caller marks the batch dimension dynamic otherwise).

    Inductor's CPU code writes tanh as 2 / (1 + exp(-2 x)) - 1 (`cpp.use_decompose_tanh`): the
    residual network's tanh layers then cost a third of the vectorised library tanh, and the
    whole forward pass 1.4x less at batch 1024 (benchmarks/solvers.md); the error stays
    within a few units in the last place of 1. Graph breaks (a user unit dynamo cannot trace)
    split the graph rather than fail. A step has a graph per grad mode, requires_grad pattern,
    model and (static) batch size, more than dynamo's default limit of 8 per function in a
    sweep or a benchmark; past the limit dynamo would run the step uncompiled, hence 64.
    """
    from torch._dynamo import config as dynamo_config
    from torch._inductor import config as inductor_config

    if hasattr(dynamo_config, "recompile_limit"):
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    options = {}
    if hasattr(inductor_config.cpp, "use_decompose_tanh"):
        options["cpp.use_decompose_tanh"] = True
    return torch.compile(function, dynamic=False if static else None, options=options)


def _compiled_vector_field(static: bool = False) -> Callable[..., Tensor]:
    return _compiled(_vector_field_rhs, static)


def _compiled_fixed_step(static: bool = False) -> Callable[..., Tensor]:
    return _compiled(_fixed_step, static)


def _compile_setting(value: object) -> bool | str:
    """`torch_compile` as given: True, False or "cuda"."""
    if isinstance(value, bool) or value == "cuda":
        return value  # type: ignore[return-value]
    raise ConfigError(f"solver.torch_compile: expected true, false or 'cuda', got {value!r}")


def _finish(trajectory: Tensor, status: Tensor, n_steps: Tensor) -> ZOHSolution:
    """The solution of trajectory (batch, time + 1, n_states); a non-finite state fails it."""
    finite = torch.isfinite(trajectory).flatten(1).all(dim=1)
    status = torch.where(finite, status, torch.full_like(status, 2))
    return ZOHSolution(trajectory, status, n_steps)


class AbstractZOHSolver(nn.Module):
    """Base of the solvers; never instantiated. Holds the vector field as a submodule so
    `torch.jit.script(solver)` compiles field and solver together.

    Args:
        vector_field: module with theta() and rhs(x, u, theta).
        torch_compile: True, False or "cuda": run steps through `torch.compile` in eager calls
            (see the module doc); results equal the plain path to rounding. Scripted and
            exported programs ignore it.
    """

    def __init__(self, vector_field: nn.Module, torch_compile: bool | str = False) -> None:
        super().__init__()
        self.vector_field = vector_field
        self.torch_compile = _compile_setting(torch_compile)

    @torch.jit.unused
    def _compiles(self, x: Tensor) -> bool:
        """Whether this call goes through `torch.compile` (never inside a compiled, exported or
        traced program: those take the plain path)."""
        if self.torch_compile is False or (self.torch_compile == "cuda" and not x.is_cuda):
            return False
        return _plain_eager_call()

    def _rhs(self, x: Tensor, u: Tensor, theta: Tensor) -> Tensor:
        """dx/dt of the vector field (Dopri5: compiled where `torch_compile` asks for it)."""
        if not torch.jit.is_scripting() and self._compiles_rhs() and self._compiles(x):
            return self._run_compiled(
                _compiled_vector_field, self.vector_field, self.vector_field.rhs, x, u, theta
            )
        return self.vector_field.rhs(x, u, theta)

    @torch.jit.unused
    def _compiles_rhs(self) -> bool:
        """Solvers that compile their whole step (the fixed-step ones) say False here."""
        return True

    @torch.jit.unused
    def _run_compiled(
        self,
        compiled_function: Callable[[bool], Callable[..., Tensor]],
        owner: nn.Module,
        plain: Callable[..., Tensor],
        x: Tensor,
        u: Tensor,
        *rest: object,
    ) -> Tensor:
        """compiled_function()(owner, x, u, *rest); `plain(x, u, *rest)` if dynamo fails."""
        from torch._dynamo import maybe_mark_dynamic
        from torch._dynamo.exc import TorchDynamoException

        # CPU: one graph for every batch size > 1 (batch 1 is specialised by dynamo's rules).
        # CUDA: one per batch size, so that inductor sizes its reductions over the batch (the
        # parameters' gradients) for that batch: with a symbolic batch, the step at batch
        # 131,072 ran 1.8x slower than the plain one (benchmarks/gpu_training.md).
        static = x.is_cuda
        if not static:
            maybe_mark_dynamic(x, 0)
            maybe_mark_dynamic(u, 0)
        try:
            return compiled_function(static)(owner, x, u, *rest)
        except TorchDynamoException as error:  # no usable backend (e.g. no C++ compiler)
            self.torch_compile = False
            warnings.warn(
                f"solver.torch_compile: torch.compile failed ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); this solver runs "
                "without it from now on",
                RuntimeWarning,
                stacklevel=3,
            )
            return plain(x, u, *rest)

    def forward(
        self,
        x0: Tensor,
        u: Tensor,
        dt_s: float,
        pin_index: Tensor | None = None,
        pin_values: Tensor | None = None,
    ) -> ZOHSolution:
        """Integrate from x0 (batch, n_states) under u (batch, time, n_inputs); see module doc."""
        raise NotImplementedError


class AbstractFixedStepSolver(AbstractZOHSolver):
    """Base of the fixed-step solvers: n_substeps equal steps of `_step` per input interval.

    Args:
        vector_field: module with theta() and rhs(x, u, theta).
        n_substeps: steps per input interval.
        torch_compile: see `AbstractZOHSolver`: each step (all its stages) is one compiled
            graph; with `recompute` the recomputed steps run compiled too.
        recompute: eager autograd keeps only each interval's start state and recomputes the
            interval's stages in the backward pass (activation checkpointing): memory per
            trajectory falls from every stage's activations to one state per interval, for
            about one more forward pass of work. For batches that do not fit otherwise: a
            hybrid field of 9 states and a 64x64 network over 200 steps peaked at 73 GiB at
            batch 131,072 on an H200, 6.3 GiB with recompute, 25 % slower
            (benchmarks/gpu_training.md). Results and gradients are unchanged; scripted code
            and no-grad calls ignore it.
    """

    def __init__(
        self,
        vector_field: nn.Module,
        n_substeps: int = 1,
        recompute: bool = False,
        torch_compile: bool | str = False,
    ) -> None:
        super().__init__(vector_field, torch_compile)
        self.n_substeps = _positive_int(n_substeps, "n_substeps")
        self.recompute = bool(recompute)

    def forward(
        self,
        x0: Tensor,
        u: Tensor,
        dt_s: float,
        pin_index: Tensor | None = None,
        pin_values: Tensor | None = None,
    ) -> ZOHSolution:
        theta = self.vector_field.theta()
        h = dt_s / self.n_substeps
        if not torch.jit.is_scripting() and _exporting_time_loop(u):
            return self._exported_loop(x0, u, theta, h, pin_index, pin_values)
        x = x0
        states = [x0]
        recompute = self.recompute and not torch.jit.is_scripting() and torch.is_grad_enabled()
        for k, uk in enumerate(u.unbind(1)):
            if recompute:
                x = self._recomputed_interval(x, uk, theta, h)
            else:
                x = self._interval(x, uk, theta, h)
            x = _pin(x, k, pin_index, pin_values)
            states.append(x)
        steps = torch.full(
            (x0.shape[0],), u.shape[1] * self.n_substeps, dtype=torch.long, device=x0.device
        )
        return _finish(torch.stack(states, dim=1), torch.zeros_like(steps), steps)

    @torch.jit.unused
    def _exported_loop(
        self,
        x0: Tensor,
        u: Tensor,
        theta: Tensor,
        h: float,
        pin_index: Tensor | None,
        pin_values: Tensor | None,
    ) -> ZOHSolution:
        """`forward` as one `while_loop` over the intervals, for `torch.export`: the Python loop
        would be unrolled for one fixed number of intervals, this one takes any (a dynamic
        time dimension). Same arithmetic per interval as `forward`."""
        from torch._higher_order_ops.while_loop import while_loop

        intervals = u.shape[1]
        states = torch.zeros(
            x0.shape[0], intervals + 1, x0.shape[1], dtype=x0.dtype, device=x0.device
        ).index_copy(1, torch.zeros(1, dtype=torch.long, device=x0.device), x0.unsqueeze(1))

        def more(k: Tensor, x: Tensor, states: Tensor) -> Tensor:
            return k < intervals

        def interval(k: Tensor, x: Tensor, states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            at = k.reshape(1)
            x = self._interval(x, u.index_select(1, at).squeeze(1), theta.reshape(1, -1), h)
            if pin_index is not None and pin_values is not None:
                x = x.index_copy(1, pin_index, pin_values.index_select(1, at).squeeze(1))
            return k + 1, x.clone(), states.index_copy(1, at + 1, x.unsqueeze(1))

        start = torch.zeros((), dtype=torch.long, device=x0.device)
        _, _, states = while_loop(more, interval, (start, x0, states))
        steps = torch.full(
            (x0.shape[0],), intervals * self.n_substeps, dtype=torch.long, device=x0.device
        )
        return _finish(states, torch.zeros_like(steps), steps)

    def _interval(self, x: Tensor, u: Tensor, theta: Tensor, h: float) -> Tensor:
        """x after the n_substeps steps of one input interval."""
        for _ in range(self.n_substeps):
            if not torch.jit.is_scripting() and self._compiles(x):
                x = self._run_compiled(_compiled_fixed_step, self, self._step, x, u, theta, h)
            else:
                x = self._step(x, u, theta, h)
        return x

    @torch.jit.unused
    def _compiles_rhs(self) -> bool:
        return False  # the whole step is compiled instead

    @torch.jit.unused
    def _recomputed_interval(self, x: Tensor, u: Tensor, theta: Tensor, h: float) -> Tensor:
        # No RNG in a vector field, and saving the CUDA RNG state would break graph capture.
        return checkpoint(
            self._interval, x, u, theta, h, use_reentrant=False, preserve_rng_state=False
        )

    def _step(self, x: Tensor, u: Tensor, theta: Tensor, h: float) -> Tensor:
        """x after one step of size h under the held input u."""
        raise NotImplementedError


class Euler(AbstractFixedStepSolver):
    """Explicit Euler, n_substeps equal steps per input interval (order 1; for tests/debug)."""

    def _step(self, x: Tensor, u: Tensor, theta: Tensor, h: float) -> Tensor:
        return x.add(self._rhs(x, u, theta), alpha=h)


class RK4(AbstractFixedStepSolver):
    """Classic fourth-order Runge-Kutta, n_substeps equal steps per input interval.

    Stable for the linear lags of the unit models while h = dt_s / n_substeps < 2.78 tau_min.
    """

    def _step(self, x: Tensor, u: Tensor, theta: Tensor, h: float) -> Tensor:
        k1 = self._rhs(x, u, theta)
        k2 = self._rhs(x.add(k1, alpha=0.5 * h), u, theta)
        k3 = self._rhs(x.add(k2, alpha=0.5 * h), u, theta)
        k4 = self._rhs(x.add(k3, alpha=h), u, theta)
        return x.add(k1.add(k2.add(k3), alpha=2.0).add(k4), alpha=h / 6.0)


class Dopri5(AbstractZOHSolver):
    tableau_a: list[list[float]]
    weights_5: list[float]
    weights_error: list[float]

    """Dormand-Prince 5(4) with per-trajectory error control, restarted at every input step.

    Each trajectory keeps its own step size, so a row's result does not depend on the rest of
    the batch. Error norm: RMS over states of err / (atol + rtol max(|x|, |x_new|)); steps
    with norm <= 1 are accepted; the next step is h min(10, max(0.2, 0.9 norm^-1/5)), never
    longer than the interval. Step-size control is detached from autograd (the gradient is
    that of the computed solution for its step sequence); with autograd on, each accepted
    step is computed twice (decided off the graph, then taken on it), so that a rejected
    trial, which may have overflowed, leaves no NaN in the gradient.

    Args:
        vector_field: module with theta() and rhs(x, u, theta).
        rtol, atol: relative and absolute tolerances (state units).
        max_steps: cap on attempted steps per input interval; a trajectory that hits it gets
            status MAX_STEPS_REACHED (its state then lags the grid).
        first_step_s: first trial step; default the whole interval.
        adaptive: False turns off error control: n_substeps fixed fifth-order steps.
        n_substeps: steps per interval when adaptive is False.
        torch_compile: see `AbstractZOHSolver`.
    """

    def __init__(
        self,
        vector_field: nn.Module,
        rtol: float = 1e-6,
        atol: float = 1e-8,
        max_steps: int = 64,
        first_step_s: float | None = None,
        adaptive: bool = True,
        n_substeps: int = 1,
        torch_compile: bool | str = False,
    ) -> None:
        super().__init__(vector_field, torch_compile)
        # atol 0 would make a state that is exactly 0 (an empty hopper) 0/0 in the error
        # norm: every step rejected until max_steps.
        if not (rtol > 0 and atol > 0):
            raise ConfigError(
                f"solver.dopri5: expected rtol > 0 and atol > 0, got rtol={rtol}, atol={atol}"
            )
        self.rtol, self.atol = float(rtol), float(atol)
        self.max_steps = _positive_int(max_steps, "max_steps")
        self.first_step_s = -1.0 if first_step_s is None else float(first_step_s)
        self.adaptive = bool(adaptive)
        self.n_substeps = _positive_int(n_substeps, "n_substeps")
        # Instance copies: scripted code cannot read module-level lists.
        self.tableau_a = [list(row) for row in _A]
        self.weights_5 = list(_B5)
        self.weights_error = list(_E)

    def forward(
        self,
        x0: Tensor,
        u: Tensor,
        dt_s: float,
        pin_index: Tensor | None = None,
        pin_values: Tensor | None = None,
    ) -> ZOHSolution:
        theta = self.vector_field.theta()
        batch = x0.shape[0]
        first = dt_s if self.first_step_s <= 0 else min(self.first_step_s, dt_s)
        h = torch.full((batch, 1), first, dtype=x0.dtype, device=x0.device)
        status = torch.zeros(batch, dtype=torch.long, device=x0.device)
        n_steps = torch.zeros_like(status)
        x = x0
        states = [x0]
        for k, uk in enumerate(u.unbind(1)):
            if self.adaptive:
                x, h, done, n = self._interval(x, uk, theta, dt_s, h)
                status = torch.maximum(status, (~done).long())
                n_steps = n_steps + n
            else:
                step = torch.full(
                    (batch, 1), dt_s / self.n_substeps, dtype=x0.dtype, device=x0.device
                )
                for _ in range(self.n_substeps):
                    x = self._step(x, self._rhs(x, uk, theta), uk, theta, step)[0]
                n_steps = n_steps + self.n_substeps
            x = _pin(x, k, pin_index, pin_values)
            states.append(x)
        return _finish(torch.stack(states, dim=1), status, n_steps)

    def _step(
        self, x: Tensor, k1: Tensor, u: Tensor, theta: Tensor, h: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One step of size h (batch, 1): (x5, f(x5), error estimate), all (batch, n_states)."""
        ks = [k1]
        for row in self.tableau_a:
            ks.append(self._rhs(x + h * _combine(ks, row), u, theta))
        x_new = x + h * _combine(ks, self.weights_5)
        ks.append(self._rhs(x_new, u, theta))
        return x_new, ks[6], h * _combine(ks, self.weights_error)

    def _interval(
        self, x: Tensor, u: Tensor, theta: Tensor, dt_s: float, h: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Adaptive steps over one interval: (x, next h, done (batch,), steps (batch,))."""
        t = torch.zeros_like(h)
        done = torch.zeros(h.shape, dtype=torch.bool, device=h.device)
        n = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
        k1 = self._rhs(x, u, theta)
        for _ in range(self.max_steps):
            remaining = dt_s - t
            last = h * 1.01 >= remaining  # stretch a step by <= 1 % rather than leave a sliver
            step = torch.where(last, remaining, h)
            if torch.is_grad_enabled():
                # A rejected trial must stay off the graph: one that overflowed would give
                # its rows 0 * inf = NaN gradients. So the trial only decides, and the kept
                # step is taken again on the graph, a zero step where rejected.
                with torch.no_grad():
                    x_new, _, error = self._step(x, k1, u, theta, step)
                    ratio = self._error_ratio(x, x_new, error)
                    accept = (ratio <= 1.0) & ~done
                x_new, k_new, _ = self._step(
                    x, k1, u, theta, torch.where(accept, step, torch.zeros_like(step))
                )
            else:
                x_new, k_new, error = self._step(x, k1, u, theta, step)
                ratio = self._error_ratio(x, x_new, error)
                accept = (ratio <= 1.0) & ~done
            x = torch.where(accept, x_new, x)
            k1 = torch.where(accept, k_new, k1)
            t = torch.where(accept, torch.where(last, torch.full_like(t, dt_s), t + step), t)
            n = n + (~done).long().squeeze(1)
            proposal = step * (0.9 * ratio.pow(-0.2)).clamp(0.2, 10.0)
            proposal = torch.where(accept & last, torch.maximum(h, proposal), proposal).clamp(
                max=dt_s
            )
            h = torch.where(done, h, proposal)
            done = done | (accept & last)
            if bool(done.all()):
                break
        return x, h, done.squeeze(1), n

    def _error_ratio(self, x: Tensor, x_new: Tensor, error: Tensor) -> Tensor:
        scale = self.atol + self.rtol * torch.maximum(x.abs(), x_new.abs())
        ratio = (error / scale).pow(2).mean(dim=1, keepdim=True).sqrt()
        # A NaN/inf error rejects the step and shrinks it by the largest factor.
        return torch.where(torch.isfinite(ratio), ratio, torch.full_like(ratio, 1e10))


SOLVERS: dict[str, type[AbstractZOHSolver]] = {"euler": Euler, "rk4": RK4, "dopri5": Dopri5}


def _positive_int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"solver.{key}: expected an integer >= 1, got {value!r}")
    return value


def build_solver(vector_field: nn.Module, config: str | Mapping[str, object]) -> AbstractZOHSolver:
    """A solver module from a registry key or a config {"name": key, **options}.

    Args:
        vector_field: module with theta() and rhs(x, u, theta).
        config: "rk4" or e.g. {"name": "dopri5", "rtol": 1e-6} (configs/solver/<name>.yaml).

    Raises:
        ConfigError: unknown solver name or option (the message lists the valid ones).
    """
    options = {"name": config} if isinstance(config, str) else dict(config)
    name = str(options.pop("name", ""))
    if name not in SOLVERS:
        raise ConfigError(unknown_key_message("solver", name, SOLVERS))
    cls = SOLVERS[name]
    valid = [
        p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "vector_field")
    ]
    for key in options:
        if key not in valid:
            raise ConfigError(f"solver.{name}: " + unknown_key_message("option", key, valid))
    return cls(vector_field, **options)  # type: ignore[arg-type]


def integrate_zoh(
    vector_field: nn.Module,
    x0: Tensor,
    u: Tensor,
    dt_s: float,
    method: str = "rk4",
    **options: object,
) -> ZOHSolution:
    """Integrate a vector field under zero-order-held inputs (eager entry point).

    Args:
        vector_field: module with theta(), rhs(x, u, theta) and n_states / n_inputs.
        x0: initial states, (batch, n_states).
        u: inputs, (batch, time, n_inputs); u[:, k] holds on [k dt_s, (k + 1) dt_s).
        dt_s: grid step, s.
        method: a SOLVERS key.
        **options: solver options (n_substeps; rtol, atol, max_steps, ...).

    Returns:
        ZOHSolution(states (batch, time + 1, n_states), status (batch,), n_steps (batch,)).

    Raises:
        ShapeError: x0 / u shapes or dtypes do not match each other or the vector field.
        ConfigError: unknown method or option, dt_s <= 0.
    """
    check_zoh_arguments(vector_field, x0, u, dt_s)
    return build_solver(vector_field, {"name": method, **options})(x0, u, dt_s)


def check_zoh_arguments(vector_field: nn.Module, x0: Tensor, u: Tensor, dt_s: float) -> None:
    """Raise ShapeError/ConfigError for arguments `integrate_zoh` cannot use."""
    n_states = getattr(vector_field, "n_states", x0.shape[-1])
    n_inputs = getattr(vector_field, "n_inputs", u.shape[-1])
    if x0.dim() != 2 or x0.shape[1] != n_states:
        raise ShapeError(f"x0: expected (batch, {n_states}), got {tuple(x0.shape)}")
    if u.dim() != 3 or u.shape[0] != x0.shape[0] or u.shape[2] != n_inputs:
        raise ShapeError(f"u: expected ({x0.shape[0]}, time, {n_inputs}), got {tuple(u.shape)}")
    if u.dtype != x0.dtype:
        raise ShapeError(f"u: dtype {u.dtype} differs from x0's {x0.dtype}")
    floating = [p for p in vector_field.parameters() if p.is_floating_point()]
    if floating and floating[0].dtype != x0.dtype:  # silently mixed precision otherwise
        raise ShapeError(
            f"x0: dtype {x0.dtype} differs from the vector field's parameters' "
            f"{floating[0].dtype}; convert one (module.to(dtype) or x0.to(dtype))"
        )
    if not dt_s > 0:
        raise ConfigError(f"dt_s: expected > 0 s, got {dt_s}")


def check_status(solution: ZOHSolution, where: str = "integration") -> None:
    """Raise SolverError if any trajectory's status is not SUCCESS, naming rows and reason."""
    failed = torch.nonzero(solution.status).flatten().tolist()
    if failed:
        code = SolverStatus(int(solution.status[failed[0]]))
        rows = ", ".join(str(i) for i in failed[:10]) + (" ..." if len(failed) > 10 else "")
        raise SolverError(
            f"{where}: {len(failed)} trajectories failed (rows {rows}): {code.name}: {code.message}"
        )
