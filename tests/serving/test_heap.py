"""serving/heap.py: `twin serve` freezes what it loaded, so that full GC passes skip it (they
took 130 ms each under load, benchmarks/service_load.md); a twin replaced by a reload still
has its reference cycles collected, by the housekeeping task's refreeze."""

import asyncio
import gc
import weakref

import pytest

from serving import app as app_module
from serving.app import build_service, housekeeping
from serving.heap import freeze_long_lived, refreeze
from serving.settings import load_settings
from serving.twin_file import load_twin_file


class _Cyclic:
    """Stands in for a swapped-out twin: an object in a reference cycle, which reference
    counting alone never frees."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def frozen_heap():
    """This process's heap frozen for the test and thawed after it."""
    assert gc.get_freeze_count() == 0, "a test left the heap frozen"
    freeze_long_lived()
    yield
    gc.unfreeze()


def test_a_frozen_cycle_outlives_full_passes_until_refreeze(frozen_heap):
    old = _Cyclic()
    gone = weakref.ref(old)
    gc.freeze()  # as if it had been alive at start-up
    del old
    gc.collect()
    assert gone() is not None  # what makes the passes cheap: frozen objects are not scanned
    assert refreeze()
    assert gone() is None
    assert gc.get_freeze_count() > 0  # what is still alive is frozen again


def test_refreeze_does_nothing_where_the_heap_is_not_frozen():
    assert gc.get_freeze_count() == 0
    assert not refreeze()
    assert gc.get_freeze_count() == 0


def test_housekeeping_refreezes_once_after_the_twin_is_swapped(twin_build, monkeypatch):
    settings = load_settings({"model_uri": str(twin_build.path), "insecure": True,
                              "sessions": {"idle_expiry_s": 0.2}}, {})  # fmt: skip
    service = build_service(settings, load_twin_file(twin_build.path))
    calls = []
    monkeypatch.setattr(app_module, "refreeze", lambda: calls.append(service.store.current))

    async def scenario() -> None:
        task = asyncio.create_task(housekeeping(service))  # ticks every 0.05 s here
        await asyncio.sleep(0.3)
        assert calls == []  # the same twin: nothing to do
        service.store.current = load_twin_file(twin_build.path)  # what a reload does
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert calls == [service.store.current]


def test_the_served_process_reports_its_frozen_heap(server):
    with server.client() as client:
        text = client.get("/metrics").text
    (line,) = [x for x in text.splitlines() if x.startswith("twin_heap_frozen_objects ")]
    # torch and the web stack alone are well over 100,000 objects (~370,000 measured)
    assert float(line.split()[-1]) > 100_000
