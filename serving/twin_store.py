"""The twin being served, and its hot reload.

Data flow: `model_uri` (a file path or a models:/ URI) -> `load_twin` -> `TwinStore.current`.
Every request reads `current` once and keeps that object to its end, so swapping in a newer
version (one assignment) never disturbs a request in flight: batches and forecasts already
started finish on the old twin, the next ones run on the new. A reload that would change the
interface (tags, state names, dt, dtype) is refused: open sessions hold states of that shape.
"""

import asyncio
import logging
from pathlib import Path

from serving.registry import is_registry_uri, load_from_registry, resolve
from serving.twin_file import LoadedTwin, TwinFileError, load_twin_file

log = logging.getLogger("serving")


class IncompatibleTwinError(ValueError):
    """A newer twin whose tags, states, dt or dtype differ from the one being served."""


def load_twin(uri: str, tracking_uri: str | None) -> LoadedTwin:
    """Load the twin a file path or a models:/ URI names.

    Raises:
        TwinFileError: as load_twin_file / load_from_registry.
    """
    if is_registry_uri(uri):
        return load_from_registry(uri, tracking_uri)
    return load_twin_file(Path(uri).expanduser())


class TwinStore:
    """Holds the served twin; `reload` swaps in another one with the same interface.

    Args:
        twin: the twin loaded at start-up.
        model_uri: what `reload()` without an argument loads again (a newer alias target,
            a rewritten file).
        tracking_uri: MLflow tracking URI for models:/ URIs (None: MLflow's default).
    """

    def __init__(self, twin: LoadedTwin, model_uri: str, tracking_uri: str | None) -> None:
        self.current = twin
        self.model_uri = model_uri
        self.tracking_uri = tracking_uri
        self._lock = asyncio.Lock()
        self._file_stamp = self._stamp(model_uri)

    async def reload(self, uri: str | None = None) -> tuple[LoadedTwin, bool]:
        """Load `uri` (default: the configured model_uri) off the event loop and swap it in.

        Returns:
            (the twin now served, whether it changed: False when the digest is the same).

        Raises:
            TwinFileError: the new file cannot be loaded (the old twin stays).
            IncompatibleTwinError: its interface differs (the old twin stays).
        """
        uri = uri or self.model_uri
        async with self._lock:
            new = await asyncio.to_thread(load_twin, uri, self.tracking_uri)
            old = self.current
            if new.interface != old.interface:
                raise IncompatibleTwinError(
                    f"model {uri}: its interface (dtype, dt_s, input tags, measurement tags, "
                    f"state names) differs from the served {old.label}: {new.interface} vs "
                    f"{old.interface}; start a new service for it"
                )
            if new.sha256 == old.sha256:
                return old, False
            self.current = new
            log.info("reloaded twin %s -> %s from %s", old.label, new.label, uri)
            return new, True

    async def changed_upstream(self) -> bool:
        """Whether the configured model_uri now names something other than what is served:
        another registry version, or a file whose size or mtime changed."""
        if is_registry_uri(self.model_uri):
            try:
                ref = await asyncio.to_thread(resolve, self.model_uri, self.tracking_uri)
            except TwinFileError as error:
                log.warning("reload poll: %s", error)
                return False
            return ref.sha256 != self.current.sha256
        stamp = self._stamp(self.model_uri)
        if stamp != self._file_stamp:
            self._file_stamp = stamp
            return True
        return False

    @staticmethod
    def _stamp(uri: str) -> tuple | None:
        if is_registry_uri(uri):
            return None
        try:
            stat = Path(uri).expanduser().stat()
        except OSError:
            return None
        return (stat.st_size, stat.st_mtime_ns)
