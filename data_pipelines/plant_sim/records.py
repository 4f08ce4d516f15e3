"""The small tables of a historian export: runs, events, fault labels, tag dictionary.

Built by export.py from the RunSpecs and the Truth, with the columns of
docs/data_contracts.md section 1. Times are ISO 8601 strings with milliseconds and the UTC
offset (`2025-03-01T06:00:00.000+00:00`).
"""

import numpy as np
import pandas as pd

from data_pipelines.plant_sim.design import RunSpec
from data_pipelines.plant_sim.faults import AFFECTED, fault_window
from data_pipelines.plant_sim.sensors import resolution_decimals
from data_pipelines.plant_sim.simulate import Truth

RUN_COLUMNS = [
    "run_id",
    "start",
    "end",
    "kind",
    "regime",
    "throughput_kg_h",
    "api_fraction",
    "blender_speed_rpm",
]
EVENT_COLUMNS = ["timestamp", "run_id", "event", "unit", "tag", "value"]
LABEL_COLUMNS = [
    "run_id",
    "fault_kind",
    "onset",
    "end",
    "magnitude",
    "affected_unit",
    "affected_tag",
]
TAG_COLUMNS = ["tag", "role", "unit", "sample_period_s", "range_low", "range_high", "description"]
_FEEDER_UNITS = ("FEED_API", "FEED_EXC", "FEED_LUB")


def iso_ms(epoch_ms: np.ndarray) -> np.ndarray:
    """ISO 8601 strings with milliseconds and +00:00 of UTC epoch milliseconds (int64)."""
    stamps = np.asarray(epoch_ms, dtype=np.int64).astype("datetime64[ms]")
    return np.char.add(np.datetime_as_string(stamps, unit="ms"), "+00:00")


def runs_table(runs: list[RunSpec]) -> pd.DataFrame:
    """runs.csv: one row per run with its first setpoints (later steps are events).

    A run holds samples at start <= t < end; `end` is start + duration.
    """
    starts = np.array([run.start_ms for run in runs], dtype=np.int64)
    ends = starts + 1000 * np.array([run.duration_s for run in runs], dtype=np.int64)
    return pd.DataFrame(
        {
            "run_id": [run.run_id for run in runs],
            "start": iso_ms(starts),
            "end": iso_ms(ends),
            "kind": [run.kind for run in runs],
            "regime": [run.regime for run in runs],
            "throughput_kg_h": [round(run.steps[0].throughput_kg_h, 4) for run in runs],
            "api_fraction": [round(run.steps[0].api_fraction, 5) for run in runs],
            "blender_speed_rpm": [round(run.steps[0].blender_speed_rpm, 2) for run in runs],
        },
        columns=RUN_COLUMNS,
    )


def events_table(truth: Truth, tags: dict) -> pd.DataFrame:
    """events.csv: refill_start / refill_end of every feeder and every setpoint change.

    Refill values are the true hopper mass (kg) at the event; setpoint changes carry the new
    setpoint in the tag's unit. Sorted by time, then run, event and tag.
    """
    rows = []
    for r, run in enumerate(truth.runs):
        rows += _refill_events(truth, r, run)
        rows += _setpoint_events(truth, r, run, tags)
    frame = pd.DataFrame(rows, columns=["ms", *EVENT_COLUMNS[1:]])
    frame = frame.sort_values(["ms", "run_id", "event", "tag"], kind="stable")
    frame.insert(0, "timestamp", iso_ms(frame.pop("ms").to_numpy()))
    return frame.reset_index(drop=True)


def _refill_events(truth: Truth, r: int, run: RunSpec) -> list[tuple]:
    rows = []
    refilling = truth["refilling"][r]
    for i, unit in enumerate(_FEEDER_UNITS):
        change = np.diff(refilling[:, i].astype(np.int8))
        for event, seconds in (
            ("refill_start", np.flatnonzero(change == 1) + 1),
            ("refill_end", np.flatnonzero(change == -1) + 1),
        ):
            for t_s in seconds:
                mass = round(float(truth["hopper_kg"][r, t_s, i]), 3)
                rows.append(
                    (
                        run.start_ms + 1000 * int(t_s),
                        run.run_id,
                        event,
                        unit,
                        f"{unit}.HOPPER_MASS",
                        mass,
                    )
                )
    return rows


def _setpoint_events(truth: Truth, r: int, run: RunSpec, tags: dict) -> list[tuple]:
    sp = truth.setpoints
    series = {
        f"{unit}.MASSFLOW_SP": sp.flow_sp_kg_h[r, :, i] for i, unit in enumerate(_FEEDER_UNITS)
    }
    series["BLEND.SPEED_SP"] = sp.blender_speed_rpm[r]
    series["PRESS.WEIGHT_SP"] = sp.weight_sp_mg[r]
    rows = []
    for tag, values in series.items():
        decimals = resolution_decimals(tags[tag]["range"][1])
        for t_s in np.flatnonzero(np.diff(values) != 0.0) + 1:
            rows.append(
                (
                    run.start_ms + 1000 * int(t_s),
                    run.run_id,
                    "setpoint_change",
                    tag.split(".")[0],
                    tag,
                    round(float(values[t_s]), decimals),
                )
            )
    return rows


def fault_labels_table(truth: Truth) -> pd.DataFrame:
    """fault_labels.csv: kind, onset, end and magnitude of the fault of every fault run."""
    rows = []
    for r, run in enumerate(truth.runs):
        if run.fault is None:
            continue
        onset_s, end_s, magnitude = fault_window(
            run.fault, run.duration_s, truth.refill_fail_onset_s[r], truth.refill_manual_s[r]
        )
        unit, tag = AFFECTED[run.fault.kind]
        rows.append(
            (
                run.run_id,
                run.fault.kind,
                run.start_ms + int(round(1000 * onset_s)),
                run.start_ms + int(round(1000 * end_s)),
                round(magnitude, 4),
                unit,
                tag,
            )
        )
    frame = pd.DataFrame(rows, columns=LABEL_COLUMNS)
    for column in ("onset", "end"):
        frame[column] = iso_ms(frame[column].to_numpy(dtype=np.int64))
    return frame


def tag_table(tags: dict) -> pd.DataFrame:
    """tag_dictionary.csv: what the export claims about its tags, from the tag dictionary."""
    return pd.DataFrame(
        [
            (
                tag,
                meta["role"],
                meta["unit"],
                meta["sample_period_s"],
                meta["range"][0],
                meta["range"][1],
                meta["description"],
            )
            for tag, meta in tags.items()
        ],
        columns=TAG_COLUMNS,
    )


def check_design_fits_tags(sim: dict, tags: dict) -> None:
    """The design's setpoints must lie inside the ranges of the setpoint tags.

    Raises:
        ValueError: a setpoint the design can ask for is outside its tag's range; the
            message names the sim keys and the tag range.
    """
    design, extra = sim["design"], sim["extrapolation"]
    top_rate = max(design["throughput_kg_h"][1], extra["throughput_kg_h"][1])
    top_api = max(design["api_fraction"][1], extra["api_fraction"][1])
    low_api = min(design["api_fraction"][0], extra["api_fraction"][0])
    lub = design["lubricant_fraction"]
    need = {
        "FEED_API.MASSFLOW_SP": top_rate * top_api,
        "FEED_EXC.MASSFLOW_SP": top_rate * (1.0 - low_api - lub),
        "FEED_LUB.MASSFLOW_SP": top_rate * lub,
        "BLEND.SPEED_SP": design["blender_speed_rpm"][1],
        "PRESS.WEIGHT_SP": design["tablet_weight_mg"],
    }
    for tag, value in need.items():
        low, high = tags[tag]["range"]
        if not low <= value <= high:
            raise ValueError(
                f"sim.design / sim.extrapolation can ask for {tag} = {value:g}, "
                f"outside the tag's range [{low:g}, {high:g}] {tags[tag]['unit']}"
            )
