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
    """

    hidden: tuple[int, ...] = (64, 64)
    bound: float = 1.0
    time_scale_s: float = 60.0
    zero_init: bool = True
    closure_log_bound: float = 0.5
    readout_log_bound: float = 0.3

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
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        hidden: Sequence[int] = (64, 64),
        zero_init: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        widths = [n_in, *hidden, n_out]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            # Built on the meta device so construction draws nothing from the global generator.
            linear = nn.Linear(fan_in, fan_out, device="meta").to_empty(device="cpu")
            limit = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                linear.weight.uniform_(-limit, limit, generator=generator)
                linear.bias.uniform_(-limit, limit, generator=generator)
                if zero_init and i == len(widths) - 2:
                    linear.weight.zero_()
                    linear.bias.zero_()
            layers.append(linear)
            if i < len(widths) - 2:
                layers.append(nn.Tanh())
        self.layers = nn.Sequential(*layers)
        self.n_in, self.n_out = n_in, n_out

    def forward(self, z: Tensor) -> Tensor:
        """z: (batch, n_in) normalised -> (batch, n_out) in (-1, 1)."""
        return torch.tanh(self.layers(z))
