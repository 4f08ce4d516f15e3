"""The twin being served, and its hot reload.

Data flow: `model_uri` (a file path or a models:/ URI) + `format` (auto or one of the three)
-> `load_twin` -> `TwinStore.current`.
Every request reads `current` once and keeps that object to its end, so swapping in a newer
version (one assignment) never disturbs a request in flight: batches and forecasts already
started finish on the old twin, the next ones run on the new. A reload that would change the
interface (tags and their units, state names, dt, dtype) is refused: open sessions hold states
of that shape, and the request schemas state the units clients send.
"""

import asyncio
import gc
import logging
from pathlib import Path

from serving.registry import is_registry_uri, load_from_registry, resolve
from serving.twin_file import LoadedTwin, TwinFileError, load_twin_path
from serving.twin_formats import sibling

log = logging.getLogger("serving")


class IncompatibleTwinError(ValueError):
    """A newer twin whose tags, tag units, states, dt or dtype differ from the one served."""


def interface_changes(old: dict, new: dict) -> list[str]:
    """What differs between two `LoadedTwin.interface`s, one entry per part ("tag_units:
    PRESS.WEIGHT_SP 'mg' -> 'g'"); empty when they are the same."""
    changes = []
    for part, was in old.items():
        now = new.get(part)
        if now == was:
            continue
        if isinstance(was, dict) and isinstance(now, dict):
            keys = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
            changes.append(f"{part}: " + ", ".join(f"{k} {was.get(k)!r} -> {now.get(k)!r}"
                                                   for k in keys))  # fmt: skip
        else:
            changes.append(f"{part}: {was!r} -> {now!r}")
    return changes


def load_twin(uri: str, tracking_uri: str | None, setting: str = "auto") -> LoadedTwin:
    """Load the twin a file path or a models:/ URI names, in the format `setting` asks for
    ("auto": the fastest measured at export that loads; docs/serving.md).

    Raises:
        TwinFileError: as load_twin_path / load_from_registry.
    """
    if is_registry_uri(uri):
        return load_from_registry(uri, tracking_uri, setting)
    return load_twin_path(Path(uri).expanduser(), setting)


class TwinStore:
    """Holds the served twin; `reload` swaps in another one with the same interface.

    Args:
        twin: the twin loaded at start-up.
        model_uri: what `reload()` loads again (a newer alias target,
            a rewritten file).
        tracking_uri: MLflow tracking URI for models:/ URIs (None: MLflow's default).
        setting: the `format` setting every load uses ("auto" or one format).
    """

    def __init__(self, twin: LoadedTwin, model_uri: str, tracking_uri: str | None,
                 setting: str = "auto") -> None:  # fmt: skip
        self.current = twin
        self.model_uri = model_uri
        self.tracking_uri = tracking_uri
        self.setting = setting
        self._lock = asyncio.Lock()
        self._file_stamp = self._stamp(model_uri)
        self._loaded_stamp = self._file_stamp  # the files as `current` was loaded from them
        self._polled_entry: str | None = None  # the registry export the poll last reported

    async def reload(self) -> tuple[LoadedTwin, bool]:
        """Load the configured model_uri again off the event loop and swap it in.

        Returns:
            (the twin now served, whether it changed: False when the digest is the same).

        Raises:
            TwinFileError: the new file cannot be loaded (the old twin stays).
            IncompatibleTwinError: its interface differs, each difference named (the old
                twin stays).
        """
        uri = self.model_uri
        async with self._lock:
            if await self._unchanged(uri):  # nothing to load: an AOTInductor load leaks ~1.3 MB
                return self.current, False
            before = self._stamp(uri)
            new = await asyncio.to_thread(load_twin, uri, self.tracking_uri, self.setting)
            # The new export's files (it may list other siblings than the served one); the
            # named file as it was before the load, so that one rewritten during the load
            # is loaded again.
            stamp = self._stamp(uri, new.metadata)
            if stamp is not None and before is not None:
                stamp = (before[0], *stamp[1:])
            old = self.current
            changes = interface_changes(old.interface, new.interface)
            if changes:
                raise IncompatibleTwinError(
                    f"model {uri}: its interface differs from the served {old.label}'s: "
                    f"{'; '.join(changes)}; start a new service for it"
                )
            # Either way these files are now known: the poll sees no change, and the next
            # reload loads nothing (a file rewritten with the same bytes was loaded again on
            # every reload, each load leaking).
            self._file_stamp = self._loaded_stamp = stamp
            if new.sha256 == old.sha256:
                return old, False
            self.current = new
            log.info("reloaded twin %s (%s) -> %s (%s) from %s", old.label, old.format,
                     new.label, new.format, uri)  # fmt: skip
            return new, True

    async def _unchanged(self, uri: str) -> bool:
        """Whether `uri` still names the export served: the registry's entry digest, or the
        files' sizes and mtimes as they were loaded (a file's own digest is checked on load)."""
        if is_registry_uri(uri):
            try:
                ref = await asyncio.to_thread(resolve, uri, self.tracking_uri)
            except TwinFileError:
                return False  # the load names the problem
            return ref.sha256 == (self.current.entry_sha256 or self.current.sha256)
        return self._stamp(uri) == self._loaded_stamp

    def release(self) -> None:
        """Drop the served twin at shutdown so its native code is freed while the process can
        still free it: an AOTInductor twin's loader deletes its extraction folders
        (`aotinductor_*`, ~3 MB each, in the temp folder) only when it is freed, and uvicorn
        ends a SIGTERM-stopped service by re-raising the signal, which frees nothing."""
        self.current = None
        gc.unfreeze()  # serving/heap.py froze the twin's cycles out of collection
        gc.collect()

    async def changed_upstream(self) -> bool:
        """Whether the configured model_uri now names something other than what is served:
        another registry export (its TorchScript entry's digest), or a file of the export
        (the file named or one written beside it) whose size or mtime changed.

        Each change is reported once: an export whose reload failed (refused, unreadable) is
        not fetched again at every poll, only when the alias or file moves on (or through
        `POST /v1/model/reload`)."""
        if is_registry_uri(self.model_uri):
            try:
                ref = await asyncio.to_thread(resolve, self.model_uri, self.tracking_uri)
            except TwinFileError as error:
                log.warning("reload poll: %s", error)
                return False
            served = self.current.entry_sha256 or self.current.sha256
            if ref.sha256 in (served, self._polled_entry):
                return False
            self._polled_entry = ref.sha256
            return True
        stamp = self._stamp(self.model_uri)
        if stamp != self._file_stamp:
            self._file_stamp = stamp
            return True
        return False

    def _stamp(self, uri: str, metadata: dict | None = None) -> tuple | None:
        """(size, mtime) of the file named and of the files its export wrote beside it (a
        file rewritten after the entry, as an export in progress does, is seen too), as
        `metadata` lists them (default: the served twin's)."""
        if is_registry_uri(uri):
            return None
        metadata = self.current.metadata if metadata is None else metadata
        path = Path(uri).expanduser()
        files = [path] + [sibling(path, metadata, fmt)
                          for fmt in sorted(metadata.get("files") or {})]  # fmt: skip
        stamps = []
        for file in files:
            try:
                stat = file.stat() if file is not None else None
            except OSError:
                stat = None
            stamps.append(None if stat is None else (stat.st_size, stat.st_mtime_ns))
        return tuple(stamps)
