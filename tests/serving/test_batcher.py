"""Where the batcher runs the twin: on its torch thread for a format whose calls release the
GIL (TorchScript), in the event loop for one that holds it (AOTInductor, exported programs),
with the same answers either way (serving/batcher.py; benchmarks/service_load.md says why).
"""

import asyncio
import dataclasses
import math
import threading
from datetime import datetime, timedelta

import pytest
import torch

from serving.batcher import UpdateBatcher
from serving.metrics import ServiceMetrics
from serving.routes_monitoring import _initial_state
from serving.sessions import SessionRegistry
from serving.twin_file import load_twin_path
from serving.twin_store import TwinStore

PAST, ROWS = 6, 3


class _Recording:
    """The twin's methods, noting the thread each call ran on."""

    def __init__(self, module, threads: list[str]) -> None:
        self.module = module
        self.threads = threads

    def initial_state(self, *args):
        self.threads.append(threading.current_thread().name)
        return self.module.initial_state(*args)

    def update(self, *args):
        self.threads.append(threading.current_thread().name)
        return self.module.update(*args)


def _drive(twin, rows: list[dict], metadata: dict) -> list:
    """Open one session on rows[:PAST] and step it through the next ROWS rows."""
    inputs, tags = metadata["input_tags"], metadata["measurement_tags"]

    def values(row: dict) -> tuple[list, list, list]:
        y = [row["measurements"][t] for t in tags]
        return ([row["inputs"][t] for t in inputs], [math.nan if v is None else v for v in y],
                [v is not None for v in y])  # fmt: skip

    async def run() -> list:
        registry = SessionRegistry(4, 600.0)
        batcher = UpdateBatcher(TwinStore(twin, "unused", None), registry, ServiceMetrics(), 8)
        batcher.start()
        try:
            past = [values(r) for r in rows[:PAST]]
            state = await batcher.run_torch(_initial_state, twin, [p[0] for p in past],
                                            [p[1] for p in past])  # fmt: skip
            stamp = datetime.fromisoformat(rows[PAST - 1]["timestamp"])
            session = registry.add("LINE-b", stamp, state)
            outputs = []
            for row in rows[PAST : PAST + ROWS]:
                stamp += timedelta(seconds=float(metadata["dt_s"]))
                outputs.append(await batcher.step(session, stamp, *values(row)))
            return outputs
        finally:
            await batcher.stop()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def reference(twin_build, runs, metadata) -> list:
    return _drive(load_twin_path(twin_build.path, "torchscript"), runs[0], metadata)


@pytest.mark.parametrize(("fmt", "releases_gil"),
                         [("torchscript", True), ("aoti", False), ("export", False)])
def test_each_format_runs_on_the_thread_its_gil_use_calls_for(twin_build, runs, metadata,
                                                               reference, fmt, releases_gil):
    loaded = load_twin_path(twin_build.path, fmt)
    threads: list[str] = []
    twin = dataclasses.replace(loaded, module=_Recording(loaded.module, threads))
    assert twin.format == fmt and twin.releases_gil is releases_gil

    outputs = _drive(twin, runs[0], metadata)

    loop_thread = threading.main_thread().name  # asyncio.run's loop runs on the caller's
    expected = "twin-update" if releases_gil else loop_thread
    assert len(threads) == 1 + ROWS
    assert all(name.startswith(expected) for name in threads), threads
    assert all(o.ok for o in outputs)
    got = torch.tensor([o.x for o in outputs], dtype=torch.float64)
    want = torch.tensor([o.x for o in reference], dtype=torch.float64)
    # the formats agree to the export's verification bound (compiled kernels round otherwise)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


class _FailingOnSentinel:
    """The twin, whose update raises for a batch holding a row that measured SENTINEL (a bug
    of the file's that one line's data trips)."""

    SENTINEL = 123456.0

    def __init__(self, module) -> None:
        self.module = module
        self.update_sizes: list[int] = []

    def initial_state(self, *args):
        return self.module.initial_state(*args)

    def update(self, *args):
        measurement = args[6]
        self.update_sizes.append(measurement.shape[0])
        if bool((measurement == self.SENTINEL).any()):
            raise RuntimeError("the file's update failed on this row")
        return self.module.update(*args)


def test_one_lines_failing_row_fails_only_its_own_step(twin_build, runs, metadata):
    loaded = load_twin_path(twin_build.path, "torchscript")
    failing = _FailingOnSentinel(loaded.module)
    twin = dataclasses.replace(loaded, module=failing)
    inputs, tags = metadata["input_tags"], metadata["measurement_tags"]
    rows = runs[0]
    u = [[r["inputs"][t] for t in inputs] for r in rows[:PAST]]
    y = [[math.nan if r["measurements"][t] is None else r["measurements"][t] for t in tags]
         for r in rows[:PAST]]  # fmt: skip
    stamp = datetime.fromisoformat(rows[PAST - 1]["timestamp"])

    async def run():
        registry = SessionRegistry(4, 600.0)
        batcher = UpdateBatcher(TwinStore(twin, "unused", None), registry, ServiceMetrics(), 8)
        batcher.start()
        try:
            state = await batcher.run_torch(_initial_state, twin, u, y)
            good = registry.add("LINE-good", stamp, state)
            bad = registry.add("LINE-bad", stamp, tuple(t.clone() for t in state))
            step = stamp + timedelta(seconds=float(metadata["dt_s"]))
            n_tags = len(tags)
            return good, bad, await asyncio.gather(
                batcher.step(good, step, u[-1], y[-1], [True] * n_tags),
                batcher.step(bad, step, u[-1], [failing.SENTINEL] * n_tags, [True] * n_tags),
                return_exceptions=True,
            )
        finally:
            await batcher.stop()

    good, bad, (good_out, bad_out) = asyncio.run(run())
    assert failing.update_sizes[0] == 2  # both rows were one batch, and it failed
    assert isinstance(bad_out, RuntimeError)
    assert not isinstance(good_out, BaseException) and good_out.ok
    assert (good.n_updates, bad.n_updates) == (1, 0)
