"""Monitoring sessions: one per plant line, their filter states in one preallocated pool.

Data flow: `POST /v1/sessions` -> the twin's `initial_state` -> `SessionRegistry.add` (a slot
of the `StatePool`) -> each observation row updates that slot in place through the batcher ->
`DELETE` or idle expiry frees the slot. Memory is bounded by construction: `max_sessions`
slots are allocated once, and a full registry first drops sessions idle past `idle_expiry_s`,
then refuses. Each session's `lock` orders its posts: one row at a time, in time order; a post
refused midway puts its session back from a `SessionSnapshot` taken when it started.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import torch
from torch import Tensor

log = logging.getLogger("serving")


class SessionLimitError(RuntimeError):
    """No free slot: max_sessions sessions are open and none is idle past its expiry."""


class LineBusyError(RuntimeError):
    """The line already has an open session."""


class UnknownSessionError(KeyError):
    """No open session with that id (never created, closed, or expired)."""


class StatePool:
    """The filter state tuple (x, P, u_held, ewma, run_length) of every session, row = slot.

    Allocated on the first `write` from the shapes and dtypes of the twin's state tuple, so
    it follows the file, not a guess. Rows are read and written by index: one gather and one
    scatter per field per batch, whatever the batch size.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.fields: tuple[Tensor, ...] | None = None

    def write(self, slots: Tensor, state: tuple[Tensor, ...]) -> None:
        """state[f] (len(slots), ...) into rows `slots` of each field."""
        if self.fields is None:
            self.fields = tuple(torch.zeros((self.capacity, *t.shape[1:]), dtype=t.dtype)
                                for t in state)  # fmt: skip
        for pooled, value in zip(self.fields, state, strict=True):
            pooled.index_copy_(0, slots, value)

    def read(self, slots: Tensor) -> tuple[Tensor, ...]:
        """The state tuple of rows `slots`, each field (len(slots), ...), a copy."""
        assert self.fields is not None, "read before any session wrote its state"
        return tuple(pooled.index_select(0, slots) for pooled in self.fields)


@dataclass(eq=False)
class Session:
    """One line's monitoring session (its filter state lives in the pool's row `slot`).

    Its time grid starts at `grid_origin` (the last past row's timestamp) with one point every
    dt_s: `n_updates` steps run means the state is at grid point origin + n_updates * dt_s.
    """

    session_id: str
    line_id: str
    slot: int
    last_timestamp: datetime
    created_utc: datetime = field(default_factory=lambda: datetime.now(UTC))
    n_updates: int = 0
    alarm: bool = False
    last_result: dict | None = None
    # The last applied post: the SHA-256 of its body and its response as sent. The same body
    # posted again (a retry after a client timeout) gets that response back, not a 409.
    last_post: tuple[bytes, bytes] | None = None
    last_used: float = 0.0
    closed: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    grid_origin: datetime | None = None
    model_version: str = ""  # the label of the twin that made its state (a reload may follow)
    # What `GET /v1/sessions` shows: the session as its last whole post left it (`publish`),
    # not a post's rows half applied, which a refusal may still undo.
    listed: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.grid_origin is None:
            self.grid_origin = self.last_timestamp
        self.publish()

    def publish(self) -> None:
        """Make the session's current fields what the sessions list shows (after a post)."""
        self.listed = {"session_id": self.session_id, "line_id": self.line_id,
                       "alarm": self.alarm, "last_timestamp": self.last_timestamp,
                       "n_updates": self.n_updates}  # fmt: skip


@dataclass(frozen=True)
class SessionSnapshot:
    """Everything a post may change of a session, kept to put back if the post is refused."""

    state: tuple[Tensor, ...]
    n_updates: int
    last_timestamp: datetime
    alarm: bool
    last_result: dict | None
    model_version: str


class SessionRegistry:
    """Open sessions by id, one per line, at most `max_sessions`, idle ones expiring.

    Args:
        max_sessions: slots in the pool.
        idle_expiry_s: a session untouched this long may be dropped.
        on_expired: called with the number of sessions each sweep dropped (metrics).
        clock: monotonic seconds (injectable for tests of expiry).
    """

    def __init__(self, max_sessions: int, idle_expiry_s: float,
                 on_expired: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.pool = StatePool(max_sessions)
        self.idle_expiry_s = idle_expiry_s
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._by_line: dict[str, Session] = {}
        self._free = list(range(max_sessions - 1, -1, -1))
        self.on_expired = on_expired

    def __len__(self) -> int:
        return len(self._sessions)

    def check_room(self, line_id: str) -> None:
        """Raise now what `add` would raise, before the cost of an initial state.

        Raises:
            LineBusyError, SessionLimitError: as `add`.
        """
        if line_id in self._by_line or not self._free:
            self.expire()  # the line's own session may be idle past its expiry, not yet swept
        if line_id in self._by_line:
            raise LineBusyError(
                f"line {line_id!r} already has session {self._by_line[line_id].session_id}: "
                "close it first (DELETE /v1/sessions/{session_id})"
            )
        if not self._free:
            raise SessionLimitError(
                f"{self.pool.capacity} sessions open (sessions.max_sessions) and none idle for "
                f"{self.idle_expiry_s:g} s: close one first"
            )

    def add(self, line_id: str, last_timestamp: datetime, state: tuple[Tensor, ...],
            model_version: str = "") -> Session:  # fmt: skip
        """Register a session whose initial state is `state` (each field batch 1), made by the
        twin labelled `model_version`.

        Raises:
            LineBusyError: the line has an open session.
            SessionLimitError: no free slot after dropping expired sessions.
        """
        self.check_room(line_id)
        slot = self._free.pop()
        self.pool.write(torch.tensor([slot]), state)
        session = Session(uuid.uuid4().hex, line_id, slot, last_timestamp,
                          last_used=self.clock(), model_version=model_version)  # fmt: skip
        self._sessions[session.session_id] = session
        self._by_line[line_id] = session
        return session

    def open_sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def get(self, session_id: str) -> Session:
        """The open session, marked as used now.

        Raises:
            UnknownSessionError: no such open session, or one idle past its expiry that no
                sweep dropped yet (it is dropped now: a post must not revive it).
        """
        session = self._sessions.get(session_id)
        if session is not None and self._idle(session, self.clock() - self.idle_expiry_s):
            self.remove(session)
            log.info("dropped session of line %s, idle for over %g s", session.line_id,
                     self.idle_expiry_s)  # fmt: skip
            if self.on_expired is not None:
                self.on_expired(1)
            session = None
        if session is None:
            raise UnknownSessionError(session_id)
        session.last_used = self.clock()
        return session

    def used(self, session: Session) -> None:
        """Mark the session used now (its request ends): idle time counts from here, not
        from the start of a post that ran for a while."""
        session.last_used = self.clock()

    def remove(self, session: Session) -> None:
        """Close a session and free its slot (idempotent)."""
        if self._sessions.pop(session.session_id, None) is not None:
            self._by_line.pop(session.line_id, None)
            session.closed = True
            self._free.append(session.slot)

    def expire(self) -> int:
        """Drop sessions idle past idle_expiry_s and not busy; returns how many."""
        cutoff = self.clock() - self.idle_expiry_s
        idle = [s for s in self._sessions.values() if self._idle(s, cutoff)]
        for session in idle:
            self.remove(session)
        if idle:
            log.info("dropped %d session(s) idle for over %g s, of lines %s", len(idle),
                     self.idle_expiry_s, ", ".join(s.line_id for s in idle))  # fmt: skip
        if idle and self.on_expired is not None:
            self.on_expired(len(idle))
        return len(idle)

    @staticmethod
    def _idle(session: Session, cutoff: float) -> bool:
        return session.last_used < cutoff and not session.lock.locked()

    def state_of(self, session: Session) -> tuple[Tensor, ...]:
        """The session's state tuple (each field batch 1), a copy."""
        return self.pool.read(torch.tensor([session.slot]))

    def snapshot(self, session: Session) -> SessionSnapshot:
        """The session as it is now (its state copied), for `restore`."""
        return SessionSnapshot(self.state_of(session), session.n_updates,
                               session.last_timestamp, session.alarm,
                               session.last_result, session.model_version)  # fmt: skip

    def restore(self, session: Session, snapshot: SessionSnapshot) -> None:
        """Put the session back as `snapshot` found it. Call with its lock held and none of
        its steps in flight: then no batch reads or writes its pool row meanwhile (a batch
        touches only its items' rows)."""
        self.pool.write(torch.tensor([session.slot]), snapshot.state)
        session.n_updates = snapshot.n_updates
        session.last_timestamp = snapshot.last_timestamp
        session.alarm = snapshot.alarm
        session.last_result = snapshot.last_result
        session.model_version = snapshot.model_version
