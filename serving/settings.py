"""The service's settings: `configs/serve.yaml` (through `twin serve`) as a typed, checked object.

Data flow: Hydra config (a plain mapping by the time it arrives here) + `TWIN_SERVE_TOKENS`
from the environment -> `ServeSettings` -> `create_app` / uvicorn. A misspelt key, a bad limit
or an unsafe combination (no token on a non-loopback host) fails here, before anything loads.
"""

import ipaddress
import os
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

TOKENS_ENV = "TWIN_SERVE_TOKENS"  # comma-separated bearer tokens; kept out of argv and files
LOOPBACK_NAMES = {"localhost"}


class SettingsError(ValueError):
    """The service settings are invalid or unsafe; the message names the key."""


class Limits(BaseModel):
    """Upper bounds on what one request may carry (each a 4xx when exceeded)."""

    model_config = ConfigDict(extra="forbid")
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_rows_per_post: int = Field(120, ge=1)
    max_past_rows: int = Field(720, ge=2)
    max_forecast_lines: int = Field(64, ge=1)
    max_forecast_steps: int = Field(720, ge=1)
    max_gap_steps: int = Field(60, ge=1)
    max_abs_value: float = Field(1.0e6, gt=0)
    # a body still arriving after this long is refused (408): slow uploads held memory and a
    # connection for as long as the client liked
    body_timeout_s: float = Field(30.0, gt=0)


class SessionSettings(BaseModel):
    """How many monitoring sessions are kept and for how long an idle one survives."""

    model_config = ConfigDict(extra="forbid")
    max_sessions: int = Field(256, ge=1)
    idle_expiry_s: float = Field(3600.0, gt=0)
    top_contributions: int = Field(3, ge=1)


class ServeSettings(BaseModel):
    """Everything `create_app` and uvicorn need (configs/serve.yaml documents each key)."""

    model_config = ConfigDict(extra="forbid")
    model_uri: str = Field(min_length=1)
    format: Literal["auto", "torchscript", "export", "aoti"] = "auto"
    tracking_uri: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    tokens: list[str] = Field(default_factory=list)
    insecure: bool = False
    max_batch: int = Field(64, ge=1)
    reload_poll_s: float = Field(0.0, ge=0)
    num_threads: int = Field(1, ge=1)
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    limits: Limits = Field(default_factory=Limits)
    sessions: SessionSettings = Field(default_factory=SessionSettings)


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(config: Mapping, environ: Mapping[str, str] | None = None) -> ServeSettings:
    """Typed settings from a config mapping plus the tokens in `TWIN_SERVE_TOKENS`.

    Args:
        config: the keys of configs/serve.yaml (a plain dict; Hydra's `hydra` key excluded).
        environ: the environment to read tokens from (default os.environ).

    Returns:
        The checked settings; `tokens` holds the config's tokens and the environment's.

    Raises:
        SettingsError: an unknown key, a value out of range, an empty token, or no token
            configured without `insecure=true` on a loopback host.
    """
    environ = os.environ if environ is None else environ
    try:
        settings = ServeSettings.model_validate(dict(config))
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise SettingsError(f"serve settings: {problems}") from error
    from_env = [t.strip() for t in environ.get(TOKENS_ENV, "").split(",") if t.strip()]
    tokens = [str(t) for t in settings.tokens] + from_env
    if any(not t.strip() for t in tokens):
        raise SettingsError("serve settings: tokens: an empty token would accept anyone")
    if any(not t.isascii() for t in tokens):  # HTTP headers carry them as latin-1 bytes
        raise SettingsError("serve settings: tokens: a token of other than ASCII characters "
                            "cannot be sent as clients send it (HTTP headers are latin-1)")
    settings.tokens = tokens
    check_security(settings)
    return settings


def check_security(settings: ServeSettings) -> None:
    """Refuse to run without authentication unless asked to, and then only on loopback.

    Raises:
        SettingsError: no token configured and not (insecure and a loopback host).
    """
    if settings.tokens:
        return
    if not settings.insecure:
        raise SettingsError(
            f"serve settings: no bearer token configured: set {TOKENS_ENV}=<token>[,<token>] "
            "or tokens=[...]; to run without authentication on this machine only, give "
            "insecure=true with a loopback host"
        )
    if not is_loopback(settings.host):
        raise SettingsError(
            f"serve settings: insecure=true is refused on host {settings.host!r}: without "
            "tokens the service binds to a loopback address only (127.0.0.1, ::1, localhost)"
        )
