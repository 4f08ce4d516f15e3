"""A real twin file for the service tests and the load benchmark, made as a user makes one.

A tiny mechanistic twin is trained by `twin train` (1 epoch) on a 4-run, 30-min simulated
dataset of the CDC line and written by `twin export` into a SQLite MLflow store, exactly as
tests/training/test_export.py does (its CLI helpers are reused from tests/training/twin_cli.py).
The store then holds the registered version, its `twin_export/twin.pt` artifact and the
`twin_export.*` tags that `models:/cdc-line-twin@<alias>` resolves through.

    .venv/bin/python -m tests.serving.twin_file /tmp/serve_twin     # for the benchmark
"""

import sys
from pathlib import Path
from typing import NamedTuple

from tests.training.twin_cli import TINY_SIZES, build_export_dataset, run_twin

TRAIN = ["model=mechanistic", *TINY_SIZES, "trainer.max_epochs=1"]
EXPORT = ["verify.update_steps=10", "verify.forecast_steps=12", "verify.max_runs=1",
          "num_threads=1"]  # fmt: skip


class TwinBuild(NamedTuple):
    path: Path  # the exported twin file
    tracking_uri: str  # the SQLite MLflow store holding its registered version
    dataset: Path  # the prepared dataset it was trained on


def build_twin_file(folder: Path) -> TwinBuild:
    """Train and export a tiny twin into folder (about a minute on one core).

    Raises:
        RuntimeError: `twin train` or `twin export` failed (its output is in the message).
    """
    folder.mkdir(parents=True, exist_ok=True)
    dataset = build_export_dataset(folder)
    uri = f"sqlite:///{folder / 'store.db'}"
    out = folder / "twin.pt"
    for args in (
        ["train", f"datamodule.path={dataset}", *TRAIN],
        ["export", f"data_path={dataset}", f"out={out}", *EXPORT],
    ):
        result = run_twin(folder, uri, *args)
        if result.returncode != 0:
            raise RuntimeError(f"twin {args[0]} failed:\n{result.stdout[-3000:]}"
                               f"\n{result.stderr[-3000:]}")  # fmt: skip
    return TwinBuild(out, uri, dataset)


if __name__ == "__main__":
    built = build_twin_file(Path(sys.argv[1]).resolve())
    print(f"twin file: {built.path}\ntracking uri: {built.tracking_uri}")
