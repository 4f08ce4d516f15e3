"""`create_app`: the FastAPI application around one served twin.

Data flow: `ServeSettings` -> the twin loaded (file or registry) -> its `TagSchemas` ->
`Service` (store, sessions, batcher, metrics) -> routes under /v1 behind the bearer token,
health and readiness open -> middleware (body limit, metrics) -> uvicorn (serving/server.py).
The lifespan starts the batcher and the housekeeping task (idle expiry, optional reload poll)
and marks the service ready; on shutdown (after uvicorn has closed its port and let requests
in flight finish) it logs the sessions lost and stops them.
"""

import asyncio
import contextlib
import logging

from fastapi import Depends, FastAPI

from serving.auth import header_check, request_token_check, token_dependency
from serving.batcher import UpdateBatcher
from serving.errors import install_error_handlers
from serving.heap import refreeze
from serving.limits import BodyLimitMiddleware
from serving.metrics import MetricsMiddleware, ServiceMetrics
from serving.routes_model import model_router, ops_router
from serving.routes_monitoring import sessions_router
from serving.schemas import TagSchemas
from serving.service import Service
from serving.sessions import SessionRegistry
from serving.settings import ServeSettings
from serving.twin_file import LoadedTwin
from serving.twin_store import IncompatibleTwinError, TwinStore, load_twin

log = logging.getLogger("serving")
API_VERSION = "1"


def build_service(settings: ServeSettings, twin: LoadedTwin) -> Service:
    """The service's parts around a loaded twin (no event loop needed yet)."""
    store = TwinStore(twin, settings.model_uri, settings.tracking_uri, settings.format)
    metrics = ServiceMetrics()
    metrics.set_model(twin)
    registry = SessionRegistry(settings.sessions.max_sessions, settings.sessions.idle_expiry_s,
                               on_expired=metrics.sessions_expired.inc)
    batcher = UpdateBatcher(store, registry, metrics, settings.max_batch)
    schemas = TagSchemas(twin.metadata, settings.limits)
    return Service(settings, store, schemas, registry, batcher, metrics)


async def housekeeping(service: Service) -> None:
    """Drop idle sessions, reload when the model_uri's target changed (if polling), and
    re-freeze the heap after a reload (serving/heap.py). A pass that fails on an unexpected
    error is logged with its traceback and counted (twin_housekeeping_errors_total); the next
    pass runs as usual, so that expiry and polling never stop."""
    poll = service.settings.reload_poll_s
    expiry = service.settings.sessions.idle_expiry_s
    period = min(x for x in (poll or expiry, expiry / 4, 30.0) if x > 0)
    frozen_with = service.store.current
    while True:
        await asyncio.sleep(period)
        try:
            frozen_with = await housekeeping_pass(service, frozen_with)
        except Exception:
            service.metrics.housekeeping_errors.inc()
            log.exception("housekeeping pass failed (the next one runs in %g s)", period)


async def housekeeping_pass(service: Service, frozen_with: LoadedTwin) -> LoadedTwin:
    """One pass of `housekeeping`; returns the twin the heap is now frozen with."""
    if service.registry.expire():
        service.metrics.sessions_open.set(len(service.registry))
    if service.store.current is not frozen_with:
        # a reload (poll or route) swapped the twin: let the old one's cycles go and freeze
        # the new one (heap.py). A batch still on the old twin at this moment (TorchScript's
        # thread) keeps its cycles until the next reload; refcounting frees the rest.
        frozen_with = service.store.current
        refreeze()
    if service.settings.reload_poll_s and await service.store.changed_upstream():
        await poll_reload(service)
    return frozen_with


async def poll_reload(service: Service) -> None:
    """Reload the changed model_uri; a file that cannot be served is logged and counted."""
    try:
        twin, changed = await service.store.reload()
    except IncompatibleTwinError as error:  # labelled as the reload route labels it
        service.metrics.reloads.labels("incompatible").inc()
        log.error("reload poll: %s", error)
        return
    except (ValueError, OSError) as error:  # TwinFileError, an unreadable file
        service.metrics.reloads.labels("failed").inc()
        log.error("reload poll: %s", error)
        return
    except Exception:
        service.metrics.reloads.labels("failed").inc()
        raise  # not a file's fault: the pass logs it with its traceback
    service.metrics.reloads.labels("changed" if changed else "unchanged").inc()
    service.metrics.set_model(twin)


def create_app(settings: ServeSettings, twin: LoadedTwin | None = None) -> FastAPI:
    """The ASGI app serving `twin` (default: loaded now from settings.model_uri).

    Raises:
        TwinFileError: the model cannot be loaded (the service does not start).
    """
    twin = twin or load_twin(settings.model_uri, settings.tracking_uri, settings.format)
    service = build_service(settings, twin)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        task = asyncio.get_running_loop().create_task(housekeeping(service))
        service.ready = True
        served = service.store.current  # not `twin`: the closure would keep it past release()
        log.info("serving twin %s from %s: format %s (%s), setting %s", served.label,
                 served.source, served.format, served.file, settings.format)  # fmt: skip
        del served
        try:
            yield
        finally:
            service.ready = False
            if open_now := service.registry.open_sessions():  # their state is not kept
                log.warning("stopping with %d open session(s), of lines %s: they are lost",
                            len(open_now), ", ".join(s.line_id for s in open_now))  # fmt: skip
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await service.batcher.stop()
            service.forecast_executor.shutdown(wait=True)
            service.store.release()

    meta = twin.metadata
    app = FastAPI(
        title=f"{meta.get('registered_model') or 'hybrid twin'} service",
        version=API_VERSION,
        summary="Forecast and per-line monitoring with one exported hybrid twin",
        description=(
            f"Serves the twin file `{twin.source}` ({meta.get('model_kind')} model, "
            f"dt_s = {meta['dt_s']} s). Tags are named as in the plant's tag dictionary, "
            "values in the units each field states. Every route under /v1 and /metrics needs "
            "`Authorization: Bearer <token>`; /healthz and /readyz do not. Errors are 4xx with "
            "`detail[].loc` naming the field."
        ),
        lifespan=lifespan,
        # The schema names every tag of the line: it is served behind the token (below), and
        # the interactive docs, which would fetch it without one, are off.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    auth = token_dependency(settings.tokens)
    install_error_handlers(app, request_token_check(auth))
    routers = [ops_router(service, auth), model_router(service), sessions_router(service)]
    app.include_router(routers[0])
    for router in routers[1:]:
        app.include_router(router, dependencies=[Depends(auth)])

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(auth)])
    async def openapi() -> dict:
        return app.openapi()

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes,
                       timeout_s=settings.limits.body_timeout_s,
                       authorised=header_check(settings.tokens))  # fmt: skip
    app.add_middleware(MetricsMiddleware, metrics=service.metrics,
                       routes=[route for router in routers for route in router.routes])  # fmt: skip
    return app
