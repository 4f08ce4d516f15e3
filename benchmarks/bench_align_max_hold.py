"""What `max_hold_s` costs alignment: `align_runs` on one export, the plant's tag dictionary
with and without its held tags' `max_hold_s`, alternating in one process.

    .venv/bin/python benchmarks/bench_align_max_hold.py [--raw data/raw] [--repeats 7]

Reads and validates the export once (configs/data/cdc_default.yaml, configs/plant/cdc_line.yaml),
then times only `align_runs`. Results: benchmarks/prepare.md, "Held tags with max_hold_s".
"""

import argparse
import statistics
import time
from pathlib import Path

import yaml

from data_pipelines.align import align_runs
from data_pipelines.prepare import SIDE_FILES, DataConfig, _read_export, find_historian_files
from data_pipelines.tags import TagDictionary
from data_pipelines.validate import validate

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=REPO / "data" / "raw")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    tags = yaml.safe_load((REPO / "configs/plant/cdc_line.yaml").read_text())["tags"]
    config = DataConfig.from_mapping(
        yaml.safe_load((REPO / "configs/data/cdc_default.yaml").read_text())
    )
    dictionaries = {
        "without": TagDictionary.from_mapping(
            {
                name: {k: v for k, v in spec.items() if k != "max_hold_s"}
                for name, spec in tags.items()
            }  # fmt: skip
        ),
        "with": TagDictionary.from_mapping(tags),
    }
    files = find_historian_files(args.raw, config.historian_glob)
    side = {name: args.raw / name for name in SIDE_FILES if (args.raw / name).is_file()}
    tables, runs = _read_export(files, side, config, dictionaries["with"])
    valid = validate(tables, dictionaries["with"], runs=runs, good_quality=config.good_quality,
                     out_of_range=config.out_of_range,
                     max_bad_timestamp_fraction=config.max_bad_timestamp_fraction)  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in dictionaries}
    for _ in range(args.repeats):
        for name, dictionary in dictionaries.items():
            start = time.perf_counter()
            segments, _ = align_runs(valid.valid, valid.runs, dictionary, dt_s=config.dt_s,
                                     max_gap_s=config.max_gap_s)  # fmt: skip
            seconds[name].append(time.perf_counter() - start)
            print(f"{name:8s} {seconds[name][-1]:.3f} s  {len(segments)} segments", flush=True)
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"{len(valid.valid)} valid samples, {len(valid.runs)} runs; median without "
          f"{medians['without']:.3f} s, with {medians['with']:.3f} s "
          f"({medians['with'] / medians['without']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
