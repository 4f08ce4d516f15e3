"""Fixtures of the service tests: one real twin file, its data rows, a running server.

The twin is trained and exported by the `twin` CLI once per test session: the `twin_build`
fixture of tests/conftest.py, shared with tests/training/test_export.py. Rows for the service
come from the same simulated runs it was trained on, in tag units, so the twin's answers are
those of a plausible line.
"""

import json

import pandas as pd
import pytest
import torch

from tests.serving.server import Server, start_server, stop_server


@pytest.fixture(scope="session")
def metadata(twin_build) -> dict:
    extra = {"metadata.json": ""}
    torch.jit.load(str(twin_build.path), _extra_files=extra)
    return json.loads(extra["metadata.json"])


@pytest.fixture(scope="session")
def runs(twin_build, metadata) -> list[list[dict]]:
    """Every run of the dataset as service rows: {timestamp, inputs, measurements}."""
    manifest = json.loads((twin_build.dataset / "manifest.json").read_text())
    rows = []
    for run in manifest["runs"].values():
        frame = pd.read_parquet(twin_build.dataset / run["file"])
        rows.append([_row(r, metadata) for r in frame.to_dict("records")])
    return rows


def _row(record: dict, metadata: dict) -> dict:
    def value(v):
        return None if pd.isna(v) else float(v)

    return {
        "timestamp": pd.Timestamp(record["timestamp"]).isoformat(),
        "inputs": {t: float(record[t]) for t in metadata["input_tags"]},
        "measurements": {t: value(record[t]) for t in metadata["measurement_tags"]},
    }


@pytest.fixture(scope="session")
def twin(twin_build):
    """The twin file loaded with plain torch: the reference the service must agree with."""
    return torch.jit.load(str(twin_build.path))


@pytest.fixture(scope="module")
def server(twin_build, tmp_path_factory) -> Server:
    """A server on the twin file with the default settings and a token; stopped by PID."""
    folder = tmp_path_factory.mktemp("server")
    running = start_server(folder, f"model_uri={twin_build.path}", "sessions.max_sessions=64",
                           "limits.max_body_bytes=200000")  # fmt: skip
    yield running
    stop_server(running)
