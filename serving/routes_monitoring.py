"""`/v1/sessions`: per-line monitoring sessions (create, post observations, read, close).

Data flow: a past window -> the twin's `initial_state` -> a session; each posted row, in
time order -> one batched `update` (serving/batcher.py), gaps bridged by predicted rows ->
state estimate, predicted tags, T^2 / EWMA statistics, alarm and top contributing tags. The
session's lock is held for a whole post, so two posts to one session run one after the
other; every row is placed on the session's time grid (`grid_steps`) before any row runs; a
post runs on one twin, and one refused midway is undone (the session restored as it was).
"""

import hashlib
import math
from datetime import datetime, timedelta

import torch
from fastapi import APIRouter, Path, Request, Response

from serving.errors import field_error
from serving.schemas import ErrorResponse, ObservationResponse, SessionInfo, SessionSummary
from serving.service import FastJSONResponse, Service
from serving.sessions import LineBusyError, Session, SessionLimitError, UnknownSessionError

SESSION_ID = Path(max_length=64, description="the id returned when the session was created")


def errors(*codes: int) -> dict:
    return {code: {"model": ErrorResponse} for code in codes}


def row_values(row) -> tuple[list[float], list[float], list[bool]]:
    """(inputs, measurement with NaN where not sampled, mask) of a validated Observation."""
    inputs = list(row.inputs.__dict__.values())
    sampled = list(row.measurements.__dict__.values())
    return inputs, [math.nan if v is None else v for v in sampled], [v is not None for v in sampled]


def grid_index(timestamp: datetime, origin: datetime, dt_s: float) -> int:
    """The point of a session's time grid (origin + n * dt_s) nearest `timestamp`: n =
    round((timestamp - origin) / dt_s), halves rounded up, computed in whole microseconds so
    that it is exact however long the session runs."""
    dt_us = round(dt_s * 1e6)
    delta_us = (timestamp - origin) // timedelta(microseconds=1)
    return (2 * delta_us + dt_us) // (2 * dt_us)


def grid_steps(rows, origin: datetime, taken: int, dt_s: float, max_gap: int,
               where: list) -> list[int]:  # fmt: skip
    """Grid steps each row advances the session (1 = the next grid point; > 1 = a gap).

    A row lands on the session's grid point nearest its timestamp (`grid_index`) and advances
    from the point the row before it reached (the first row: from `taken`, the steps the
    session has run). Counted on the grid, not from the previous row, jitter in the rows'
    timestamps does not add up: the twin's time stays within dt_s / 2 of the plant's.

    Raises:
        HTTPException: 409 for a first row not at least dt_s / 2 after the session's grid
            point (it would land on it), 422 for a later row that lands on or before the row
            before it, or a gap above max_gap steps.
    """
    dt = timedelta(seconds=dt_s)
    steps = []
    for i, row in enumerate(rows):
        reached = grid_index(row.timestamp, origin, dt_s)
        k = reached - taken
        loc = [*where, i, "timestamp"]
        point = origin + taken * dt
        if k < 1:
            before = "the session's last row" if i == 0 else f"row {i - 1}"
            raise field_error(
                409 if i == 0 else 422, loc,
                f"{row.timestamp.isoformat()} is on grid point {reached} of the session (every "
                f"dt_s = {dt_s:g} s from {origin.isoformat()}), not after {before}'s point "
                f"{taken} at {point.isoformat()}: rows go in time order, each at least "
                f"dt_s/2 = {dt_s / 2:g} s after the grid point of the one before",
                "timestamp_not_after_last" if i == 0 else "timestamp_out_of_order",
            )  # fmt: skip
        if k > max_gap:
            raise field_error(
                422, loc, f"a gap of {k} grid steps since {point.isoformat()} exceeds "
                f"limits.max_gap_steps = {max_gap}: close the session and start a new one",
                "gap_too_long")  # fmt: skip
        steps.append(k)
        taken = reached
    return steps


def check_consecutive(rows, dt_s: float, where: list) -> None:
    """Past-window rows must sit on consecutive points of a dt_s grid from the first row,
    each within dt_s / 2 of its point, as observations are placed on the session's grid.
    Checked row by row against the row before, jitter added up: rows 7.4 s apart at dt_s
    5 s passed, and 37 s of plant time ran as 25 s.

    Raises:
        HTTPException: 422 naming the first row that is not on its point.
    """
    first = rows[0].timestamp
    for i, row in enumerate(rows):
        point = grid_index(row.timestamp, first, dt_s)
        if point != i:
            raise field_error(
                422, [*where, i, "timestamp"],
                f"{row.timestamp.isoformat()} is on grid point {point} counted from row 0 "
                f"({first.isoformat()}), not {i}: the past window needs consecutive rows, one "
                f"every dt_s = {dt_s:g} s, each within dt_s/2 of its point",
                "past_not_consecutive")  # fmt: skip


def _initial_state(twin, u: list, y: list) -> tuple[torch.Tensor, ...] | None:
    with torch.inference_mode():
        state = twin.module.initial_state(torch.tensor([u], dtype=twin.dtype),
                                          torch.tensor([y], dtype=twin.dtype))  # fmt: skip
    finite = all(bool(torch.isfinite(t).all()) for t in state[:2])
    return tuple(t.clone() for t in state) if finite else None


def sessions_router(service: Service) -> APIRouter:
    """The /v1/sessions routes, with bodies typed by the served twin's tags."""
    router = APIRouter(prefix="/v1/sessions", tags=["monitoring"])
    schemas, registry, batcher = service.schemas, service.registry, service.batcher
    limits = service.settings.limits
    dt = timedelta(seconds=schemas.dt_s)

    def open_session(session_id: str) -> Session:
        try:
            return registry.get(session_id)
        except UnknownSessionError:
            service.metrics.sessions_open.set(len(registry))  # get() may have expired it
            raise field_error(404, ["path", "session_id"], f"no open session {session_id!r} "
                              "(never created, closed, or expired after idle_expiry_s)",
                              "unknown_session") from None  # fmt: skip

    @router.post("", status_code=201, response_model=SessionInfo,
                 responses=errors(401, 409, 413, 422, 429), summary="open a line's session")
    async def create_session(body: schemas.SessionCreate) -> FastJSONResponse:
        """Estimate the line's state from a past window and open a monitoring session."""
        check_consecutive(body.past, schemas.dt_s, ["body", "past"])
        try:
            registry.check_room(body.line_id)
        except (LineBusyError, SessionLimitError) as error:
            raise _no_room(error) from None
        columns = [row_values(row) for row in body.past]
        u, y = [c[0] for c in columns], [c[1] for c in columns]
        twin = service.store.current
        state = await batcher.run_torch(_initial_state, twin, u, y)
        if state is None:
            raise field_error(422, ["body", "past"], "the initial state estimated from these "
                              "rows is not finite: check the values", "state_not_finite")
        try:  # the line or the last slot may have been taken while the state ran
            session = registry.add(body.line_id, body.past[-1].timestamp, state, twin.label)
        except (LineBusyError, SessionLimitError) as error:
            raise _no_room(error) from None
        service.metrics.sessions_open.set(len(registry))
        async with session.lock:
            return FastJSONResponse(service.session_body(session), status_code=201)

    @router.get("", response_model=list[SessionSummary], responses=errors(401),
                summary="list open sessions")
    async def list_sessions() -> list[dict]:
        """Open sessions: id, line, last timestamp, steps run, alarm (as each one's last
        whole post left it: a post in flight shows once it is done)."""
        registry.expire()
        return [s.listed for s in registry.open_sessions()]

    @router.post("/{session_id}/observations", response_model=ObservationResponse,
                 responses=errors(401, 404, 409, 413, 422), summary="post observations")
    async def post_observations(
        body: schemas.ObservationBatch, request: Request, session_id: str = SESSION_ID
    ) -> Response:
        """Run the twin over new rows, in time order: one result per row. All of them or
        none: a post refused midway leaves the session as it was."""
        session = open_session(session_id)
        async with session.lock:
            if session.closed:
                open_session(session_id)  # raises 404: closed while this post waited
            rows = body.observations
            # the body as sent (FastAPI has read it already): a retry sends the same bytes
            digest = hashlib.sha256(await request.body()).digest()
            if session.last_post is not None and digest == session.last_post[0]:
                # a retry of the post applied last (its client timed out): its answer again,
                # not a 409 that loses the rows' results, alarms raised and cleared among them
                service.metrics.posts_replayed.inc()
                registry.used(session)
                return Response(session.last_post[1], media_type="application/json",
                                headers={"X-Twin-Replayed": "1"})  # fmt: skip
            steps = grid_steps(rows, session.grid_origin, session.n_updates, schemas.dt_s,
                               limits.max_gap_steps, ["body", "observations"])  # fmt: skip
            twin = service.store.current  # the whole post runs on the twin served now
            # One step is stored only if its state is finite (batcher.py): only a longer post
            # can leave something to undo, and it pays for the copy of the state.
            undo = registry.snapshot(session) if sum(steps) > 1 else None
            try:
                results = await run_rows(session, twin, rows, steps)
            except Exception:  # no step of this post is in flight once one has failed
                if undo is not None:
                    registry.restore(session, undo)
                raise
            session.last_result = results[-1]
            session.model_version = twin.label
            session.publish()
            body_out = {"session_id": session.session_id, "line_id": session.line_id,
                        "model_version": twin.label, "n_updates": session.n_updates,
                        "results": results}  # fmt: skip
            response = FastJSONResponse(body_out)
            session.last_post = (digest, response.body)
            registry.used(session)
        return response

    async def run_rows(session: Session, twin, rows, steps: list[int]) -> list[dict]:
        """Each row's steps through the batcher, a gap's missing grid points bridged first.

        Raises:
            HTTPException: 422 at the first step whose state is not finite (not stored).
        """
        n_y = len(schemas.measurement_tags)
        nothing, no_mask = [math.nan] * n_y, [False] * n_y
        results = []
        for i, (row, k) in enumerate(zip(rows, steps, strict=True)):
            for j in range(1, k):  # bridge a gap: inputs held, nothing measured
                point = session.grid_origin + (session.n_updates + 1) * dt
                output = await batcher.step(session, point, None, nothing, no_mask, twin)
                if not output.ok:
                    raise _diverged(i, j)
            inputs, measurement, mask = row_values(row)
            output = await batcher.step(session, row.timestamp, inputs, measurement, mask, twin)
            if not output.ok:
                raise _diverged(i, k)
            results.append(service.result_body(output, row.timestamp, k))
        return results

    @router.get("/{session_id}", response_model=SessionInfo, responses=errors(401, 404, 422),
                summary="read a session's current state")
    async def read_session(session_id: str = SESSION_ID) -> FastJSONResponse:
        """The session's state estimate and its spread, alarm and last result."""
        session = open_session(session_id)
        async with session.lock:
            if session.closed:
                open_session(session_id)
            return FastJSONResponse(service.session_body(session))

    @router.delete("/{session_id}", status_code=204, responses=errors(401, 404, 422),
                   summary="close a session")
    async def close_session(session_id: str = SESSION_ID) -> None:
        """Close the session (after any post in flight) and free its slot."""
        session = open_session(session_id)
        async with session.lock:
            if session.closed:  # a DELETE queued behind a post and another DELETE
                open_session(session_id)
            registry.remove(session)
        service.metrics.sessions_open.set(len(registry))

    return router


def _no_room(error: LineBusyError | SessionLimitError):
    """The registry's refusal as an answer: the line is monitored (409) or no slot is free
    (429)."""
    if isinstance(error, LineBusyError):
        return field_error(409, ["body", "line_id"], str(error), "line_busy")
    return field_error(429, ["body"], str(error), "too_many_sessions")


def _diverged(i: int, step: int):
    return field_error(
        422, ["body", "observations", i],
        f"step {step} of this row made the state estimate non-finite: nothing of this post "
        "was applied (the session is as before it); check the row's values",
        "state_not_finite")  # fmt: skip
