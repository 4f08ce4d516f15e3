"""Prometheus metrics of the service, and the ASGI middleware that times every request.

Data flow: every HTTP request -> `MetricsMiddleware` (count by method, route template and
status; latency histogram by method and route) ; the batcher adds batch sizes, updates and
alarms; the routes add sessions and reloads -> `GET /metrics` (text exposition format). One
`CollectorRegistry` per app, so two apps in a process (tests) do not share counters.
"""

import gc
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import BaseRoute, Match

# Request latency buckets around the 20 ms p99 target, finer below it.
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the answer


class ServiceMetrics:
    """The service's counters, gauges and histograms in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("twin_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)  # fmt: skip
        self.latency = Histogram("twin_http_request_duration_seconds",
                                 "time from request to the end of the response",
                                 ["method", "route"], buckets=LATENCY_BUCKETS,
                                 registry=r)  # fmt: skip
        self.updates = Counter("twin_updates", "grid steps run by monitoring sessions",
                               registry=r)  # fmt: skip
        self.batch_size = Histogram("twin_update_batch_size", "rows per batched update call",
                                    buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.alarms_raised = Counter("twin_alarms_raised",
                                     "alarms raised: a session's alarm going from off to on",
                                     registry=r)  # fmt: skip
        self.alarm_steps = Counter("twin_alarm_steps", "grid steps with the alarm on",
                                   registry=r)  # fmt: skip
        self.sessions_open = Gauge("twin_sessions_open", "open monitoring sessions",
                                   registry=r)  # fmt: skip
        self.sessions_expired = Counter("twin_sessions_expired",
                                        "sessions dropped after idle_expiry_s", registry=r)
        self.posts_replayed = Counter("twin_posts_replayed", "observation posts that repeated "
                                      "the last applied one, answered as it was", registry=r)
        self.reloads = Counter("twin_model_reloads", "model reload attempts by result",
                               ["result"], registry=r)  # fmt: skip
        self.housekeeping_errors = Counter(
            "twin_housekeeping_errors", "housekeeping passes (idle expiry, reload poll) that "
            "failed on an unexpected error, logged with its traceback", registry=r)  # fmt: skip
        self.model_info = Gauge("twin_model_info", "the twin served (value 1) and its format",
                                ["version", "sha256", "format"], registry=r)  # fmt: skip
        self.heap_frozen = Gauge("twin_heap_frozen_objects",
                                 "objects the cyclic GC skips (frozen at start-up and after a "
                                 "reload; 0 where not frozen, serving/heap.py)",
                                 registry=r)  # fmt: skip
        self.heap_frozen.set_function(gc.get_freeze_count)

    def set_model(self, twin) -> None:
        """Name the twin now served (a LoadedTwin: label, sha256, format)."""
        self.model_info.clear()
        self.model_info.labels(version=twin.label, sha256=twin.sha256, format=twin.format).set(1)


class MetricsMiddleware:
    """Pure ASGI middleware (no per-request task, unlike BaseHTTPMiddleware): counts and
    times each HTTP request under its route template (`/v1/sessions/{session_id}`, never the
    raw path, so ids do not multiply the series); unmatched paths count as `unmatched`. A
    request the client dropped before the app answered (during the upload) counts as status
    499 (nginx's "client closed request"), not as a failure of the service; one the app ran
    to its end counts with its own status, whether or not its client is still there.

    Args:
        app: the ASGI app inside.
        metrics: where requests are counted.
        routes: the app's routes (full paths), to name the route of a request answered before
            routing: a 413 of the body limit, a client gone during the upload.
    """

    def __init__(self, app, metrics: ServiceMetrics, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = tuple(routes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [None]
        disconnected = [False]

        async def receive_noting_disconnect():
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected[0] = True
            return message

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive_noting_disconnect, send_status)
        finally:
            code = status[0] or (CLIENT_CLOSED if disconnected[0] else 500)
            path = route_template(scope, self.routes)
            method = scope["method"]
            self.metrics.requests.labels(method, path, str(code)).inc()
            self.metrics.latency.labels(method, path).observe(time.perf_counter() - started)


def route_template(scope, routes: Sequence[BaseRoute]) -> str:
    """The template of the route a request matched; for one answered before routing, the one
    of `routes` it would have matched; `unmatched` where none would."""
    route = scope.get("route") or _route_for(scope, routes)
    return getattr(route, "path", None) or "unmatched"


def _route_for(scope, routes: Sequence[BaseRoute]) -> BaseRoute | None:
    """The route a router would take (as Starlette's does: a full match first, else one of
    the path with another method). Run only for requests that did not reach the router (a
    404 path, a refused upload): one regex per route, 11 routes."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route
        if match is Match.PARTIAL and partial is None:
            partial = route
    return partial
