"""Bearer-token authentication for every endpoint but /healthz and /readyz.

Data flow: `Authorization: Bearer <token>` -> `require_token` (constant-time comparison with
each configured token, secrets.compare_digest) -> the route, or 401 naming the header. With
no token configured (only allowed by settings with insecure=true on loopback) it lets all in.
"""

import secrets

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serving.errors import field_error

bearer = HTTPBearer(auto_error=False, description="a token from TWIN_SERVE_TOKENS or tokens")
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _matches(given: bytes, known: list[bytes]) -> bool:
    """Whether `given` is one of the tokens, compared with every one (no early exit: the time
    does not tell which one matched)."""
    return any([secrets.compare_digest(given, token) for token in known])


def token_dependency(tokens: list[str]):
    """A FastAPI dependency that admits a request carrying one of `tokens`."""
    known = [t.encode() for t in tokens]

    async def require_token(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        if not known:
            return
        if credentials is None:
            raise field_error(401, ["header", "Authorization"],
                              "missing bearer token: send `Authorization: Bearer <token>`",
                              "missing_token", CHALLENGE)  # fmt: skip
        if not _matches(credentials.credentials.encode(), known):
            raise field_error(401, ["header", "Authorization"], "invalid bearer token",
                              "invalid_token", CHALLENGE)  # fmt: skip

    return require_token


def header_check(tokens: list[str]):
    """For the body limit middleware: whether a raw `Authorization` header (bytes, as the
    client sent them) carries one of `tokens`; None when there are no tokens (all admitted)."""
    if not tokens:
        return None
    known = [t.encode() for t in tokens]

    def authorised(header: bytes | None) -> bool:
        scheme, _, given = (header or b"").strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return _matches(given.strip(), known)

    return authorised


def request_token_check(require_token):
    """`require_token` run on a request by hand: FastAPI validates a body before it runs any
    dependency, so the validation error handler asks for the token first (401 before 422)."""

    async def check(request) -> None:
        await require_token(await bearer(request))

    return check
