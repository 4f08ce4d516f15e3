"""The Cascaded Tanks benchmark CSV -> a historian export that `twin prepare` reads as it is.

The benchmark (Schoukens, Mattsson, Wigren and Noel, 2016; benchmarks/data/cascaded_tanks)
ships one CSV with two records side by side: `uEst, yEst` (estimation) and `uVal, yVal`
(validation), sampled every `Ts` = 4 s. A plant historian would hold the same signals as tags
over time, so this writes exactly that, and nothing downstream knows it came from a benchmark:

- `historian.csv`, wide format: `timestamp, PUMP.VOLTAGE [V], TANK2.LEVEL [V]`; the
  estimation record from `start`, the validation record a day later (two separate runs);
- `runs.csv`: run `estimation` with split `train`, run `validation` with split `test`, so
  the validation record is used for nothing during estimation (the benchmark's protocol);
- `tag_dictionary.csv`: the export's own claim about its tags, checked against
  configs/plant/cascaded_tanks.yaml by `twin prepare`.

    python -m data_pipelines.cascaded_tanks benchmarks/data/cascaded_tanks/dataBenchmark.csv \
        data/cascaded_tanks/raw
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipelines.errors import DataValidationError
from data_pipelines.timestamps import EARLIEST_NS

INPUT_TAG = "PUMP.VOLTAGE"
OUTPUT_TAG = "TANK2.LEVEL"
RECORDS = (("estimation", "uEst", "yEst", "train"), ("validation", "uVal", "yVal", "test"))
DEFAULT_START = "2016-01-01T00:00:00+00:00"  # any instant; the benchmark gives none
RECORD_SPACING = pd.Timedelta(days=1)  # between the two records' starts: separate runs


def read_benchmark(path: Path) -> tuple[pd.DataFrame, float]:
    """The benchmark CSV as a frame of the four signal columns, and its sample time.

    Reads the plain copy and the publisher's (quoted header, trailing commas) alike.

    Raises:
        DataValidationError: unreadable file, a missing column, a non-numeric or missing
            value (naming the column and 1-based data row), or no positive `Ts`.
    """
    try:
        frame = pd.read_csv(path, skipinitialspace=True, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as error:
        raise DataValidationError(f"{path}: cannot read the benchmark CSV: {error}") from error
    frame = frame.loc[:, [c for c in frame.columns if not str(c).startswith("Unnamed")]]
    needed = ["uEst", "yEst", "uVal", "yVal", "Ts"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataValidationError(f"{path}: missing columns {missing}; found {list(frame.columns)}")
    signals = frame[needed[:4]].apply(pd.to_numeric, errors="coerce")
    bad = np.argwhere(~np.isfinite(signals.to_numpy()))
    if bad.size:
        row, col = bad[0]
        raise DataValidationError(
            f"{path.name} row {row + 1} column {needed[col]}: {frame[needed[col]].iloc[row]!r} "
            f"is not a number"
        )
    ts = pd.to_numeric(frame["Ts"], errors="coerce").dropna()
    if ts.empty or not ts.iloc[0] > 0:
        raise DataValidationError(f"{path}: column Ts holds no positive sample time")
    return signals, float(ts.iloc[0])


def write_export(csv_path: Path, out_dir: Path, start: str = DEFAULT_START) -> dict[str, Path]:
    """Write the historian export of the benchmark into `out_dir` (created if needed).

    Args:
        csv_path: dataBenchmark.csv (plain or publisher copy).
        out_dir: the export folder, `twin prepare`'s data.raw_dir.
        start: ISO 8601 instant of the estimation record's first sample, with its UTC offset.

    Returns:
        {"historian", "runs", "tag_dictionary"}: the files written.

    Raises:
        DataValidationError: see `read_benchmark`; a start without a UTC offset.
    """
    signals, ts_s = read_benchmark(Path(csv_path))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = pd.Timestamp(start)
    if t0.tzinfo is None:
        raise DataValidationError(
            f"start {start!r}: give the instant with its UTC offset (e.g. {DEFAULT_START})"
        )
    t0 = t0.tz_convert("UTC")  # the export writes UTC, and runs.csv must name the same instants
    if t0.value < EARLIEST_NS:
        raise DataValidationError(f"start {start!r}: before 1980, which `twin prepare` reads "
                                  "as the placeholder of a time never set")  # fmt: skip
    offsets = pd.to_timedelta(np.arange(len(signals)) * ts_s, unit="s")
    frames, runs = [], []
    for i, (run_id, u_col, y_col, split) in enumerate(RECORDS):
        times = t0 + i * RECORD_SPACING + offsets
        frames.append(
            pd.DataFrame(
                {
                    # milliseconds kept: a sample time under 1 s must not repeat a timestamp
                    "timestamp": [t.isoformat(timespec="milliseconds") for t in times],
                    f"{INPUT_TAG} [V]": signals[u_col].to_numpy(),
                    f"{OUTPUT_TAG} [V]": signals[y_col].to_numpy(),
                }
            )
        )
        runs.append(
            {
                "run_id": run_id,
                "start": times[0].isoformat(),
                "end": times[-1].isoformat(),
                "kind": "normal",
                "regime": "interpolation",
                "split": split,
            }
        )
    paths = {
        "historian": out_dir / "historian.csv",
        "runs": out_dir / "runs.csv",
        "tag_dictionary": out_dir / "tag_dictionary.csv",
    }
    pd.concat(frames).to_csv(paths["historian"], index=False, float_format="%.6g")
    pd.DataFrame(runs).to_csv(paths["runs"], index=False)
    pd.DataFrame(
        {
            "tag": [INPUT_TAG, OUTPUT_TAG],
            "role": ["input", "measurement"],
            "unit": ["V", "V"],
            "sample_period_s": [ts_s, ts_s],
            "description": ["pump voltage", "lower tank level sensor"],
        }
    ).to_csv(paths["tag_dictionary"], index=False)
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m data_pipelines.cascaded_tanks <dataBenchmark.csv> <out_dir>`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="dataBenchmark.csv")
    parser.add_argument("out_dir", type=Path, help="historian export folder to write")
    parser.add_argument("--start", default=DEFAULT_START, help="first sample's ISO 8601 instant")
    args = parser.parse_args(argv)
    for name, path in write_export(args.csv, args.out_dir, args.start).items():
        print(f"cascaded_tanks: wrote {name} {path}")


if __name__ == "__main__":
    main()
