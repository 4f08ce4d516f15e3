"""The TwinError family: every error hybrid_twin raises for something a user or a config caused.

Each subclasses a builtin as well, so callers that catch ValueError keep working. Messages say
where, what was expected and what arrived. Solver trouble inside scripted code is not raised
but returned as a per-trajectory status (see `hybrid_twin.solvers.SolverStatus`); `SolverError`
is what eager code raises after reading that status.
"""

from __future__ import annotations

from collections.abc import Iterable


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
