"""Refuse oversize, slow and unauthorised request bodies before anything parses them.

Data flow: HTTP request -> `BodyLimitMiddleware` (no valid bearer token: the app gets an empty
body and answers 401, not a byte read; 413 when Content-Length or the bytes actually streamed
exceed `max_body_bytes`; 408 when the body is not in after `body_timeout_s`) -> the app, which
receives the buffered body. Checking the streamed bytes too covers chunked uploads that send no
Content-Length.
"""

import asyncio
import json
from collections.abc import Callable

BODY_METHODS = {"POST", "PUT", "PATCH"}


class BodyLimitMiddleware:
    """Pure ASGI middleware: buffers a request body of at most `max_bytes`, within
    `timeout_s`, of a request whose Authorization header `authorised` admits (None: all).

    Why the token first: a client without one could otherwise hold max_bytes of memory and a
    connection open per request for as long as it liked (64 such uploads: +65 MiB)."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 30.0,
                 authorised: Callable[[bytes | None], bool] | None = None) -> None:  # fmt: skip
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.authorised = authorised

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.authorised is not None and not self.authorised(headers.get(b"authorization")):
            await self.app(scope, _no_body(receive), send)  # the route's token check: 401
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send, int(declared))
            return
        chunks, size, more = [], 0, True
        try:
            async with asyncio.timeout(self.timeout_s):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # no one to answer: MetricsMiddleware counts it as 499
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        await self._too_large(send, size)
                        return
                    chunks.append(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            await self._refuse(send, 408, "body_timeout",
                               f"request body not complete after limits.body_timeout_s = "
                               f"{self.timeout_s:g} s ({size} bytes in)")  # fmt: skip
            return
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send, size: int) -> None:
        await self._refuse(send, 413, "payload_too_large", f"request body of {size}+ bytes "
                           f"exceeds limits.max_body_bytes = {self.max_bytes}")  # fmt: skip

    async def _refuse(self, send, status: int, kind: str, msg: str) -> None:
        body = json.dumps({"detail": [{"loc": ["body"], "type": kind, "msg": msg}]}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


def _no_body(receive):
    """A receive that gives the app an empty body first (the rest is never buffered)."""
    given = False

    async def empty():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return await receive()

    return empty
