"""`write_historian_export`: the plant simulator's entry point, and the files it writes.

The whole of plant_sim in one call (what `twin generate` runs): check the configs ->
design_campaign -> simulate_runs -> measure_run per run -> the five files of
docs/data_contracts.md section 1. The historian is long format `timestamp, tag, value,
quality`, sorted by time and then by the dictionary's tag order; Parquet stores the time as
timestamp[ms, UTC], CSV as ISO 8601 text with offset. The writers set everything that could
vary between runs (compression, column types, no pandas index), so the same seed gives the
same bytes.
"""

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from data_pipelines.plant_sim.config import check_tags, validate_sim_config
from data_pipelines.plant_sim.design import design_campaign
from data_pipelines.plant_sim.records import (
    check_design_fits_tags,
    events_table,
    fault_labels_table,
    iso_ms,
    runs_table,
    tag_table,
)
from data_pipelines.plant_sim.sensors import QUALITIES, TAG_UNITS, measure_run
from data_pipelines.plant_sim.simulate import Truth, simulate_runs

FILE_FORMATS = ("parquet", "csv")
HISTORIAN_COLUMNS = ["timestamp", "tag", "value", "quality"]


def write_historian_export(
    out_dir: Path, *, tags: dict, sim: dict, seed: int, file_format: str = "parquet"
) -> dict:
    """Simulate a campaign of the CDC line and write it as a historian export.

    Args:
        out_dir: folder to write into (created if missing). A historian file of the other
            format left there by an earlier export is removed, so a reader never sees both.
        tags: the `tags:` mapping of configs/plant/cdc_line.yaml (plain dicts).
        sim: the content of configs/sim/cdc_default.yaml (plain dicts, every key present).
        seed: campaign seed; the same seed and configs give byte-identical files.
        file_format: "parquet" or "csv", for the historian file (the others are CSV).

    Returns:
        {"out_dir", "file_format", "seed", "files": {name: {"rows", "bytes"}}, "n_runs",
        "runs": {"normal_interpolation", "normal_extrapolation", "fault"},
        "historian_quality": {quality: rows}, "seconds": wall time}.

    Raises:
        ValueError: bad file_format or seed; a sim key unknown, missing or outside its allowed range
            (the message names the key and the range); a tag dictionary that disagrees with
            the simulator's tags; design setpoints outside their tags' ranges.
    """
    started = time.perf_counter()
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format {file_format!r} is not one of {list(FILE_FORMATS)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:  # 1.7 is not seed 1
        raise ValueError(f"seed = {seed!r} must be a whole number >= 0")
    sim = validate_sim_config(sim)
    tags = check_tags(tags, TAG_UNITS)
    check_design_fits_tags(sim, tags)
    runs = design_campaign(sim, seed)
    truth = simulate_runs(runs, sim)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    historian = historian_table(truth, tags, sim)
    files = _write_files(out_dir, historian, truth, tags, file_format)
    kinds = [f"{run.kind}_{run.regime}" if run.kind == "normal" else "fault" for run in runs]
    qualities = np.bincount(historian["quality"], minlength=len(QUALITIES))
    return {
        "out_dir": str(out_dir),
        "file_format": file_format,
        "seed": int(seed),
        "files": files,
        "n_runs": len(runs),
        "runs": {
            k: kinds.count(k) for k in ("normal_interpolation", "normal_extrapolation", "fault")
        },
        "historian_quality": {q: int(n) for q, n in zip(QUALITIES, qualities, strict=True)},
        "seconds": round(time.perf_counter() - started, 3),
    }


def _write_files(
    out_dir: Path, historian: dict, truth: Truth, tags: dict, file_format: str
) -> dict[str, dict]:
    """Write the historian and the four CSV tables; returns {name: {"rows", "bytes"}}."""
    name = f"historian.{file_format}"
    files = {name: _write_historian(historian, list(tags), truth.runs, out_dir, file_format)}
    for other in FILE_FORMATS:
        stale = out_dir / f"historian.{other}"
        if other != file_format and stale.exists():
            stale.unlink()
    tables = {
        "tag_dictionary.csv": tag_table(tags),
        "runs.csv": runs_table(truth.runs),
        "events.csv": events_table(truth, tags),
        "fault_labels.csv": fault_labels_table(truth),
    }
    for name, frame in tables.items():
        path = out_dir / name
        frame.to_csv(path, index=False, lineterminator="\n")
        files[name] = {"rows": len(frame), "bytes": path.stat().st_size}
    return files


def historian_table(truth: Truth, tags: dict, sim: dict) -> dict[str, np.ndarray]:
    """All historian rows of a simulated batch, in export order.

    Args:
        truth: the simulated campaign.
        tags: the checked tag dictionary (config.check_tags).
        sim: the validated sim config.

    Returns:
        {"epoch_ms": int64 UTC ms, "run": int32 batch row, "t_s": int64 s after the run
        start, "tag": int32 index into list(tags), "value": float64 (NaN unless Good),
        "quality": int8 index into sensors.QUALITIES}, sorted by time, then tag.
    """
    parts = []
    for r, run in enumerate(truth.runs):
        rows = measure_run(truth, r, tags, sim)
        order = np.lexsort((rows["tag"], rows["t_s"]))
        rows = {key: values[order] for key, values in rows.items()}
        rows["run"] = np.full(order.size, r, dtype=np.int32)
        rows["epoch_ms"] = run.start_ms + 1000 * rows["t_s"]
        parts.append(rows)
    # runs follow one another in time (design.py), so concatenating keeps the time order
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _write_historian(
    rows: dict[str, np.ndarray], tag_names: list[str], runs: list, out_dir: Path, file_format: str
) -> dict:
    """Write the historian rows as Parquet or CSV; returns {"rows", "bytes"}."""
    path = out_dir / f"historian.{file_format}"
    tag = pa.DictionaryArray.from_arrays(pa.array(rows["tag"]), pa.array(tag_names))
    quality = pa.DictionaryArray.from_arrays(
        pa.array(rows["quality"].astype(np.int32)), pa.array(list(QUALITIES))
    )
    value = pa.array(rows["value"], mask=np.isnan(rows["value"]))
    if file_format == "parquet":
        timestamp = pa.array(rows["epoch_ms"], type=pa.timestamp("ms", tz="UTC"))
    else:
        timestamp = _timestamp_text(rows, runs)
    table = pa.table(
        [timestamp, tag.cast(pa.string()), value, quality.cast(pa.string())],
        names=HISTORIAN_COLUMNS,
    )
    if file_format == "parquet":
        pq.write_table(table, path, compression="zstd")
    else:
        with path.open("wb") as sink:
            sink.write((",".join(HISTORIAN_COLUMNS) + "\n").encode())
            # no field holds a comma or a quote, so nothing needs quoting
            pcsv.write_csv(
                table, sink, pcsv.WriteOptions(include_header=False, quoting_style="none")
            )
    return {"rows": table.num_rows, "bytes": path.stat().st_size}


def _timestamp_text(rows: dict[str, np.ndarray], runs: list) -> pa.Array:
    """ISO 8601 text of every row, formatted once per second of each run, not once per row."""
    n_s = runs[0].duration_s
    starts = np.array([run.start_ms for run in runs], dtype=np.int64)
    seconds = (starts[:, None] + 1000 * np.arange(n_s, dtype=np.int64)).ravel()
    codes = rows["run"].astype(np.int64) * n_s + rows["t_s"]
    return pa.DictionaryArray.from_arrays(
        pa.array(codes.astype(np.int32)), pa.array(iso_ms(seconds))
    ).cast(pa.string())
