"""The twin beside the TorchScript file: a `torch.export` program and an AOTInductor package.

Data flow (inside `twin export`, training/export.py): the eager `OnlineTwin` -> one
`torch.export` program per online method (`PROGRAMS`), with a dynamic batch, past window and
horizon -> `twin.pt2` (the programs, any platform torch runs on) and, compiled by AOTInductor
to C++ for this machine, `twin.aoti.pt2` -> each read back from its bytes as the service reads
it (`load_pt2_twin`: serving's `ProgramTwin`) and verified against the eager module exactly as
the TorchScript file is. Both are PT2 archives (`torch.export.pt2_archive`) holding
`metadata.json` as an extra file; docs/export.md.

Why a PT2 twin: `torch.jit.script` is deprecated in torch 2.13, and plants keep a validated
twin for years. Why the compiled one: an online `update` is hundreds of tiny ops; compiled,
they become a few C++ kernels (benchmarks/online_latency.md).

Calling a PT2 program (what `ProgramTwin` does, and any other caller must do): every tensor
argument contiguous (an AOTInductor program reads its inputs with the strides it was compiled
for, and a strided view gives wrong numbers, not an error), and a forecast horizon of at least
`MIN_HORIZON` rows (the model is causal: pad a shorter one by repeating its last row and keep
the first rows of the result).
"""

import io
import json
import statistics
import time
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.export import Dim
from torch.export.pt2_archive._package import package_pt2
from torch.fx.experimental import _config as fx_config

from hybrid_twin import TwinError
from serving.twin_formats import (
    ProgramFileError,
    ProgramTwin,
    detect_format,
    load_program_file,
    read_extra_metadata,
)

FORMATS = ("torchscript", "export", "aoti")
PT2_FORMATS = ("export", "aoti")
PROGRAMS = ("initial_state", "update", "forecast")
METADATA_FILE = "metadata.json"
MAX_BATCH = 4096  # lines in one call; the service batches at most a few hundred
MIN_PAST_ROWS = 2  # as OnlineTwin.initial_state
MIN_HORIZON = 2  # a 1-row horizon has no interval to integrate: a size-0 time loop
# The shapes the programs take, recorded in the metadata ("program_shapes").
PROGRAM_SHAPES = {"batch": [1, MAX_BATCH], "past_rows": [MIN_PAST_ROWS, None],
                  "horizon": [MIN_HORIZON, None]}  # fmt: skip


class TwinFormatError(TwinError, ValueError):
    """A format cannot be built or read: an unknown name, a failed export or compile, a
    damaged PT2 file or one without a program or metadata."""


def format_paths(out: Path) -> dict[str, Path]:
    """The file of each format for the TorchScript file `out`: twin.pt -> twin.pt2 (export),
    twin.aoti.pt2 (aoti), in the same folder."""
    return {
        "torchscript": out,
        "export": out.with_suffix(".pt2"),
        "aoti": out.with_name(out.stem + ".aoti.pt2"),
    }


class _Method(nn.Module):
    """One method of the OnlineTwin as `forward`: what torch.export traces."""

    def __init__(self, online: nn.Module, name: str) -> None:
        super().__init__()
        self.online = online
        self.name = name

    def forward(self, *args: Tensor):
        return getattr(self.online, self.name)(*args)


def example_arguments(online: nn.Module, u: Tensor, y: Tensor, past_steps: int) -> dict:
    """Arguments of each program for tracing, from the first line of u, y ((R, T, n) tag units)
    taken twice: the past window, the state after it, the next row and a short horizon.
    (Batch 2: torch.export would fix a dynamic size that its example gives as 1.)"""
    u, y = u[:1].expand(2, -1, -1).contiguous(), y[:1].expand(2, -1, -1).contiguous()
    past_u, past_y = u[:, :past_steps].contiguous(), y[:, :past_steps].contiguous()
    with torch.no_grad():
        # Contiguous copies: the monitor's initial memory is an expand (batch stride 0), and
        # AOTInductor compiles for the example's strides: it would read row 0 for every line.
        state = tuple(t.contiguous() for t in online.initial_state(past_u, past_y))
    row_u, row_y = u[:, past_steps].contiguous(), y[:, past_steps].contiguous()
    horizon = min(u.shape[1] - past_steps, 8)
    future = u[:, past_steps : past_steps + horizon].contiguous()
    return {
        "initial_state": (past_u, past_y),
        "update": (*state, row_u, row_y, torch.isfinite(row_y)),
        "forecast": (past_u, past_y, future),
    }


def _dynamic_shapes() -> dict:
    batch = Dim("batch", min=1, max=MAX_BATCH)
    past = Dim("past_rows", min=MIN_PAST_ROWS)
    horizon = Dim("horizon", min=MIN_HORIZON)
    return {
        "initial_state": ({0: batch, 1: past}, {0: batch, 1: past}),
        "update": tuple({0: batch} for _ in range(8)),
        "forecast": ({0: batch, 1: past}, {0: batch, 1: past}, {0: batch, 1: horizon}),
    }


def export_programs(online: nn.Module, examples: dict) -> dict:
    """One `torch.export` program per method in PROGRAMS, dynamic in batch, past rows and
    horizon (the solver's time loop becomes a `while_loop`).

    Raises:
        TwinFormatError: torch.export failed (the message names the method and the cause).
    """
    programs = {}
    shapes = _dynamic_shapes()
    for name in PROGRAMS:
        try:
            # Size-oblivious: a size of 0 or 1 is not special-cased, so one program serves a
            # past window of 2 rows as well as one of 700 (the is-contiguous checks of the
            # burn-in's time rows would otherwise fix past_rows >= 4).
            with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
                programs[name] = torch.export.export(
                    _Method(online, name).eval(), examples[name],
                    dynamic_shapes=(shapes[name],), strict=False,
                )  # fmt: skip
        except Exception as error:  # torch.export raises many kinds; say which method failed
            raise TwinFormatError(
                f"torch.export of the twin's {name}: {type(error).__name__}: {_head(error)}"
            ) from error
    return programs


def compile_programs(programs: dict, options: dict | None = None) -> dict:
    """AOTInductor: each program compiled to a shared library for this platform; the files
    to package (`torch._inductor.aot_compile` with `aot_inductor.package`). `options`: more
    inductor settings (benchmarks/bench_online.py tries some).

    Raises:
        TwinFormatError: the compile failed (no C++ compiler, an unsupported op, ...).
    """
    compiled = {}
    for name, program in programs.items():
        try:
            compiled[name] = torch._inductor.aot_compile(
                program.module(), program.example_inputs[0],
                options={**(options or {}), "aot_inductor.package": True},
            )  # fmt: skip
        except Exception as error:  # inductor raises many kinds; say which method failed
            raise TwinFormatError(
                f"AOTInductor compile of the twin's {name}: {type(error).__name__}: "
                f"{_head(error)}"
            ) from error
    return compiled


def _head(error: Exception, lines: int = 6) -> str:
    """The first lines of an error (torch's constraint violations list the shapes there)."""
    return "\n".join(str(error).strip().splitlines()[:lines])


def package(fmt: str, built: dict, metadata: dict) -> bytes:
    """The PT2 archive of one format, as bytes: `built` is export_programs' (export) or
    compile_programs' (aoti) result. Its metadata.json always says what a reader of the
    programs needs (`PROGRAM_SHAPES`, the torch that built them), `metadata` the rest."""
    buffer = io.BytesIO()
    program_facts = {"program_shapes": PROGRAM_SHAPES, "torch_version": torch.__version__}
    extra = {METADATA_FILE: json.dumps({**program_facts, **metadata})}
    if fmt == "export":
        package_pt2(buffer, exported_programs=built, extra_files=extra)
    elif fmt == "aoti":
        package_pt2(buffer, aoti_files=built, extra_files=extra)
    else:
        raise TwinFormatError(f"format {fmt!r} is not a PT2 format ({', '.join(PT2_FORMATS)})")
    return buffer.getvalue()


def load_pt2_twin(source: str | Path | bytes) -> tuple[ProgramTwin, dict]:
    """A PT2 twin file (path or its bytes) as the service reads it, and its metadata: the
    service's own `ProgramTwin` (serving/twin_formats.py), so what `twin export` verifies
    and times is the caller the service runs.

    Raises:
        TwinFormatError: no such file, not a readable PT2 archive (truncated, corrupted, a
            TorchScript file), no metadata.json, or programs that do not load here (a program
            missing, an AOTInductor package of another torch or platform).
    """
    where = f"twin file {source}" if not isinstance(source, bytes) else "twin PT2 bytes"
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        fmt = detect_format(data)
        if fmt not in PT2_FORMATS:
            raise ProgramFileError(f"it holds the {fmt} format")
        text = read_extra_metadata(data)
    except (OSError, ProgramFileError, zipfile.BadZipFile) as error:
        raise TwinFormatError(
            f"{where} is not a readable PT2 archive (truncated or corrupted? re-run `twin "
            f"export`): {error}"
        ) from error
    try:
        metadata = json.loads(text or "")
    except json.JSONDecodeError as error:
        raise TwinFormatError(f"{where}: {METADATA_FILE} missing or not JSON: {error}") from error
    try:
        return load_program_file(data, fmt, metadata), metadata
    except ProgramFileError as error:
        raise TwinFormatError(f"{where} ({fmt} format): {error}") from error


def measure_latency(twin, u: Tensor, y: Tensor, past_steps: int, steps: int) -> dict:
    """ms of `update` (p50, p99 over `steps` steps at batch 1, after 10 untimed) and of one
    `forecast` over the rest of the first line, as recorded at export to rank the formats
    (the service's `format: auto`); benchmarks/bench_online.py is the careful measurement."""
    u, y = u[:1], y[:1]
    times = []
    with torch.no_grad():
        state = tuple(twin.initial_state(u[:, :past_steps], y[:, :past_steps]))
        last = min(u.shape[1], past_steps + steps + 10)
        for k in range(past_steps, last):
            row_y = y[:, k]
            started = time.perf_counter()
            out = twin.update(*state, u[:, k], row_y, torch.isfinite(row_y))
            times.append(time.perf_counter() - started)
            state = tuple(out[:5])
        started = time.perf_counter()
        twin.forecast(u[:, :past_steps], y[:, :past_steps], u[:, past_steps:])
        forecast_ms = (time.perf_counter() - started) * 1e3
    times = sorted(times[10:] or times)
    return {
        "update_p50_ms": statistics.median(times) * 1e3,
        "update_p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))] * 1e3,
        "update_steps_timed": len(times),
        "forecast_ms": forecast_ms,
        "forecast_steps": int(u.shape[1] - past_steps),
    }
