"""Read one exported twin file (docs/export.md) into a `LoadedTwin`, with torch alone.

Data flow: `twin export` writes `twin.pt` (TorchScript + `metadata.json` in `_extra_files`) ->
`load_twin_file` checks and loads it -> `TwinStore` serves it. This is the service's own small
copy of training.export.load_twin_file: serving imports nothing of training (DESIGN.md).
"""

import hashlib
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
DTYPES = {"float64": torch.float64, "float32": torch.float32}
METHODS = ("forecast", "initial_state", "update")
REQUIRED_KEYS = ("dt_s", "dtype", "input_tags", "measurement_tags", "state_names", "units")


class TwinFileError(ValueError):
    """A twin file cannot be served: missing, truncated, corrupted, without metadata, of
    another format_version or with a checksum other than the one expected."""


@dataclass(frozen=True)
class LoadedTwin:
    """A scripted twin ready to serve, and what the service needs to know about it.

    Attributes:
        module: the TorchScript OnlineTwin (methods forecast, initial_state, update).
        metadata: metadata.json as written by `twin export`.
        sha256: hex digest of the file's bytes.
        source: where it came from (a path, or the models:/ URI it was resolved from).
        version: the registered version (string) or None for a file outside the registry.
    """

    module: torch.jit.ScriptModule
    metadata: dict
    sha256: str
    source: str
    version: str | None
    loaded_utc: str = field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds")
    )

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.metadata["dtype"]]

    @property
    def label(self) -> str:
        """A short, stable name for logs and responses: `v<version>-<sha256[:12]>`."""
        return f"v{self.version or 'file'}-{self.sha256[:12]}"

    @property
    def interface(self) -> tuple:
        """What sessions and schemas depend on: a hot reload must keep it unchanged."""
        m = self.metadata
        return (m["dtype"], float(m["dt_s"]), tuple(m["input_tags"]),
                tuple(m["measurement_tags"]), tuple(m["state_names"]))  # fmt: skip


def load_twin_file(
    path: str | Path, source: str | None = None, expected_sha256: str | None = None,
    version: str | None = None,
) -> LoadedTwin:  # fmt: skip
    """Load and check a twin file on the CPU.

    Args:
        path: the file written by `twin export`.
        source: what to report as its origin (default: the path).
        expected_sha256: if given, the file's digest must equal it (registry downloads).
        version: the registered version it was resolved as (default: the metadata's).

    Returns:
        The LoadedTwin.

    Raises:
        TwinFileError: missing file, checksum mismatch, not a TorchScript archive, no or
            unreadable metadata.json, another format_version, a missing method or key.
    """
    path = Path(path)
    if not path.is_file():
        raise TwinFileError(f"twin file {path}: no such file")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise TwinFileError(
            f"twin file {path}: sha256 {digest} differs from the registry's {expected_sha256} "
            "(a partial download or a file changed after export)"
        )
    extra = {METADATA_FILE: ""}
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TwinFileError(
            f"twin file {path} ({len(data)} bytes) is not a readable TorchScript archive "
            f"(truncated or corrupted? re-run `twin export`): {first}"
        ) from error
    metadata = _metadata(path, extra[METADATA_FILE])
    missing = [m for m in METHODS if not hasattr(module, m)]
    if missing:
        raise TwinFileError(f"twin file {path}: the module lacks method(s) {missing}")
    module.eval()
    return LoadedTwin(
        module=module,
        metadata=metadata,
        sha256=digest,
        source=source or str(path),
        version=version if version is not None else metadata.get("registered_version"),
    )


def _metadata(path: Path, text: str) -> dict:
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise TwinFileError(
            f"twin file {path}: {METADATA_FILE} missing or not JSON: {error}"
        ) from error
    if not isinstance(metadata, dict) or metadata.get("format_version") != FORMAT_VERSION:
        found = metadata.get("format_version") if isinstance(metadata, dict) else metadata
        raise TwinFileError(
            f"twin file {path}: format_version {found!r}, this service reads {FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if missing:
        raise TwinFileError(f"twin file {path}: {METADATA_FILE} lacks {missing}")
    if metadata["dtype"] not in DTYPES:
        raise TwinFileError(
            f"twin file {path}: dtype {metadata['dtype']!r}, expected one of {list(DTYPES)}"
        )
    return metadata
