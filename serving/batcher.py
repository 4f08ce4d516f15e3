"""Micro-batching of monitoring updates: concurrent sessions' rows run as one `update` call.

Data flow: a session's route awaits `UpdateBatcher.step(...)` for each grid step -> the item
joins a queue -> one worker takes every queued item (up to max_batch), gathers their states
from the `StatePool`, runs the twin's batched `update` once, scatters the new states back and
answers each item. A twin that releases the GIL (TorchScript) runs on a dedicated torch thread,
so that the event loop parses the next requests on another core meanwhile; one that holds it
(AOTInductor, exported programs) runs in the event loop itself: on a thread it would gain no
parallelism and pay for every hand-over, the thread waiting up to the interpreter's switch
interval (5 ms) for the busy loop to let go (p99 at 16 clients 255 ms on a thread, 36 ms
inline: benchmarks/service_load.md). A batched update costs far less per line
than one call per line (2.05 ms for 1 line, 9.1 ms for 16, 22 ms for 64 on the development
machine: benchmarks/service_load.md), so batching is what lets one core keep up with many
lines. There is no waiting for a batch to fill: items that arrive while a batch runs form the
next one, so a lone client pays no delay. Each item names the twin it runs on (a post takes
the twin served when it starts, for all its rows): around a hot reload, the items taken
together run as one call per twin.

Consistency: a session has at most one item in flight (its route holds the session lock and
awaits each step), every item of a batch has its own slot, and the state of a row is written
only together with the session's step count and last timestamp, in the event loop, right
after the batch, whether or not the route that asked is still waiting.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import torch

from serving.metrics import ServiceMetrics
from serving.sessions import Session, SessionRegistry
from serving.twin_file import LoadedTwin
from serving.twin_store import TwinStore


@dataclass(eq=False)
class StepItem:
    """One grid step of one session, on `twin`. inputs None: a bridged gap row (inputs held,
    nothing measured)."""

    session: Session
    timestamp: datetime
    inputs: list[float] | None
    measurement: list[float]
    mask: list[bool]
    future: asyncio.Future
    twin: LoadedTwin


@dataclass
class StepOutput:
    """The twin's outputs for one row, as Python values (UPDATE_OUTPUTS of docs/export.md)."""

    ok: bool  # False: the new state was not finite and was not stored
    x: list[float]
    prediction: list[float]
    residual: list[float]
    t2: float
    t2_limit: float
    ewma_stat: list[float]
    alarm: bool
    contributions: list[float]
    status: int
    model_version: str


class UpdateBatcher:
    """One queue, one worker coroutine, one torch thread for the monitoring updates.

    Args:
        store: the twin served, for a step queued without one (a reload takes effect for the
            steps queued after it; a batch in flight finishes on its twin).
        registry: the sessions and their state pool.
        metrics: batch sizes, updates and alarms are counted here.
        max_batch: most rows in one update call.
    """

    def __init__(self, store: TwinStore, registry: SessionRegistry, metrics: ServiceMetrics,
                 max_batch: int) -> None:  # fmt: skip
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.max_batch = max_batch
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="twin-update")
        self._queue: asyncio.Queue[StepItem] = asyncio.Queue()
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="twin-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def run_torch(self, fn, twin, *args):
        """fn(twin, *args) on the update thread if the twin releases the GIL, else in the
        event loop (initial states go the same way as the batches)."""
        if not twin.releases_gil:
            return fn(twin, *args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, twin, *args)

    async def step(self, session: Session, timestamp: datetime, inputs: list[float] | None,
                   measurement: list[float], mask: list[bool],
                   twin: LoadedTwin | None = None) -> StepOutput:  # fmt: skip
        """Queue one grid step of `session` on `twin` (default: the one served now) and wait
        for its output."""
        future = asyncio.get_running_loop().create_future()
        item = StepItem(session, timestamp, inputs, measurement, mask, future,
                        twin or self.store.current)  # fmt: skip
        self._queue.put_nowait(item)
        return await future

    async def _run(self) -> None:
        while True:
            items = [await self._queue.get()]
            while len(items) < self.max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            for twin, group in _by_twin(items):  # one group, except around a reload
                await self._run_batch(twin, group)

    async def _run_batch(self, twin: LoadedTwin, items: list[StepItem]) -> None:
        try:
            outputs = await self.run_torch(self._compute, twin, items)
        except Exception as error:  # a bug of ours or the file's: fail these rows only
            if len(items) > 1:
                # One line's row must not take the other lines' steps down with it: each
                # item again on its own (a failed call wrote no state), so only it fails.
                for item in items:
                    await self._run_batch(twin, [item])
                return
            if not items[0].future.done():
                items[0].future.set_exception(error)
            return
        self._commit(items, outputs)

    def _compute(self, twin, items: list[StepItem]) -> list[StepOutput]:
        """Gather, update, scatter the finite rows, convert (where run_torch puts it)."""
        pool = self.registry.pool
        slots = torch.tensor([item.session.slot for item in items])
        x, P, u_held, ewma, run_length = pool.read(slots)
        dtype = twin.dtype
        held = [k for k, item in enumerate(items) if item.inputs is None]
        rows = [item.inputs if item.inputs is not None else [0.0] * u_held.shape[1]
                for item in items]  # fmt: skip
        inputs = torch.tensor(rows, dtype=dtype)
        if held:
            index = torch.tensor(held)
            inputs.index_copy_(0, index, u_held.index_select(0, index))
        measurement = torch.tensor([item.measurement for item in items], dtype=dtype)
        mask = torch.tensor([item.mask for item in items], dtype=torch.bool)
        with torch.inference_mode():
            out = twin.module.update(x, P, u_held, ewma, run_length, inputs, measurement, mask)
            finite = torch.isfinite(out[0]).all(dim=1) & torch.isfinite(out[1]).flatten(1).all(1)
            keep = finite.nonzero().flatten()
            if len(keep) == len(items):
                pool.write(slots, tuple(out[:5]))
            elif len(keep):
                pool.write(slots.index_select(0, keep),
                           tuple(t.index_select(0, keep) for t in out[:5]))  # fmt: skip
        cols = [t.tolist() for t in out[5:]] + [out[0].tolist(), finite.tolist()]
        prediction, residual, _, t2, t2_limit, ewma_stat, alarm, contrib, status, xs, ok = cols
        return [
            StepOutput(ok[k], xs[k], prediction[k], residual[k], t2[k], t2_limit[k],
                       ewma_stat[k], alarm[k], contrib[k], status[k], twin.label)
            for k in range(len(items))
        ]  # fmt: skip

    def _commit(self, items: list[StepItem], outputs: list[StepOutput]) -> None:
        """In the event loop: session bookkeeping with the state just written, then answers."""
        self.metrics.batch_size.observe(len(items))
        self.metrics.updates.inc(sum(o.ok for o in outputs))
        for item, output in zip(items, outputs, strict=True):
            session = item.session
            if output.ok:
                session.n_updates += 1
                session.last_timestamp = item.timestamp
                if output.alarm and not session.alarm:
                    self.metrics.alarms_raised.inc()
                if output.alarm:
                    self.metrics.alarm_steps.inc()
                session.alarm = output.alarm
            if not item.future.done():
                item.future.set_result(output)


def _by_twin(items: list[StepItem]) -> list[tuple[LoadedTwin, list[StepItem]]]:
    """The items grouped by the twin they run on, in the order each twin first appears."""
    groups: dict[int, tuple[LoadedTwin, list[StepItem]]] = {}
    for item in items:
        groups.setdefault(id(item.twin), (item.twin, []))[1].append(item)
    return list(groups.values())
