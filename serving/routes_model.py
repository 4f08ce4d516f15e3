"""`/v1/forecast`, `/v1/model`, `/v1/model/reload`, `/metrics`, `/healthz`, `/readyz`.

Data flow: forecast body (lines of past rows + future inputs) -> one batched `forecast` call
of the current twin on its own thread (a long forecast holds up monitoring updates only where
the twin's calls hold the GIL: the PT2 formats, serving/batcher.py) -> predicted measurement
tags per future row. The model routes show what is served and swap in a newer version
(serving/twin_store.py); health and readiness need no token.
"""

import asyncio
import json

import torch
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.errors import field_error
from serving.routes_monitoring import errors, row_values
from serving.schemas import ForecastResponse, ModelInfo, ReloadResponse, Status
from serving.service import FastJSONResponse, Service
from serving.twin_file import TwinFileError
from serving.twin_store import IncompatibleTwinError


def _forecast(twin, past_u: list, past_y: list, future_u: list) -> list:
    dtype = twin.dtype
    with torch.inference_mode():
        y = twin.module.forecast(torch.tensor(past_u, dtype=dtype),
                                 torch.tensor(past_y, dtype=dtype),
                                 torch.tensor(future_u, dtype=dtype))  # fmt: skip
    return y.tolist()


def model_router(service: Service) -> APIRouter:
    """Forecast, model metadata and reload (token required)."""
    router = APIRouter(prefix="/v1", tags=["model"])
    schemas = service.schemas

    @router.post("/forecast", response_model=ForecastResponse, responses=errors(401, 413, 422),
                 summary="forecast lines open loop (stateless)")
    async def forecast(body: schemas.ForecastRequest) -> FastJSONResponse:
        """Estimate each line's state from its past rows, then run the twin open loop over its
        future inputs. Lines are forecast together, so they share their row counts."""
        lines = body.lines
        n_past, n_future = len(lines[0].past), len(lines[0].future_inputs)
        for i, line in enumerate(lines):
            for name, n, ref in (("past", len(line.past), n_past),
                                 ("future_inputs", len(line.future_inputs), n_future)):
                if n != ref:
                    raise field_error(422, ["body", "lines", i, name],
                                      f"{n} rows, but lines[0].{name} has {ref}: every line "
                                      "of one request needs the same number", "unequal_rows")
        past = [[row_values(row) for row in line.past] for line in lines]
        past_u = [[r[0] for r in rows] for rows in past]
        past_y = [[r[1] for r in rows] for rows in past]
        future = [[list(row.__dict__.values()) for row in line.future_inputs] for line in lines]
        twin = service.store.current
        y = await asyncio.get_running_loop().run_in_executor(
            service.forecast_executor, _forecast, twin, past_u, past_y, future)
        tags = schemas.measurement_tags
        return FastJSONResponse({
            "model_version": twin.label,
            "dt_s": schemas.dt_s,
            "lines": [{"predicted": [dict(zip(tags, step, strict=True)) for step in line]}
                      for line in y],
        })  # fmt: skip

    @router.get("/model", response_model=ModelInfo, responses=errors(401),
                summary="the twin served and its metadata")
    async def model() -> FastJSONResponse:
        """Version, file digest, source, the format running (torchscript, export or aoti; with
        `format: auto`, the faster ones skipped and why) and the file's metadata.json (tags,
        units, dt, the detector's thresholds, the training run and data hash, the latencies
        of every format measured at export)."""
        return FastJSONResponse(service.model_body())

    @router.post("/model/reload", response_model=ReloadResponse, responses=errors(401, 409, 422),
                 summary="load the configured model again (hot reload)")
    async def reload(request: Request) -> FastJSONResponse:
        """Load the configured `model_uri` again (the alias' version now, or the file as it is
        now) and swap it in without stopping: requests in flight finish on the old twin.
        Takes no body (another model needs its own service). Refused (the old one stays) if
        it cannot be read or has other tags, tag units, states, dt or dtype."""
        check_no_body(await request.body())
        previous = service.store.current.label
        try:
            twin, changed = await service.store.reload()
        except TwinFileError as error:
            service.metrics.reloads.labels("failed").inc()
            raise field_error(422, ["model_uri"], str(error), "twin_file") from None
        except IncompatibleTwinError as error:
            service.metrics.reloads.labels("incompatible").inc()
            raise field_error(409, ["model_uri"], str(error), "incompatible_twin") from None
        service.metrics.reloads.labels("changed" if changed else "unchanged").inc()
        service.metrics.set_model(twin)
        return FastJSONResponse({"changed": changed, "previous": previous,
                                 "current": service.model_body()})  # fmt: skip

    return router


def check_no_body(raw: bytes) -> None:
    """Refuse a reload body: the route reloads the configured model_uri only, and silently
    ignoring a `model_uri` sent would reload something other than the client asked for.
    Nothing, or an empty JSON object, is accepted.

    Raises:
        HTTPException: 422 naming the first field sent (or the body, if not an object).
    """
    if not raw.strip():
        return
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
        body = None
    if body == {}:
        return
    loc = ["body", next(iter(body))] if isinstance(body, dict) else ["body"]
    raise field_error(422, loc, "POST /v1/model/reload takes no body: it reloads the "
                      "configured model_uri; another model needs a service started on it",
                      "extra_forbidden")  # fmt: skip


def ops_router(service: Service, auth) -> APIRouter:
    """Health (no token), readiness (no token) and Prometheus metrics (token)."""
    from fastapi import Depends

    router = APIRouter(tags=["operations"])

    @router.get("/healthz", response_model=Status, summary="liveness")
    async def healthz() -> dict:
        """200 while the process serves HTTP."""
        return {"status": "ok"}

    @router.get("/readyz", response_model=Status, responses={503: {"model": Status}},
                summary="readiness")
    async def readyz() -> Response:
        """200 once the twin is loaded and the batcher runs; 503 before and while stopping."""
        if not service.ready:
            return FastJSONResponse({"status": "not ready"}, status_code=503)
        twin = service.store.current
        return FastJSONResponse({"status": "ready", "model_version": twin.label,
                                 "format": twin.format})  # fmt: skip

    @router.get("/metrics", dependencies=[Depends(auth)], responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
        **errors(401)}, response_class=Response, summary="Prometheus metrics")  # fmt: skip
    async def metrics() -> Response:
        """Request counts and latency by route, updates, batch sizes, alarms raised, open
        sessions, reloads, the model served."""
        service.metrics.sessions_open.set(len(service.registry))
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
