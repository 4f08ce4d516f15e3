"""ResidualNet: the neural part g_nn(x, u; phi) of the hybrid vector field.

It sees normalised states and inputs and returns a tanh-bounded correction in (-1, 1) per
output; `hybrid_twin.hybrid.HybridVectorField` scales it per state (additive form) or turns it
into bounded multiplicative corrections of named unit parameters (closure form). With a
zero-initialised last layer a fresh hybrid model equals its mechanistic part exactly.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from hybrid_twin.errors import ConfigError, unknown_key_message
from hybrid_twin.fused_mlp import PRECISIONS, fusable, mlp_tanh


@dataclass(frozen=True)
class ResidualConfig:
    """Residual network settings (the `residual:` block of configs/model/*.yaml).

    Attributes:
        hidden: widths of the hidden tanh layers.
        bound: largest correction per state, in state standard deviations per time_scale_s
            (additive and black-box forms): |g_i| < bound * std_i / time_scale_s.
        time_scale_s: time scale of that bound, s.
        zero_init: zero the last layer so the untrained hybrid equals the mechanistic model.
        closure_log_bound: closure form: corrected parameter = theta * exp(c), |c| < this.
        readout_log_bound: readout correction: corrected reading = h(x) * exp(c), |c| < this.
        fused: on a CUDA device, run the network's forward and backward as one Triton kernel
            each where `hybrid_twin.fused_mlp.fusable` allows (two hidden layers, widths <= 64,
            float32): no stored activations, the same results to float32 rounding. Elsewhere
            (CPU, TorchScript, torch.export) the plain layers run. Off by default: its speed
            in the training path is not measured yet (benchmarks/gpu_training.md).
        fused_precision: the fused kernels' float32 products: ieee, tf32x3 or tf32.
    """

    hidden: tuple[int, ...] = (64, 64)
    bound: float = 1.0
    time_scale_s: float = 60.0
    zero_init: bool = True
    closure_log_bound: float = 0.5
    readout_log_bound: float = 0.3
    fused: bool = False
    fused_precision: str = "ieee"

    def __post_init__(self) -> None:
        hidden = tuple(self.hidden)
        if not hidden or any(
            isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in hidden
        ):
            raise ConfigError(
                f"model.residual.hidden: expected positive integers, got {list(hidden)}"
            )
        object.__setattr__(self, "hidden", hidden)
        for name in ("bound", "time_scale_s", "closure_log_bound", "readout_log_bound"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"model.residual.{name}: expected > 0, got {getattr(self, name)}")
        if not isinstance(self.fused, bool):
            raise ConfigError(f"model.residual.fused: expected true or false, got {self.fused!r}")
        if self.fused_precision not in PRECISIONS:
            raise ConfigError(
                f"model.residual.fused_precision: expected one of {list(PRECISIONS)}, "
                f"got {self.fused_precision!r}"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> "ResidualConfig":
        """Build from a plain mapping; unknown keys raise ConfigError listing the valid ones."""
        valid = [f.name for f in fields(cls)]
        for key in values:
            if key not in valid:
                raise ConfigError("model.residual: " + unknown_key_message("key", key, valid))
        return cls(**values)  # type: ignore[arg-type]


class ResidualNet(nn.Module):
    """MLP z -> tanh(W_L tanh(... tanh(W_1 z + b_1) ...) + b_L), output in (-1, 1).

    Args:
        n_in: input width (normalised states + inputs).
        n_out: output width (states, or corrected parameters in closure form).
        hidden: hidden layer widths.
        zero_init: zero the last layer's weights and bias.
        generator: torch.Generator for the initial weights (the library never seeds the global
            generator); PyTorch's Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        fused, fused_precision: see `ResidualConfig`.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        hidden: Sequence[int] = (64, 64),
        zero_init: bool = True,
        generator: torch.Generator | None = None,
        fused: bool = False,
        fused_precision: str = "ieee",
    ) -> None:
        super().__init__()
        widths = [n_in, *hidden, n_out]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            # Built on the meta device so construction draws nothing from the global generator.
            linear = nn.Linear(fan_in, fan_out, device="meta").to_empty(device="cpu")
            limit = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                # Drawn in float32 whatever the default dtype: a generator's draws depend on
                # the dtype, and one seed should give one network (rounded in float32).
                for parameter in (linear.weight, linear.bias):
                    drawn = torch.empty(parameter.shape, dtype=torch.float32)
                    parameter.copy_(drawn.uniform_(-limit, limit, generator=generator))
                if zero_init and i == len(widths) - 2:
                    linear.weight.zero_()
                    linear.bias.zero_()
            layers.append(linear)
            if i < len(widths) - 2:
                layers.append(nn.Tanh())
        self.layers = nn.Sequential(*layers)
        self.n_in, self.n_out = n_in, n_out
        self.widths = widths
        self.fused = bool(fused)
        self.fused_precision = fused_precision

    def forward(self, z: Tensor) -> Tensor:
        """z: (batch, n_in) normalised -> (batch, n_out) in (-1, 1)."""
        if not torch.jit.is_scripting() and self._runs_fused(z):
            return self._fused_forward(z)
        return torch.tanh(self.layers(z))

    @torch.jit.unused
    def _runs_fused(self, z: Tensor) -> bool:
        """The fused kernels: eagerly or inside `torch.compile`, never into an exported or
        traced program (those must run without Triton)."""
        return (
            self.fused
            and fusable(z, self.widths)
            and not (torch.compiler.is_exporting() or torch.jit.is_tracing())
        )

    @torch.jit.unused
    def _fused_forward(self, z: Tensor) -> Tensor:
        linears = [layer for layer in self.layers if isinstance(layer, nn.Linear)]
        return mlp_tanh(z, linears, self.fused_precision)
