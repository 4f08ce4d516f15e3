"""Error bodies: every refusal says which field was wrong and why, in one shape.

Data flow: a pydantic failure (RequestValidationError), a route's own check (`field_error`)
or an oversize body (serving/limits.py) -> `{"detail": [{"loc": [...], "msg": ..., "type":
...}]}` with a 4xx status. The input is never echoed back (it may be a megabyte). Anything
else is a bug of ours: logged with its traceback, answered 500 without internals.
"""

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

log = logging.getLogger("serving")


def detail(loc: list, msg: str, kind: str) -> list[dict]:
    return [{"loc": list(loc), "msg": msg, "type": kind}]


def field_error(status: int, loc: list, msg: str, kind: str,
                headers: dict | None = None) -> HTTPException:  # fmt: skip
    """An HTTPException whose body names the field: raise field_error(409, ["body", ...], ...)."""
    return HTTPException(status_code=status, detail=detail(loc, msg, kind), headers=headers)


def _item(error: dict) -> dict:
    loc, msg = list(error.get("loc", ())), str(error.get("msg", ""))
    if error.get("type") == "json_invalid" and len(loc) == 2 and isinstance(loc[1], int):
        # FastAPI puts the character offset in `loc` and the parser's reason in `ctx`,
        # which the shape of docs/serving.md drops: say both in the message.
        reason = (error.get("ctx") or {}).get("error", "")
        loc, msg = ["body"], f"malformed JSON at character {loc[1]}: {reason}".rstrip(": ")
    return {"loc": loc, "msg": msg, "type": str(error.get("type", "value_error"))}


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    items = [_item(e) for e in error.errors()]
    return JSONResponse({"detail": items}, status_code=422)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    body, status = error.detail, error.status_code
    if status == 400 and not isinstance(body, list):  # FastAPI: a body it cannot decode
        body, status = detail(["body"], f"{body}: expected a UTF-8 JSON document",
                              "json_invalid"), 422  # fmt: skip
    elif not isinstance(body, list):  # Starlette's own (404 route, 405 method): same shape
        body = detail(["path"], str(body), "http_error")
    return JSONResponse({"detail": body}, status_code=status,
                        headers=getattr(error, "headers", None))  # fmt: skip


async def _bug(request: Request, error: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": detail([], "internal error (a bug of the service; it is "
                                              "logged)", "internal_error")}, status_code=500)


# Routes answered without a token (serving/routes_model.py's ops_router).
OPEN_PATHS = ("/healthz", "/readyz")


def install_error_handlers(app: FastAPI, check_token=None) -> None:
    """The handlers that give every error the `detail` shape of docs/serving.md.

    Args:
        check_token: async (request) -> None raising the 401 HTTPException; run before a
            validation error is answered, since FastAPI validates a body before the token
            dependency runs (a malformed body without a token answered 422, not 401).
    """
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        if check_token is not None and request.url.path not in OPEN_PATHS:
            try:
                await check_token(request)
            except StarletteHTTPException as refused:
                return await _http_error(request, refused)
        return await _validation_error(request, error)

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _bug)
