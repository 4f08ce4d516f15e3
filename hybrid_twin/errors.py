"""The TwinError family: every error hybrid_twin raises for something a user or a config caused.

Each subclasses a builtin as well, so callers that catch ValueError keep working. Messages say
where, what was expected and what arrived. Solver trouble inside scripted code is not raised
but returned as a per-trajectory status (see `hybrid_twin.solvers.SolverStatus`); `SolverError`
is what eager code raises after reading that status.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence


class TwinError(Exception):
    """Base of every error raised by hybrid_twin."""


class ConfigError(TwinError, ValueError):
    """A model, flowsheet or solver config is invalid: unknown key, bad value, missing entry."""


class ShapeError(TwinError, ValueError):
    """A tensor argument has the wrong shape or dtype for the call it was given to."""


class SolverError(TwinError, RuntimeError):
    """An integration finished with a non-zero status on at least one trajectory."""


def unknown_key_message(what: str, key: str, valid: Iterable[str]) -> str:
    """Format "unknown <what> 'key'; valid: a, b, c" (torchdiffeq's invalid-method style)."""
    return f"unknown {what} {key!r}; valid: {', '.join(sorted(valid))}"


def config_number(value: object, where: str, unit: str = "", allow_inf: bool = False) -> float:
    """A number from a config or scenario file (a numeric string too, as YAML or a Hydra
    override may give one); inf only with `allow_inf` (an open bound).

    Raises:
        ConfigError: anything else (`20 min`, `20%`, a list, true, nan), naming `where`.
    """
    try:
        number = float(value) if not isinstance(value, bool) else math.nan  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if math.isnan(number) or (math.isinf(number) and not allow_inf):
        unit = f" ({unit})" if unit else ""
        raise ConfigError(f"{where}: expected a number{unit}, got {value!r}")
    return number


def config_bool(value: object, where: str) -> bool:
    """A switch from a config: true or false only. `bool()` took any text as true, so
    `plant_check.enabled=no` (a string to Hydra) switched the check on.

    Raises:
        ConfigError: anything else, naming `where`.
    """
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def config_range(
    value: object, where: str, unit: str = "", allow_inf: bool = False
) -> tuple[float, float]:
    """[low, high] as two numbers (`config_number`; not checked for order: callers say what
    they need).

    Raises:
        ConfigError: not a list of two numbers, naming `where`.
    """
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence) or (
        len(value) != 2
    ):
        raise ConfigError(f"{where}: expected [low, high], got {value!r}")
    low, high = (config_number(v, where, unit, allow_inf) for v in value)
    return low, high
