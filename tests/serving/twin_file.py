"""A real twin file for the service tests and the load benchmark, made as a user makes one.

A tiny mechanistic twin is trained by `twin train` (1 epoch) on a 4-run, 30-min simulated
dataset of the CDC line and written by `twin export` into a SQLite MLflow store, by
tests/training/twin_cli.build_twin_file, the build every twin-file test shares (the session
fixture `twin_build` of tests/conftest.py).
The export writes all three formats: twin.pt, twin.pt2 and twin.aoti.pt2 (the AOTInductor
compile is most of its time: 402 s measured on 2 shared, busy cores). The store then holds the
registered version, its `twin_export/` artifacts and the `twin_export.*` tags that
`models:/cdc-line-twin@<alias>` resolves through.

    .venv/bin/python -m tests.serving.twin_file /tmp/serve_twin     # for the benchmark
"""

import sys
from pathlib import Path

from tests.training.twin_cli import build_twin_file

if __name__ == "__main__":
    built = build_twin_file(Path(sys.argv[1]).resolve())
    print(f"twin file: {built.path}\ntracking uri: {built.tracking_uri}")
