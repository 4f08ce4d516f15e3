"""Online state estimation: an extended Kalman filter around any (solver, observation) pair.

Place in the data flow: the exported twin calls `ExtendedKalmanFilter` once per grid step dt_s
with the held inputs u_k and the measurements y_(k+1) that arrived (NaN or mask False where a
tag was not sampled); its innovations r = y - y_hat_(k+1|k) and their variances feed
`hybrid_twin.monitoring.InnovationMonitor`. The filter is generic: the one-interval map is
whatever fixed-step solver module wraps the vector field (`hybrid_twin.build_solver`), the
readout whatever observation module maps states (batch, n_states) to tags (batch, n_tags).
Everything here compiles with `torch.jit.script` and is batched over lines (dim 0).

Model, per grid step k -> k+1 (docs/monitoring.md has the derivation and the choices):

    x_(k+1) = Phi(x_k, u_k) + w_k,  w_k ~ N(0, diag(q))      (Phi: one solver interval, ZOH u_k)
    y_(k+1) = h(x_(k+1)) + v_k,     v_k ~ N(0, diag(r))

F = dPhi/dx and H = dh/dx come from batched central finite differences (one solver call on
2 n_states + 1 rows), not from autograd: they then work under `torch.no_grad` /
`torch.inference_mode` (the service), in any scripted or exported program, for any solver.
"""

from typing import NamedTuple

import torch
from torch import Tensor, nn

from hybrid_twin.errors import ConfigError, ShapeError
from hybrid_twin.spd import spd_solve

# Central differences: truncation error ~ h^2 |Phi'''| / 6, rounding ~ eps |Phi| / h; the sum
# is smallest at h ~ eps^(1/3) (relative), leaving ~ eps^(2/3) relative error in F and H:
# ~ 5e-11 in float64 (eps 2.2e-16 -> h 6.1e-6) and ~ 2e-5 in float32 (eps 1.2e-7 -> h 4.9e-3).
FD_REL_STEP_FLOAT64 = 6.1e-6
FD_REL_STEP_FLOAT32 = 4.9e-3
# Forward differences (fd_scheme="forward", transition Jacobian only): truncation ~ h |Phi''| / 2,
# rounding ~ 2 eps |Phi| / h; best at h ~ sqrt(eps), leaving ~ sqrt(eps) relative error in F:
# ~ 1.5e-8 in float64 (h 1.5e-8), ~ 3.5e-4 in float32 (h 3.5e-4). n + 1 solver rows, not 2n + 1.
FD_FORWARD_REL_STEP_FLOAT64 = 1.5e-8
FD_FORWARD_REL_STEP_FLOAT32 = 3.5e-4
FD_SCHEMES = ("central", "forward")


class FilterStep(NamedTuple):
    """One predict + update of `ExtendedKalmanFilter.forward`.

    x: (batch, n_states) filtered state; P: (batch, n_states, n_states) its covariance;
    innovation: (batch, n_tags) y - y_pred on sampled tags, 0 elsewhere (tag units);
    innovation_var: (batch, n_tags) diag(H P_pred H^T) + r for every tag (tag units^2);
    y_pred: (batch, n_tags) one-step prediction h(x_pred); status: (batch,) int64 solver status.
    """

    x: Tensor
    P: Tensor
    innovation: Tensor
    innovation_var: Tensor
    y_pred: Tensor
    status: Tensor


class ExtendedKalmanFilter(nn.Module):
    """Discrete-time EKF over one solver interval per step, batched over lines.

    Args:
        solver: fixed-step solver module, `solver(x0 (B, n), u (B, K, n_in), dt_s, pin_index,
            pin_values) -> ZOHSolution` (hybrid_twin/solvers.py); holds the vector field.
        observation: module mapping states (B, n) to measurements (B, n_tags), tag units.
        dt_s: grid step, s.
        q: (n_states,) process noise variance per state and step, state units^2 (>= 0).
        r: (n_tags,) measurement noise variance per tag, tag units^2 (> 0).
        state_scale: (n_states,) > 0, the scale on which the model varies with each state;
            the finite-difference step of state j is rel_step max(|x_j|, scale_j). Use the
            vector field's `state_normaliser.std` (what the residual network divides by):
            the looser StateSpec scales (0.12 kg for a 1.2 g lubricant hold-up) cost the
            float32 Jacobian of the cdc hybrid a factor 50 in accuracy. Default ones.
        state_floor: (n_states,) the readout sees max(x, state_floor) (TwinModel's physical
            domain projection); default none (-inf).
        fd_rel_step: relative finite-difference step; default by dtype and scheme
            (central: FD_REL_STEP_FLOAT64/32, eps^(1/3); forward: FD_FORWARD_REL_STEP_*,
            sqrt(eps); see the module constants).
        fd_scheme: "central" (default, the reference: 2 n + 1 solver rows, F to ~eps^(2/3))
            or "forward" (n + 1 rows, F to ~sqrt(eps): ~1e-8 relative in float64; not
            advised in float32) for the transition Jacobian. H is always central (the
            readout is cheap next to the solver).

    Raises:
        ShapeError: q, r, state_scale or state_floor are not 1-D of matching sizes.
        ConfigError: dt_s <= 0, a negative or non-finite q, a non-positive or non-finite r,
            a non-positive state_scale or fd_rel_step, an unknown fd_scheme.
    """

    def __init__(
        self,
        solver: nn.Module,
        observation: nn.Module,
        dt_s: float,
        q: Tensor,
        r: Tensor,
        state_scale: Tensor | None = None,
        state_floor: Tensor | None = None,
        fd_rel_step: float | None = None,
        fd_scheme: str = "central",
    ) -> None:
        super().__init__()
        q, r = torch.as_tensor(q), torch.as_tensor(r)
        if q.dim() != 1 or r.dim() != 1 or q.numel() == 0 or r.numel() == 0:
            raise ShapeError(
                f"ExtendedKalmanFilter: expected q (n_states,) and r (n_tags,), got "
                f"{tuple(q.shape)} and {tuple(r.shape)}"
            )
        n = q.shape[0]
        if not dt_s > 0:
            raise ConfigError(f"ExtendedKalmanFilter: dt_s: expected > 0 s, got {dt_s}")
        if not bool(torch.all(torch.isfinite(q) & (q >= 0))):
            raise ConfigError(f"ExtendedKalmanFilter: q: expected finite >= 0, got {q.tolist()}")
        if not bool(torch.all(torch.isfinite(r) & (r > 0))):
            raise ConfigError(f"ExtendedKalmanFilter: r: expected finite > 0, got {r.tolist()}")
        scale = torch.ones(n) if state_scale is None else torch.as_tensor(state_scale)
        floor = (
            torch.full((n,), float("-inf")) if state_floor is None else torch.as_tensor(state_floor)
        )
        for name, value in (("state_scale", scale), ("state_floor", floor)):
            if value.shape != (n,):
                raise ShapeError(
                    f"ExtendedKalmanFilter: {name}: expected ({n},) like q, "
                    f"got {tuple(value.shape)}"
                )
        if not bool(torch.all(torch.isfinite(scale) & (scale > 0))):
            raise ConfigError(
                f"ExtendedKalmanFilter: state_scale: expected finite > 0, got {scale.tolist()}"
            )
        if fd_rel_step is not None and not 0.0 < fd_rel_step < 1.0:
            raise ConfigError(
                f"ExtendedKalmanFilter: fd_rel_step: expected in (0, 1), got {fd_rel_step}"
            )
        if fd_scheme not in FD_SCHEMES:
            raise ConfigError(
                f"ExtendedKalmanFilter: fd_scheme: expected one of {FD_SCHEMES}, got {fd_scheme!r}"
            )
        self.fd_scheme = str(fd_scheme)
        self.fd_rel_step = -1.0 if fd_rel_step is None else float(fd_rel_step)
        # Instance copies: scripted code cannot read module-level floats.
        self.fd_rel_step_float64 = FD_REL_STEP_FLOAT64
        self.fd_rel_step_float32 = FD_REL_STEP_FLOAT32
        self.fd_forward_rel_step_float64 = FD_FORWARD_REL_STEP_FLOAT64
        self.fd_forward_rel_step_float32 = FD_FORWARD_REL_STEP_FLOAT32
        self.solver = solver
        self.observation = observation
        self.dt_s = float(dt_s)
        self.n_states, self.n_tags = n, r.shape[0]
        # The model's dtype, not torch's default: a float32 model built while the default is
        # float64 would otherwise have its filter promote every difference row to float64.
        dtype = next(
            (p.dtype for p in solver.parameters() if p.is_floating_point()),
            torch.get_default_dtype(),
        )
        self.register_buffer("q", q.detach().to(dtype).clone())
        self.register_buffer("r", r.detach().to(dtype).clone())
        self.register_buffer("state_scale", scale.detach().to(dtype).clone())
        self.register_buffer("state_floor", floor.detach().to(dtype).clone())

    def _fd_steps(self, x: Tensor, forward: bool = False) -> Tensor:
        """Per-state finite-difference steps, (batch, n_states)."""
        rel = self.fd_rel_step
        if rel <= 0.0:
            if forward:
                rel = (
                    self.fd_forward_rel_step_float64
                    if x.dtype == torch.float64
                    else self.fd_forward_rel_step_float32
                )
            else:
                rel = (
                    self.fd_rel_step_float64
                    if x.dtype == torch.float64
                    else self.fd_rel_step_float32
                )
        return rel * torch.maximum(x.abs(), self.state_scale)

    def _perturbed(self, x: Tensor, forward: bool = False) -> tuple[Tensor, Tensor]:
        """Rows [x, x + h_j e_j (j < n), x - h_j e_j (j < n)]: (batch, 2n + 1, n), or without
        the last n (forward); and the divisor of each difference quotient, (batch, n): the
        distance between the two rows it compares as they are in floating point."""
        h = self._fd_steps(x, forward)
        # x + h rounds: dividing by the h intended would add ~eps |x| / h relative error
        # (3e-4 at float32's forward step); the steps taken are exact differences.
        up, down = x + h, x - h
        first = x.unsqueeze(1)
        ups = first + torch.diag_embed(up - x)  # row j: x with x_j -> up_j
        if forward:
            return torch.cat([first, ups], 1), up - x
        downs = first - torch.diag_embed(x - down)
        return torch.cat([first, ups, downs], 1), up - down

    @torch.jit.export
    def transition_jacobian(
        self,
        x: Tensor,
        u: Tensor,
        pin_index: Tensor | None = None,
        pin_values: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One solver interval and its Jacobian by central (or forward, `fd_scheme`) differences.

        Args:
            x: (batch, n_states) state at t_k.
            u: (batch, n_inputs) input held on [t_k, t_(k+1)).
            pin_index: (k,) int64 states pinned to measured values at t_(k+1) (optional).
            pin_values: (batch, k) their values at t_(k+1), state units.

        Returns:
            x_next: (batch, n_states) Phi(x, u); F: (batch, n_states, n_states) dPhi/dx (rows
            of pinned states are 0); status: (batch,) int64 worst solver status of the line's
            2 n_states + 1 (forward: n_states + 1) rows.
        """
        batch, n = x.shape[0], x.shape[1]
        forward = self.fd_scheme == "forward"
        rows, spans = self._perturbed(x, forward)
        width = rows.shape[1]
        flat_u = u.unsqueeze(1).expand(batch, width, u.shape[1]).reshape(batch * width, 1, -1)
        flat_pins: Tensor | None = None
        if pin_index is not None and pin_values is not None:
            flat_pins = pin_values.unsqueeze(1).expand(batch, width, pin_values.shape[1])
            flat_pins = flat_pins.reshape(batch * width, 1, -1)
        solution = self.solver(
            rows.reshape(batch * width, n), flat_u, self.dt_s, pin_index, flat_pins
        )
        ends = solution.states[:, -1].reshape(batch, width, n)
        if forward:
            # F[:, i, j] = (Phi_i(x + h_j e_j) - Phi_i(x)) / h_j
            jac = (ends[:, 1:] - ends[:, :1]).transpose(1, 2) / spans.unsqueeze(1)
        else:
            # F[:, i, j] = (Phi_i(x + h_j e_j) - Phi_i(x - h_j e_j)) / (2 h_j)
            jac = (ends[:, 1 : n + 1] - ends[:, n + 1 :]).transpose(1, 2) / spans.unsqueeze(1)
        status = solution.status.reshape(batch, width).max(dim=1).values
        return ends[:, 0], jac, status

    @torch.jit.export
    def observation_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Readout and its Jacobian by central differences.

        Args:
            x: (batch, n_states).

        Returns:
            y: (batch, n_tags) h(max(x, state_floor)); H: (batch, n_tags, n_states).
        """
        batch, n = x.shape[0], x.shape[1]
        rows, spans = self._perturbed(x)
        width = rows.shape[1]
        floored = torch.maximum(rows, self.state_floor).reshape(batch * width, n)
        y = self.observation(floored).reshape(batch, width, -1)
        jac = (y[:, 1 : n + 1] - y[:, n + 1 :]).transpose(1, 2) / spans.unsqueeze(1)
        return y[:, 0], jac

    @torch.jit.export
    def predict(
        self,
        x: Tensor,
        P: Tensor,
        u: Tensor,
        pin_index: Tensor | None = None,
        pin_values: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Time update over one interval: x_pred = Phi(x, u), P_pred = F P F^T + diag(q).

        Pinned states (measured disturbances: the hopper masses on their load cells) are set
        to pin_values and their rows and columns of P_pred are zeroed: they are known, so the
        update cannot move them and their uncertainty does not leak into the other states.

        Args:
            x: (batch, n_states); P: (batch, n_states, n_states) symmetric, PSD.
            u: (batch, n_inputs) held on the interval.
            pin_index: (k,) int64 pinned states (optional); pin_values: (batch, k), state units.

        Returns:
            x_pred (batch, n_states), P_pred (batch, n_states, n_states) symmetric,
            status (batch,) int64 `SolverStatus` code (0: success).
        """
        x_pred, jac, status = self.transition_jacobian(x, u, pin_index, pin_values)
        pins = pin_index if pin_values is not None else None
        return x_pred, self._propagate(jac, P, pins), status

    def _propagate(self, jac: Tensor, P: Tensor, pin_index: Tensor | None) -> Tensor:
        """P_pred = F P F^T + diag(q), pinned rows/columns zeroed, symmetrised."""
        P_pred = jac @ P @ jac.transpose(1, 2) + torch.diag_embed(self.q.expand(P.shape[0], -1))
        if pin_index is not None:
            keep = torch.ones(P.shape[1], dtype=P.dtype, device=P.device)
            keep = keep.index_fill(0, pin_index, 0.0)
            P_pred = P_pred * (keep.unsqueeze(0) * keep.unsqueeze(1))
        return 0.5 * (P_pred + P_pred.transpose(1, 2))

    @torch.jit.export
    def update(
        self, x_pred: Tensor, P_pred: Tensor, y: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Measurement update on the sampled tags (Joseph form).

        A tag is used where mask is True and y is finite; every other tag gets zero gain
        (its row of H is zeroed and its innovation set to 0), which equals, in exact
        arithmetic and in practice to the last bits, the update with only the used rows.

        Args:
            x_pred: (batch, n_states); P_pred: (batch, n_states, n_states).
            y: (batch, n_tags) measurements, tag units (NaN allowed where not sampled).
            mask: (batch, n_tags) bool, True where sampled.

        Returns:
            x (batch, n_states); P (batch, n_states, n_states) symmetric;
            innovation (batch, n_tags): y - y_pred where used, 0 elsewhere;
            innovation_var (batch, n_tags): diag(H P_pred H^T) + r for every tag;
            y_pred (batch, n_tags) = h(x_pred).
        """
        y_pred, jac = self.observation_jacobian(x_pred)
        x, P, innovation, innovation_var = self._correct(x_pred, P_pred, y_pred, jac, y, mask)
        return x, P, innovation, innovation_var, y_pred

    def _correct(
        self, x_pred: Tensor, P_pred: Tensor, y_pred: Tensor, jac: Tensor, y: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Gain and Joseph-form update given h(x_pred) and H; see `update`."""
        used = mask & torch.isfinite(y)
        innovation = torch.where(used, y - y_pred, torch.zeros_like(y_pred))
        jac_used = jac * used.unsqueeze(2).to(jac.dtype)
        PHt = P_pred @ jac_used.transpose(1, 2)  # (batch, n, n_tags)
        # Unused tags: zero rows/columns in H P H^T, so S is block diagonal with r_i there.
        S = jac_used @ PHt + torch.diag_embed(self.r.expand_as(y_pred))
        gain = spd_solve(S, PHt.transpose(1, 2)).transpose(1, 2)  # (batch, n, n_tags)
        x = x_pred + (gain @ innovation.unsqueeze(2)).squeeze(2)
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        A = eye - gain @ jac_used
        P = A @ P_pred @ A.transpose(1, 2) + (gain * self.r) @ gain.transpose(1, 2)
        P = 0.5 * (P + P.transpose(1, 2))
        innovation_var = (jac @ P_pred * jac).sum(dim=2) + self.r
        return x, P, innovation, innovation_var

    def forward(
        self,
        x: Tensor,
        P: Tensor,
        u: Tensor,
        y: Tensor,
        mask: Tensor,
        pin_index: Tensor | None = None,
        pin_values: Tensor | None = None,
    ) -> FilterStep:
        """predict over [t_k, t_(k+1)) under u, then update with y at t_(k+1); see both."""
        x_pred, P_pred, status = self.predict(x, P, u, pin_index, pin_values)
        x_new, P_new, innovation, innovation_var, y_pred = self.update(x_pred, P_pred, y, mask)
        return FilterStep(x_new, P_new, innovation, innovation_var, y_pred, status)
