"""A toy twin with the OnlineTwin's method signatures, written in the twin file formats.

For the unit tests of format detection, choice and fallback (tests/serving/test_twin_formats.py):
they need files that load in a second, not a trained model. Two inputs, two measurements, two
states; `forecast` is causal (row k sees inputs up to row k), as the real twin's is. The export
format is written with the same `package_pt2` call as training/export_formats.py; the AOTI
format is only faked (a zip laid out as one, with a library that is not one), which is enough
for the checks made before and around its load. The real twin's three files are tested in
tests/serving/test_formats.py.
"""

import io
import json
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

METHODS = ("initial_state", "update", "forecast")
METADATA = {
    "format_version": 1,
    "model_kind": "toy",
    "registered_version": "1",
    "dt_s": 5.0,
    "dtype": "float64",
    "input_tags": ["U1", "U2"],
    "measurement_tags": ["Y1", "Y2"],
    "state_names": ["x1", "x2"],
    "units": {"U1": "kg/h", "U2": "rpm", "Y1": "%", "Y2": "%"},
    "torch_version": torch.__version__,
}


class ToyTwin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("gain", torch.tensor([0.5, -0.25], dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return x

    @torch.jit.export
    def initial_state(self, past_u: Tensor, past_y: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        x = torch.nan_to_num(past_y[:, -1]) + self.gain * past_u[:, -1]
        batch = x.shape[0]
        P = torch.eye(2, dtype=x.dtype).expand(batch, 2, 2).contiguous()
        run_length = torch.zeros_like(x[:, 0]).to(torch.int64)
        return x, P, past_u[:, -1].clone(), torch.zeros_like(x), run_length

    @torch.jit.export
    def update(self, x: Tensor, P: Tensor, u_held: Tensor, ewma: Tensor, run_length: Tensor,
               inputs: Tensor, measurement: Tensor, mask: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                          Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        prediction = x + self.gain * u_held
        residual = torch.where(mask, measurement - prediction, torch.zeros_like(prediction))
        x_new = prediction + 0.5 * residual
        ewma_new = 0.9 * ewma + 0.1 * residual
        t2 = (residual * residual).sum(1)
        limit = torch.full_like(t2, 4.0)
        alarm = t2 > limit
        return (x_new, P * 0.9, inputs.clone(), ewma_new, run_length + 1, prediction, residual,
                torch.ones_like(residual), t2, limit, ewma_new.abs(), alarm, residual * residual,
                torch.zeros_like(run_length))  # fmt: skip

    @torch.jit.export
    def forecast(self, past_u: Tensor, past_y: Tensor, u: Tensor) -> Tensor:
        start = torch.nan_to_num(past_y[:, -1:])
        return start + torch.cumsum(u * self.gain, dim=1)


class _Method(nn.Module):
    def __init__(self, twin: nn.Module, name: str) -> None:
        super().__init__()
        self.twin = twin
        self.name = name

    def forward(self, *args: Tensor):
        return getattr(self.twin, self.name)(*args)


def examples(batch: int = 2, past: int = 3, horizon: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    u = torch.rand(batch, past + horizon, 2, generator=g, dtype=torch.float64)
    y = torch.rand(batch, past + horizon, 2, generator=g, dtype=torch.float64)
    state = ToyTwin().initial_state(u[:, :past], y[:, :past])
    row_y = y[:, past]
    args = {
        "initial_state": (u[:, :past], y[:, :past]),
        "update": (*state, u[:, past], row_y, torch.isfinite(row_y)),
        "forecast": (u[:, :past], y[:, :past], u[:, past:]),
    }
    return {m: tuple(a.contiguous() for a in a_m) for m, a_m in args.items()}


def write_torchscript(path: Path, metadata: dict) -> Path:
    torch.jit.save(torch.jit.script(ToyTwin()), str(path),
                   _extra_files={"metadata.json": json.dumps(metadata)})  # fmt: skip
    return path


def export_bytes(metadata: dict, methods=METHODS) -> bytes:
    """The toy as a `torch.export` PT2 archive (dynamic batch, past rows and horizon)."""
    from torch.export import Dim
    from torch.export.pt2_archive._package import package_pt2

    batch, past, horizon = Dim("batch", min=1, max=4096), Dim("past", min=2), Dim("h", min=2)
    shapes = {
        "initial_state": ({0: batch, 1: past}, {0: batch, 1: past}),
        "update": tuple({0: batch} for _ in range(8)),
        "forecast": ({0: batch, 1: past}, {0: batch, 1: past}, {0: batch, 1: horizon}),
    }
    args = examples()
    programs = {m: torch.export.export(_Method(ToyTwin(), m), args[m],
                                       dynamic_shapes=(shapes[m],), strict=False)
                for m in methods}  # fmt: skip
    buffer = io.BytesIO()
    package_pt2(buffer, exported_programs=programs,
                extra_files={"metadata.json": json.dumps(metadata)})  # fmt: skip
    return buffer.getvalue()


def fake_aoti_bytes(metadata: dict) -> bytes:
    """A zip laid out as an AOTInductor PT2 archive whose libraries are not libraries."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("twin/archive_format", "pt2")
        archive.writestr("twin/archive_version", "0")
        archive.writestr("twin/.data/version", "1\n")
        archive.writestr("twin/extra/metadata.json", json.dumps(metadata))
        for m in METHODS:
            archive.writestr(f"twin/data/aotinductor/{m}/{m}.so", b"\x7fELF not a library")
            archive.writestr(f"twin/data/aotinductor/{m}/{m}.cpp", "// nothing")
    return buffer.getvalue()


def write_export_set(folder: Path, formats: dict, **changes) -> Path:
    """twin.pt plus twin.pt2 (and a fake twin.aoti.pt2) with one metadata; `formats` gives each
    format's measured latencies (metadata `formats`). Returns twin.pt's path."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {"torchscript": "twin.pt", "export": "twin.pt2", "aoti": "twin.aoti.pt2"}
    metadata = {**METADATA, "files": {f: names[f] for f in formats}, "formats": formats,
                "program_shapes": {"batch": [1, 4096], "past_rows": [2, None],
                                   "horizon": [2, None]}, **changes}  # fmt: skip
    if "export" in formats:
        (folder / "twin.pt2").write_bytes(export_bytes({**metadata, "format": "export"}))
    if "aoti" in formats:
        (folder / "twin.aoti.pt2").write_bytes(fake_aoti_bytes({**metadata, "format": "aoti"}))
    return write_torchscript(folder / "twin.pt", {**metadata, "format": "torchscript"})
