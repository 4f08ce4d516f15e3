"""The three formats of one exported twin, read with torch alone, behind one call signature.

Data flow: `twin export` writes the same twin as `twin.pt` (TorchScript), `twin.pt2` (a
`torch.export` program per method) and `twin.aoti.pt2` (the methods compiled by AOTInductor
for the export machine's platform), each with the same metadata.json -> `detect_format` reads
which one a file is from its content -> `load_program_file` turns a PT2 archive into a
`ProgramTwin`, whose `initial_state` / `update` / `forecast` take and return what the
TorchScript twin's do -> `format_order` ranks the formats an export wrote for `format: auto`
(fastest measured `update` p99 first). serving/twin_file.py does the checks common to all
three and the choice among an export's files.
"""

import io
import platform
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

FORMATS = ("torchscript", "export", "aoti")
METHODS = ("forecast", "initial_state", "update")
METADATA_FILE = "metadata.json"
# torch.export.pt2_archive.constants: a PT2 archive holds `<root>/archive_format` = "pt2" and
# AOTInductor packages under `<root>/data/aotinductor/` (exported programs under `models/`).
# Read here with zipfile, so that telling the formats apart loads nothing.
PT2_FORMAT_FILE = "archive_format"
AOTI_DIR = "/data/aotinductor/"
ZIP_END = b"PK\x05\x06"  # end of central directory record: 22 bytes + a comment
ZIP_END_MAX = 22 + 65535
# What the PT2 programs accept when metadata.json's `program_shapes` does not say.
DEFAULT_MAX_BATCH = 4096
DEFAULT_MIN_HORIZON = 2


class ProgramFileError(ValueError):
    """A PT2 file that cannot be served (twin_file.py adds the path and raises TwinFileError)."""


def detect_format(data: bytes) -> str:
    """Which format a twin file's bytes hold, from the archive's layout.

    Returns:
        "torchscript", "export" or "aoti".

    Raises:
        ProgramFileError: the bytes are not a readable zip archive (truncated or corrupted).
    """
    _check_zip_end(data)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            marker = [n for n in names if n.count("/") == 1 and n.endswith("/" + PT2_FORMAT_FILE)]
            is_pt2 = bool(marker) and archive.read(marker[0]).strip() == b"pt2"
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as error:
        raise ProgramFileError(f"not a readable zip archive: {_first_line(error)}") from error
    if not is_pt2:
        return "torchscript"
    return "aoti" if any(AOTI_DIR in n for n in names) else "export"


def _check_zip_end(data: bytes) -> None:
    """The zip's end record must end the file. zipfile alone would accept a truncated PT2
    archive: it holds zip archives (saved tensors) of its own, and the last one left whole
    then passes for the file.

    Raises:
        ProgramFileError: no end record where the file ends.
    """
    at = data.rfind(ZIP_END, max(0, len(data) - ZIP_END_MAX))
    if at < 0 or at + 22 + int.from_bytes(data[at + 20 : at + 22], "little") != len(data):
        raise ProgramFileError(
            f"not a readable zip archive: no end-of-archive record at its end ({len(data)} "
            "bytes; truncated?)"
        )


class ProgramTwin:
    """A PT2 twin's programs called as the TorchScript twin's methods are.

    Two rules of the programs are kept here, so that the batcher and the routes need not know
    which format runs: every input is made contiguous (AOTInductor reads raw strides and gives
    wrong numbers on a non-contiguous tensor, without an error), and a forecast shorter than
    the programs' smallest horizon is padded by repeating its last input row, the extra rows
    dropped from the output (exact: the forecast is causal, row k sees inputs up to row k).
    A batch larger than the programs accept runs in chunks.

    Args:
        programs: method name -> callable taking and returning tensors (an exported
            program's module, or an AOTInductor runner).
        format: "export" or "aoti".
        max_batch: the largest batch the programs accept.
        min_horizon: the fewest future rows `forecast` accepts.
    """

    def __init__(self, programs: Mapping[str, Callable], format: str,
                 max_batch: int = DEFAULT_MAX_BATCH,
                 min_horizon: int = DEFAULT_MIN_HORIZON) -> None:  # fmt: skip
        self.programs = dict(programs)
        self.format = format
        self.max_batch = max_batch
        self.min_horizon = min_horizon

    def initial_state(self, past_u: torch.Tensor, past_y: torch.Tensor) -> tuple:
        """(B, P, n_u), (B, P, n_y) -> the 5-tuple state (docs/export.md)."""
        return self._call("initial_state", past_u, past_y)

    def update(self, *state_and_row: torch.Tensor) -> tuple:
        """x, P, u_held, ewma, run_length, inputs, measurement, mask -> the 14 outputs."""
        return self._call("update", *state_and_row)

    def forecast(self, past_u: torch.Tensor, past_y: torch.Tensor,
                 u: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """(B, P, n_u), (B, P, n_y), (B, T, n_u) -> y (B, T, n_y), for any T >= 1."""
        horizon = u.shape[1]
        if 0 < horizon < self.min_horizon:
            pad = u[:, -1:].expand(-1, self.min_horizon - horizon, -1)
            return self._call("forecast", past_u, past_y, torch.cat([u, pad], 1))[:, :horizon]
        return self._call("forecast", past_u, past_y, u)

    def _call(self, name: str, *args: torch.Tensor):
        args = tuple(a.contiguous() for a in args)
        program = self.programs[name]
        batch = args[0].shape[0]
        if batch <= self.max_batch:
            return _as_output(program(*args))
        parts = [_as_output(program(*(a[i : i + self.max_batch] for a in args)))
                 for i in range(0, batch, self.max_batch)]  # fmt: skip
        if isinstance(parts[0], torch.Tensor):
            return torch.cat(parts)
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def _as_output(out):
    """A program's output as the TorchScript twin gives it: a tensor or a tuple of them
    (AOTInductor runners may answer with a list, a one-output program with a 1-list)."""
    if isinstance(out, torch.Tensor):
        return out
    out = tuple(out)
    return out[0] if len(out) == 1 else out


class _BoxedAotiProgram:
    """An AOTInductor runner called through its loader's `boxed_run`, its output spec parsed
    once: the runner's own __call__ parses both pytree specs from JSON on every call, 24 us of
    a 0.18 ms `update` (benchmarks/online_latency.md). The twin's programs take tensors only,
    positionally, so the flat inputs are the arguments in order."""

    def __init__(self, loader, out_spec) -> None:
        self._loader = loader
        self._out_spec = out_spec

    def __call__(self, *args: torch.Tensor):
        return pytree.tree_unflatten(self._loader.boxed_run(list(args)), self._out_spec)


def fast_aoti_program(runner):
    """An AOTInductor runner (`load_pt2(...).aoti_runners[name]`) as a _BoxedAotiProgram
    where this torch's runner has the loader API that uses (torch 2.13), else as it is."""
    loader = getattr(runner, "loader", None)
    if loader is None or not hasattr(loader, "boxed_run"):
        return runner
    return _BoxedAotiProgram(loader, pytree.treespec_loads(loader.get_call_spec()[1]))


def load_program_file(data: bytes, format: str, metadata: dict) -> ProgramTwin:
    """The programs of a PT2 twin file (bytes already read and checked).

    Args:
        data: the file's bytes.
        format: "export" or "aoti", as `detect_format` found.
        metadata: its metadata.json (for `program_shapes` and, for aoti, `torch_version`).

    Returns:
        The ProgramTwin.

    Raises:
        ProgramFileError: an AOTInductor package built by another torch version, a package
            that does not load here, a missing program, unreadable programs.
    """
    from torch.export.pt2_archive._package import load_pt2

    if format == "aoti":
        _check_aoti_torch(metadata)
    try:
        contents = load_pt2(io.BytesIO(data))
    except Exception as error:  # torch raises RuntimeError, ValueError, KeyError, ... here
        what = ("the AOTInductor package does not load on this machine "
                f"({platform.system()} {platform.machine()}, torch {torch.__version__})"
                if format == "aoti" else "the exported programs cannot be read")  # fmt: skip
        raise ProgramFileError(f"{what}: {type(error).__name__}: {_first_line(error)}") from error
    found = contents.aoti_runners if format == "aoti" else contents.exported_programs
    missing = [m for m in METHODS if m not in found]
    if missing:
        raise ProgramFileError(
            f"the {format} archive lacks program(s) {missing} (it holds {sorted(found)})"
        )
    if format == "aoti":
        programs = {m: fast_aoti_program(found[m]) for m in METHODS}
    else:
        programs = {m: found[m].module() for m in METHODS}
    shapes = metadata.get("program_shapes") or {}
    max_batch = (shapes.get("batch") or [None, None])[1] or DEFAULT_MAX_BATCH
    min_horizon = (shapes.get("horizon") or [None])[0] or DEFAULT_MIN_HORIZON
    return ProgramTwin(programs, format, int(max_batch), max(int(min_horizon), 1))


def read_extra_metadata(data: bytes) -> str | None:
    """metadata.json's text from a twin file's extra files, without loading what it holds.

    TorchScript (`torch.jit.save(_extra_files=...)`) and PT2 archives (`package_pt2(
    extra_files=...)`) both keep it as `<root>/extra/metadata.json`. None if absent.

    Raises:
        zipfile.BadZipFile: not a readable zip archive.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = [n for n in archive.namelist() if n.count("/") == 2
                 and n.endswith("/extra/" + METADATA_FILE)]  # fmt: skip
        return archive.read(names[0]).decode() if names else None


def _check_aoti_torch(metadata: dict) -> None:
    """An AOTInductor package is native code linked against the torch that compiled it;
    another torch may crash the process rather than raise, so it is refused up front."""
    built = str(metadata.get("torch_version", ""))
    if _release(built) != _release(torch.__version__):
        raise ProgramFileError(
            f"the AOTInductor package was compiled by torch {built or '(unknown)'}, this "
            f"service runs torch {torch.__version__}: re-export on this torch"
        )


def _release(version: str) -> str:
    return version.split("+")[0]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def min_past_rows(metadata: dict) -> int:
    """The fewest past rows every format of an export takes: 2 (the twin's initial_state),
    or more where metadata.json's `program_shapes.past_rows` says the PT2 programs need more
    (a past window cannot be padded: every row enters the initial state)."""
    shapes = metadata.get("program_shapes") or {}
    return max(2, int((shapes.get("past_rows") or [None])[0] or 2))


def format_order(metadata: dict, entry_format: str) -> list[str]:
    """The formats an export wrote, fastest first, for `format: auto`.

    Args:
        metadata: metadata.json of the export's entry file (its `files` and the latencies
            measured at export, `formats.<format>.update_p99_ms`).
        entry_format: the entry file's own format (always a candidate).

    Returns:
        Known formats listed in `files` (and the entry's), by measured update p99, those not
        measured last in the order of FORMATS.
    """
    listed = {f for f in (metadata.get("files") or {}) if f in FORMATS} | {entry_format}
    measured = metadata.get("formats") or {}

    def key(fmt: str) -> tuple:
        p99 = (measured.get(fmt) or {}).get("update_p99_ms")
        ok = isinstance(p99, int | float) and p99 == p99  # not None, not NaN
        return (not ok, float(p99) if ok else 0.0, FORMATS.index(fmt))

    return sorted(listed, key=key)


def sibling(path: Path, metadata: dict, fmt: str) -> Path | None:
    """The file of format `fmt` written beside `path` by the same export (metadata `files`)."""
    name = (metadata.get("files") or {}).get(fmt)
    if not name:
        return None
    return path.parent / Path(str(name)).name
