"""Named quantities of the unit models and the transforms that keep parameters physical.

Every unit declares its states, inputs, outputs and parameters with these specs; the
flowsheet prefixes the names with the unit name ("blender.holdup_ref_kg"). A `ParameterSet`
turns `ParamSpec`s into a TorchScript-friendly module: learnable parameters are stored
unconstrained and mapped into their bounds by softplus or sigmoid transforms (never by
clamping, which would zero the gradient at the bound); fixed parameters are plain buffers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybrid_twin.errors import ConfigError, config_number, config_range, unknown_key_message

# Transform codes stored in ParameterSet.kind (a buffer, so scripted code can read it).
_IDENTITY, _LOWER, _UPPER, _INTERVAL = 0, 1, 2, 3


@dataclass(frozen=True)
class StateSpec:
    """A state variable: name, engineering unit, typical magnitude, sign constraint."""

    name: str
    unit: str
    description: str = ""
    scale: float = 1.0
    nonnegative: bool = True


@dataclass(frozen=True)
class InputSpec:
    """An exogenous input (zero-order held): name, unit, valid range and nominal value."""

    name: str
    unit: str
    bounds: tuple[float, float]
    nominal: float
    description: str = ""


@dataclass(frozen=True)
class OutputSpec:
    """An algebraic output y = h(x) a unit offers for mapping onto a plant tag."""

    name: str
    unit: str
    description: str = ""


@dataclass(frozen=True)
class ParamSpec:
    """A physical parameter theta_j.

    Attributes:
        name: parameter name inside its unit, with its unit in the name where it helps.
        unit: engineering unit ("kg", "s", "1").
        default: value used unless the config overrides it; strictly inside `bounds` when
            learnable (the inverse transform is infinite on the bound).
        bounds: (low, high); either may be infinite.
        learnable: whether the optimiser may change it.
    """

    name: str
    unit: str
    default: float
    bounds: tuple[float, float] = (-math.inf, math.inf)
    learnable: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        low, high = self.bounds
        if not low < high:
            raise ConfigError(f"parameter {self.name!r}: bounds {self.bounds} need low < high")
        inside = low < self.default < high if self.learnable else low <= self.default <= high
        if not inside:
            kind = "strictly inside" if self.learnable else "inside"
            unit = "" if self.unit == "1" else f" {self.unit}"
            raise ConfigError(
                f"parameter {self.name!r}: value {self.default}{unit} is not {kind} "
                f"bounds [{low}, {high}]{unit}"
            )
        if self.learnable and not math.isfinite(_inverse_transform(self)[1]):
            raise ConfigError(
                f"parameter {self.name!r}: value {self.default} is too close to its bounds "
                f"[{low}, {high}] for the bounding transform (it rounds onto the bound)"
            )


def override_specs(
    specs: Sequence[ParamSpec], overrides: Mapping[str, object] | None, where: str
) -> tuple[ParamSpec, ...]:
    """Apply a config's `params:` mapping to a unit's parameter specs.

    Args:
        specs: the unit's declared parameters.
        overrides: {name: value} or {name: {"value"?, "bounds"?, "learnable"?}}.
        where: the unit name, for error messages.

    Returns:
        The specs with overrides applied, in declaration order.

    Raises:
        ConfigError: an unknown parameter or field, or a value outside its bounds.
    """
    by_name = {spec.name: spec for spec in specs}
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(
            f"{where}: params: expected a mapping {{name: value or {{value, bounds, learnable}}}}"
            f", got {overrides!r}"
        )
    for name, value in (overrides or {}).items():
        if name not in by_name:
            raise ConfigError(f"{where}: " + unknown_key_message("parameter", name, by_name))
        fields = dict(value) if isinstance(value, Mapping) else {"value": value}
        unknown = set(fields) - {"value", "bounds", "learnable"}
        if unknown:
            raise ConfigError(
                f"{where}.{name}: unknown fields {sorted(unknown)}; valid: bounds, learnable, value"
            )
        spec = by_name[name]
        changes: dict[str, object] = {}
        if "value" in fields:
            changes["default"] = config_number(
                fields["value"], f"{where}.{name}.value", allow_inf=True
            )
        if "bounds" in fields:
            changes["bounds"] = config_range(
                fields["bounds"], f"{where}.{name}.bounds", allow_inf=True
            )
        if "learnable" in fields:
            changes["learnable"] = bool(fields["learnable"])
        try:
            by_name[name] = replace(spec, **changes)  # type: ignore[arg-type]
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
    return tuple(by_name[spec.name] for spec in specs)


def _inverse_transform(spec: ParamSpec) -> tuple[int, float]:
    """Transform code and the unconstrained value that maps to `spec.default`."""
    low, high = spec.bounds
    value = spec.default
    if math.isinf(low) and math.isinf(high):
        return _IDENTITY, value
    if math.isinf(high):  # value = low + softplus(raw)
        return _LOWER, _softplus_inverse(value - low)
    if math.isinf(low):  # value = high - softplus(raw)
        return _UPPER, _softplus_inverse(high - value)
    p = (value - low) / (high - low)  # value = low + (high - low) * sigmoid(raw)
    if not 0.0 < p < 1.0:
        return _INTERVAL, math.inf
    return _INTERVAL, math.log(p) - math.log1p(-p)


def _softplus_inverse(y: float) -> float:
    # log(expm1(y)) written to stay finite for large y; y > 0 rounds to 0 only on the bound.
    return y + math.log(-math.expm1(-y)) if y > 0 else -math.inf


class ParameterSet(nn.Module):
    """The parameters of one unit (or of the observation model) as one transformed vector.

    `values()` returns the physical values in declaration order. Learnable entries are
    `low + softplus(raw)`, `high - softplus(raw)` or `low + (high - low) * sigmoid(raw)`
    depending on which bounds are finite, so every value stays inside its bounds and keeps a
    gradient; fixed entries are buffers.

    Args:
        specs: the parameters, in the order `values()` returns them.
    """

    def __init__(self, specs: Sequence[ParamSpec]) -> None:
        super().__init__()
        self.specs = tuple(specs)
        self.names = [spec.name for spec in self.specs]
        learn = [spec for spec in self.specs if spec.learnable]
        fixed = [spec for spec in self.specs if not spec.learnable]
        codes_raws = [_inverse_transform(spec) for spec in learn]
        dtype = torch.get_default_dtype()
        self.raw = nn.Parameter(torch.tensor([raw for _, raw in codes_raws], dtype=dtype))
        self.register_buffer(
            "kind", torch.tensor([code for code, _ in codes_raws], dtype=torch.long)
        )
        # Infinite bounds are replaced by harmless finite values: torch.where still
        # differentiates the branch it does not take, and inf there would give NaN gradients.
        lows = [s.bounds[0] if math.isfinite(s.bounds[0]) else 0.0 for s in learn]
        highs = [s.bounds[1] if math.isfinite(s.bounds[1]) else 1.0 for s in learn]
        self.register_buffer("low", torch.tensor(lows, dtype=dtype))
        self.register_buffer("high", torch.tensor(highs, dtype=dtype))
        self.register_buffer("fixed", torch.tensor([s.default for s in fixed], dtype=dtype))
        order = [self.specs.index(spec) for spec in learn + fixed]
        inverse = [order.index(i) for i in range(len(order))]
        self.register_buffer("order", torch.tensor(inverse, dtype=torch.long))
        self._check_inside_in(dtype)

    def _check_inside_in(self, dtype: torch.dtype) -> None:
        """A learnable value inside its bounds in float64 may round onto one in float32,
        where it would train with a zero gradient.

        Raises:
            ConfigError: such a value, naming the parameter and the dtype.
        """
        with torch.no_grad():
            values = self.values()
        for spec, value in zip(self.specs, values.tolist(), strict=True):
            low, high = spec.bounds
            if spec.learnable and not low < value < high:
                raise ConfigError(
                    f"parameter {spec.name!r}: value {spec.default} is too close to its bounds "
                    f"[{low}, {high}] for the bounding transform in {dtype} (it rounds onto the "
                    "bound, where it would train with a zero gradient)"
                )

    def values(self) -> Tensor:
        """Physical parameter values, shape (n_params,), in declaration order."""
        raw = self.raw
        soft = F.softplus(raw)
        interval = self.low + (self.high - self.low) * torch.sigmoid(raw)
        # Codes as literals: scripted code cannot read module globals (0 _IDENTITY, 1 _LOWER,
        # 2 _UPPER, 3 _INTERVAL).
        learned = torch.where(
            self.kind == 0,
            raw,
            torch.where(
                self.kind == 1,
                self.low + soft,
                torch.where(self.kind == 2, self.high - soft, interval),
            ),
        )
        return torch.cat([learned, self.fixed]).index_select(0, self.order)

    def forward(self) -> Tensor:
        return self.values()
