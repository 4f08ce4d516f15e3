"""Shared fixtures: seeded generators and float64 precision, as STYLE.md asks.

The seed comes from TWIN_TEST_SEED (default 0) and is printed in the report header so a
failure can be replayed with the same draws. Hypothesis draws are seeded too (derandomized,
no example database): a property test draws the same examples on every machine, so a red CI
run replays here; HYPOTHESIS_PROFILE=explore draws fresh examples when hunting for bugs.
"""

import os
import sys

import numpy as np
import pytest

TEST_SEED = int(os.environ.get("TWIN_TEST_SEED", "0"))

try:  # hypothesis is a dev extra; data tests run without it
    from hypothesis import settings as hypothesis_settings
except ImportError:
    pass
else:
    hypothesis_settings.register_profile("seeded", derandomize=True, database=None)
    hypothesis_settings.register_profile("explore", derandomize=False)
    hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "seeded"))


def pytest_report_header(config):
    return f"TWIN_TEST_SEED={TEST_SEED}"


@pytest.fixture
def seed() -> int:
    return TEST_SEED


@pytest.fixture
def np_rng() -> np.random.Generator:
    return np.random.default_rng(TEST_SEED)


@pytest.fixture
def rng():
    """A seeded torch.Generator; torch is imported lazily so data tests need not load it."""
    import torch

    return torch.Generator().manual_seed(TEST_SEED)


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_restored():
    """Each test leaves MLflow's tracking URI as it found it. `mlflow.set_tracking_uri` (a test's
    own, or the stage a test runs in-process) sets MLflow's global URI and, since MLflow 3,
    MLFLOW_TRACKING_URI too: one test's store was every later test's default, and its
    subprocesses'. mlflow is not imported here: tests that never load it do not pay for it."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:  # None unsets the variable as well
        sys.modules["mlflow"].set_tracking_uri(before)


@pytest.fixture
def float64():
    """Run the test with float64 as torch's default dtype, restored afterwards."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(previous)


# A folder made by `python -m tests.serving.twin_file <folder>` may be reused while developing
# (TWIN_TEST_TWIN=<folder>); by default each test session trains and exports its own, once.
REUSE_TWIN_ENV = "TWIN_TEST_TWIN"


@pytest.fixture(scope="session")
def twin_build(tmp_path_factory):
    """One tiny twin trained and exported (all three formats) by the CLI for the whole session:
    the export tests and the service tests share it (the AOTInductor compile takes minutes)."""
    from pathlib import Path

    from tests.training.twin_cli import build_twin_file, reuse_twin_build

    reuse = os.environ.get(REUSE_TWIN_ENV)
    if reuse:
        return reuse_twin_build(Path(reuse))
    return build_twin_file(tmp_path_factory.mktemp("twin_build"))
