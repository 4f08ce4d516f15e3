"""Read an exported twin into a `LoadedTwin`, with torch alone, in any of its three formats.

Data flow: `twin export` writes `twin.pt` (TorchScript) and beside it `twin.pt2`
(torch.export) and `twin.aoti.pt2` (AOTInductor), each with the same `metadata.json` ->
`load_twin_path` picks the file to serve (the one named; or, from the TorchScript entry file,
the export's file of the `format` setting, `auto`: the fastest measured that loads) ->
`load_twin_file` checks and loads one file (serving/twin_formats.py reads the PT2 ones) ->
`TwinStore` serves it. This is the service's own small copy of training.export's reader:
serving imports nothing of training (DESIGN.md).
"""

import dataclasses
import hashlib
import io
import json
import logging
import math
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from serving.twin_formats import (
    FORMATS,
    METADATA_FILE,
    METHODS,
    ProgramFileError,
    detect_format,
    format_order,
    load_program_file,
    min_past_rows,
    read_extra_metadata,
    sibling,
)

log = logging.getLogger("serving")
FORMAT_VERSION = 1
DTYPES = {"float64": torch.float64, "float32": torch.float32}
REQUIRED_KEYS = ("dt_s", "dtype", "input_tags", "measurement_tags", "state_names", "units")
# metadata.json keys that may differ between the files of one export; all others must agree.
PER_FILE_KEYS = frozenset({"format"})


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _seconds(value) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value) and value >= 1e-3


def _names(value) -> bool:
    return (isinstance(value, list) and all(isinstance(v, str) and v for v in value)
            and len(set(value)) == len(value))  # fmt: skip


def _strings_by_name(value, or_null: bool = False) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) or (or_null and v is None)
                                           for v in value.values())  # fmt: skip


def _objects_or_null_by_name(value) -> bool:
    return isinstance(value, dict) and all(v is None or isinstance(v, dict)
                                           for v in value.values())  # fmt: skip


def _bounds_by_name(value) -> bool:
    def bounds(v) -> bool:
        return isinstance(v, list) and len(v) == 2 and all(b is None or _count(b) for b in v)

    return isinstance(value, dict) and all(bounds(v) for v in value.values())


# metadata.json fields the service reads -> (check, what it expects); the optional ones
# (not in REQUIRED_KEYS) may be absent.
FIELD_TYPES = {
    "dt_s": (_seconds, "a number of seconds >= 0.001"),
    "dtype": (lambda v: isinstance(v, str) and v in DTYPES, f"one of {list(DTYPES)}"),
    "input_tags": (_names, "a list of distinct, non-empty strings"),
    "measurement_tags": (_names, "a list of distinct, non-empty strings"),
    "state_names": (_names, "a list of distinct, non-empty strings"),
    "units": (_strings_by_name, "an object of tag -> unit (a string)"),
    "past_steps": (_count, "an integer >= 1"),
    "files": (lambda v: _strings_by_name(v, or_null=True), "an object of format -> file name"),
    "formats": (_objects_or_null_by_name, "an object of format -> its measurements (object)"),
    "program_shapes": (_bounds_by_name, "an object of name -> [lowest, highest] (integers "
                       ">= 1 or null)"),
}  # fmt: skip


class TwinFileError(ValueError):
    """A twin file cannot be served: missing, truncated, corrupted, without metadata or with a
    metadata field of the wrong type, of another format_version, with a checksum other than
    the one expected, a PT2 archive without a program, or an AOTInductor package that does not
    load on this machine."""


@dataclass(frozen=True)
class LoadedTwin:
    """A twin ready to serve, and what the service needs to know about it.

    Attributes:
        module: the TorchScript OnlineTwin, or a ProgramTwin (serving/twin_formats.py) for a
            PT2 file: either has forecast, initial_state and update with the same signatures.
        metadata: metadata.json as written by `twin export`.
        sha256: hex digest of the file's bytes.
        source: where it came from (a path, or the models:/ URI it was resolved from).
        version: the registered version (string) or None for a file outside the registry.
        format: "torchscript", "export" or "aoti" (read from the file's content).
        file: the file served (for a models:/ URI, its artifact path in the run).
        skipped: (format, reason) of the faster formats `format: auto` tried first.
        entry_sha256: digest of the file the choice started from (model_uri's file, or the
            registry's `twin_export.sha256`); a changed entry means a new export.
    """

    module: Any
    metadata: dict
    sha256: str
    source: str
    version: str | None
    format: str = "torchscript"
    file: str = ""
    skipped: tuple[tuple[str, str], ...] = ()
    entry_sha256: str | None = None
    loaded_utc: str = field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds")
    )

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.metadata["dtype"]]

    @property
    def releases_gil(self) -> bool:
        """Whether a call of the twin's methods lets other Python threads run meanwhile. The
        TorchScript interpreter releases the GIL; an AOTInductor runner holds it for the whole
        call, and an exported program runs op by op in Python (measured:
        benchmarks/service_load.md, "The GIL and the update thread")."""
        return self.format == "torchscript"

    @property
    def label(self) -> str:
        """A short, stable name for logs and responses: `v<version>-<sha256[:12]>`."""
        return f"v{self.version or 'file'}-{self.sha256[:12]}"

    @property
    def interface(self) -> dict:
        """What sessions and schemas depend on: a hot reload must keep it unchanged. The units
        of the input and measurement tags are part of it: the request schemas state them,
        and the plant's values arrive in them."""
        m = self.metadata
        tags = [*m["input_tags"], *m["measurement_tags"]]
        return {"dtype": m["dtype"], "dt_s": float(m["dt_s"]),
                "input_tags": tuple(m["input_tags"]),
                "measurement_tags": tuple(m["measurement_tags"]),
                "state_names": tuple(m["state_names"]),
                "tag_units": {tag: m["units"].get(tag) for tag in tags},
                "min_past_rows": min_past_rows(m)}  # fmt: skip


def load_twin_file(
    path: str | Path, source: str | None = None, expected_sha256: str | None = None,
    version: str | None = None, expected_format: str | None = None,
) -> LoadedTwin:  # fmt: skip
    """Load and check one twin file of any format on the CPU (the format read from its content).

    Args:
        path: a file written by `twin export` (twin.pt, twin.pt2 or twin.aoti.pt2).
        source: what to report as its origin (default: the path).
        expected_sha256: if given, the file's digest must equal it (registry downloads).
        version: the registered version it was resolved as (default: the metadata's).
        expected_format: if given, the format the file must hold.

    Returns:
        The LoadedTwin.

    Raises:
        TwinFileError: missing file, checksum mismatch, not a TorchScript or PT2 archive, no
            or unreadable metadata.json, another format_version, a missing method, program or
            key, a key of the wrong type (FIELD_TYPES), a format other than expected or than
            its metadata says, an AOTInductor
            package compiled by another torch or that does not load here.
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
    try:
        fmt = detect_format(data)
    except ProgramFileError as error:
        if path.suffix != ".pt2":
            fmt = "torchscript"  # torch.jit.load names the cause below
        else:
            raise TwinFileError(
                f"twin file {path} ({len(data)} bytes) is not a readable PT2 archive "
                f"(truncated or corrupted? re-run `twin export`): {error}"
            ) from error
    if expected_format is not None and fmt != expected_format:
        raise TwinFileError(f"twin file {path}: holds the {fmt} format, not {expected_format}")
    if fmt == "torchscript":
        module, text = _load_torchscript(path, data)
        metadata = _metadata(path, text)
    else:
        metadata = _metadata(path, read_extra_metadata(data) or "")
        try:
            module = load_program_file(data, fmt, metadata)
        except ProgramFileError as error:
            raise TwinFileError(f"twin file {path} ({fmt} format): {error}") from error
    declared = metadata.get("format", fmt)
    if declared != fmt:
        raise TwinFileError(
            f"twin file {path}: {METADATA_FILE} says format {declared!r}, the file holds {fmt}"
        )
    return LoadedTwin(
        module=module,
        metadata=metadata,
        sha256=digest,
        source=source or str(path),
        version=version if version is not None else metadata.get("registered_version"),
        format=fmt,
        file=str(path),
        entry_sha256=digest,
    )


def _load_torchscript(path: Path, data: bytes) -> tuple[torch.jit.ScriptModule, str]:
    extra = {METADATA_FILE: ""}
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TwinFileError(
            f"twin file {path} ({len(data)} bytes) is not a readable TorchScript archive "
            f"(truncated or corrupted? re-run `twin export`): {first}"
        ) from error
    missing = [m for m in METHODS if not hasattr(module, m)]
    if missing:
        raise TwinFileError(f"twin file {path}: the module lacks method(s) {missing}")
    module.eval()
    return module, extra[METADATA_FILE]


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
    check_field_types(path, metadata)
    return metadata


def check_field_types(path: Path, metadata: dict) -> None:
    """Refuse metadata.json fields the service reads that hold the wrong type of value (a
    null tag list, a unit that is not a string), before anything uses them.

    Raises:
        TwinFileError: naming the file, the field, its value (shortened) and what it should be.
    """
    for key, (valid, expected) in FIELD_TYPES.items():
        if key not in REQUIRED_KEYS and metadata.get(key) is None:
            continue  # an optional field absent (or null): its default applies
        value = metadata.get(key)
        if not valid(value):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise TwinFileError(
                f"twin file {path}: {METADATA_FILE} field {key!r} is {shown}, expected {expected}"
            )


def peek_twin_file(path: Path) -> tuple[str, dict, str] | None:
    """(format, metadata.json, sha256) of a twin file without loading what it holds; None
    when it cannot be read that way (load_twin_file then names the cause)."""
    try:
        data = path.read_bytes()
        fmt = detect_format(data)
        metadata = json.loads(read_extra_metadata(data) or "null")
    except (OSError, ProgramFileError, zipfile.BadZipFile, zlib.error, ValueError):
        return None
    if not isinstance(metadata, dict):
        return None
    try:
        check_field_types(path, metadata)
    except TwinFileError:
        return None
    return fmt, metadata, hashlib.sha256(data).hexdigest()


def load_twin_path(path: str | Path, setting: str = "auto") -> LoadedTwin:
    """The twin a file path names, in the format the setting asks for.

    A PT2 file named is served as it is (with `auto` or its own format). The TorchScript file
    is the export's entry: it lists the files written beside it (metadata.json `files`) and
    their latencies measured at export (`formats`). From it, `auto` loads the fastest format
    that loads here, each one skipped logged with its reason; a named format loads that file.

    Args:
        path: a twin file (twin.pt, twin.pt2, twin.aoti.pt2).
        setting: "auto", "torchscript", "export" or "aoti".

    Returns:
        The LoadedTwin (its `skipped` lists the formats tried first).

    Raises:
        TwinFileError: the file named cannot be read; the format asked for was not written by
            its export, or its file cannot be loaded, or is from another export; with `auto`,
            no format loads (every reason given).
    """
    path = Path(path)
    peeked = peek_twin_file(path)
    if peeked is None:
        return load_twin_file(path)  # raises, naming the cause
    entry_format, entry_meta, entry_sha = peeked
    if setting == entry_format or (setting == "auto" and entry_format != "torchscript"):
        return load_twin_file(path, expected_format=entry_format)
    order = format_order(entry_meta, entry_format) if setting == "auto" else [setting]

    def load_one(fmt: str) -> LoadedTwin:
        if fmt == entry_format:
            return load_twin_file(path, expected_format=fmt)
        file = sibling(path, entry_meta, fmt)
        if file is None:
            raise TwinFileError(
                f"twin file {path}: its export wrote no {fmt} file ({METADATA_FILE} `files`: "
                f"{entry_meta.get('files') or {}}); formats are {list(FORMATS)}"
            )
        twin = load_twin_file(file, expected_format=fmt)
        check_same_export(path, entry_meta, twin)
        return twin

    return load_first(order, load_one, f"twin file {path}", entry_sha)


def check_same_export(entry: Path | str, entry_meta: dict, twin: LoadedTwin) -> None:
    """Refuse a file beside the entry that another export wrote (its metadata differs).

    Raises:
        TwinFileError: a metadata.json key other than PER_FILE_KEYS differs (keys named).
    """
    ours = {k: v for k, v in entry_meta.items() if k not in PER_FILE_KEYS}
    theirs = {k: v for k, v in twin.metadata.items() if k not in PER_FILE_KEYS}
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:
        raise TwinFileError(
            f"twin file {twin.file}: not from the export that wrote {entry} ({METADATA_FILE} "
            f"differs in {differ}); a file left from an older export? re-run `twin export`"
        )


def load_first(order: Sequence[str], load_one: Callable[[str], LoadedTwin], what: str,
               entry_sha256: str) -> LoadedTwin:  # fmt: skip
    """The first format of `order` that loads; the ones before it logged and recorded.

    Raises:
        TwinFileError: one format asked for and it fails (its own error); or none loads (each
            format's reason in the message).
    """
    skipped: list[tuple[str, str]] = []
    for fmt in order:
        try:
            twin = load_one(fmt)
        except TwinFileError as error:
            if len(order) == 1:
                raise
            log.warning("%s: format %s not served: %s", what, fmt, error)
            skipped.append((fmt, str(error)))
            continue
        if skipped:
            log.warning("%s: serving the %s format instead of %s", what, fmt,
                        ", ".join(f for f, _ in skipped))  # fmt: skip
        return dataclasses.replace(twin, skipped=tuple(skipped), entry_sha256=entry_sha256)
    reasons = "; ".join(f"{fmt}: {reason}" for fmt, reason in skipped)
    raise TwinFileError(f"{what}: none of its formats loads: {reasons}")
