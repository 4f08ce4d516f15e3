"""Refuse oversize request bodies before anything parses them.

Data flow: HTTP request -> `BodyLimitMiddleware` (413 when Content-Length or the bytes
actually streamed exceed `max_body_bytes`) -> the app, which receives the buffered body.
Checking the streamed bytes too covers chunked uploads that send no Content-Length.
"""

import json

BODY_METHODS = {"POST", "PUT", "PATCH"}


class BodyLimitMiddleware:
    """Pure ASGI middleware: buffers a request body of at most `max_bytes`, else 413."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # no one to answer: MetricsMiddleware counts it as 499
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, size)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send, size: int) -> None:
        body = json.dumps({"detail": [{
            "loc": ["body"], "type": "payload_too_large",
            "msg": f"request body of {size}+ bytes exceeds limits.max_body_bytes = "
                   f"{self.max_bytes}",
        }]}).encode()  # fmt: skip
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})
