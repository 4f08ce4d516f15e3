"""The served process's long-lived objects kept out of the cyclic garbage collector's full passes.

Why: `twin serve` holds ~370,000 objects that live as long as it does (torch, FastAPI, pydantic,
the loaded twin). Under load CPython ran a full (generation 2) collection every ~6 s, each
130 ms with the GIL held: the event loop stalled and the p99 of a monitoring post at 16
clients was 83 ms where it is otherwise ~10 (benchmarks/service_load.md). `gc.freeze()` moves
what is alive once the twin is loaded into a permanent generation that collections skip; what
requests allocate is collected as before, and frozen objects are still freed by reference
counting. Only reference cycles among frozen objects wait: a twin swapped out by a reload
keeps its cycles until `refreeze` thaws the heap, collects once and freezes what remains.
"""

import gc


def freeze_long_lived() -> None:
    """Collect once, then freeze every object alive now (call once the twin is loaded)."""
    gc.collect()
    gc.freeze()


def refreeze() -> bool:
    """Where the heap is frozen: thaw it, collect what is garbage now (a replaced twin's
    cycles; one full pass, ~0.1-0.2 s) and freeze the rest. Returns whether it did."""
    if not gc.get_freeze_count():
        return False
    gc.unfreeze()
    freeze_long_lived()
    return True
