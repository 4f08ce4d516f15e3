"""From true trajectories to historian samples: instruments, PAT and historian artefacts.

Between simulate.py (Truth) and export.py (files). Each tag of the dictionary is sampled at
its own sample_period_s on the run's 1 s grid, through a model of its instrument: setpoints
as entered, load-cell and tachometer noise, the NIR averaging its 5 s spectrum window with
relative noise, outliers, fouling bias and rejected spectra (no sample), at-line tablet
weight and assay as means over a few tablets. Then the historian: values are rounded to the
tag's resolution, values outside the tag's range are stored as quality "Inp OutRange" and a
small share of samples as "Bad" / "Scan Timeout", all with an empty value. Sensor noise comes
from the run's own SENSORS generator, drawn in a fixed order and size, so a run with and
without a fault shares its noise.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from data_pipelines.plant_sim.design import SENSORS
from data_pipelines.plant_sim.simulate import Truth

QUALITIES = ("Good", "Bad", "Scan Timeout", "Inp OutRange")
GOOD, BAD, SCAN_TIMEOUT, OUT_OF_RANGE = range(4)
_FEEDER_TAGS = ("FEED_API", "FEED_EXC", "FEED_LUB")


@dataclass(frozen=True)
class _Context:
    truth: Truth
    r: int
    idx: np.ndarray  # sample times, whole seconds after the run start
    period_s: int
    rng: np.random.Generator
    sim: dict


def _flow_sp(c: _Context, i: int) -> np.ndarray:
    return c.truth.setpoints.flow_sp_kg_h[c.r, c.idx, i]


def _speed_sp(c: _Context, _: int) -> np.ndarray:
    return c.truth.setpoints.blender_speed_rpm[c.r, c.idx]


def _weight_sp(c: _Context, _: int) -> np.ndarray:
    return c.truth.setpoints.weight_sp_mg[c.r, c.idx]


def _flow(c: _Context, i: int) -> np.ndarray:
    # the controller's own load-cell flow: its noise is part of the control loop (simulate.py)
    return c.truth["feeder_flow_meas_kg_h"][c.r, c.idx, i]


def _hopper(c: _Context, i: int) -> np.ndarray:
    name = ("api", "excipient", "lubricant")[i]
    noise_kg = c.sim["feeders"][name]["hopper_noise_kg"]
    true_kg = c.truth["hopper_kg"][c.r, c.idx, i]
    return np.maximum(true_kg + noise_kg * c.rng.standard_normal(c.idx.size), 0.0)


def _speed(c: _Context, _: int) -> np.ndarray:
    noise_rpm = c.sim["blender"]["speed_noise_rpm"]
    true_rpm = c.truth["blender_speed_rpm"][c.r, c.idx]
    return np.maximum(true_rpm + noise_rpm * c.rng.standard_normal(c.idx.size), 0.0)


def _turret(c: _Context, _: int) -> np.ndarray:
    return c.truth["turret_rpm"][c.r, c.idx]


def _force(c: _Context, _: int) -> np.ndarray:
    return c.truth["force_meas_kn"][c.r, c.idx]


def _nir(c: _Context, _: int) -> np.ndarray:
    """%w/w API: mean over the spectrum window (t - period, t], noise, outliers, fouling."""
    pat, n = c.sim["pat"], c.idx.size
    noise, outlier_u, sign_u, size_u = (
        c.rng.standard_normal(n),
        c.rng.random(n),
        c.rng.random(n),
        c.rng.random(n),
    )
    cumulative = np.concatenate([[0.0], np.cumsum(c.truth["outlet_api_fraction"][c.r])])
    first = np.maximum(c.idx + 1 - c.period_s, 0)
    window = (cumulative[c.idx + 1] - cumulative[first]) / (c.idx + 1 - first)
    reading = 100.0 * window * (1.0 + c.truth.faults.nir_bias_rel[c.r, c.idx])
    reading *= 1.0 + pat["nir_noise_rel"] * noise
    low, high = pat["nir_outlier_rel"]
    size = np.where(sign_u < 0.5, -1.0, 1.0) * (low + (high - low) * size_u)
    return reading * np.where(outlier_u < pat["nir_outlier_rate"], 1.0 + size, 1.0)


def _tablet_weight(c: _Context, _: int) -> np.ndarray:
    """Mean weight of a few tablets on the at-line balance."""
    press, pat = c.sim["press"], c.sim["pat"]
    tablets, balance = c.rng.standard_normal(c.idx.size), c.rng.standard_normal(c.idx.size)
    spread = press["tablet_weight_rsd"] / np.sqrt(pat["tablets_per_sample"])
    true_mg = c.truth["tablet_weight_mg"][c.r, c.idx]
    return true_mg * (1.0 + spread * tablets) + pat["balance_noise_mg"] * balance


def _tablet_api(c: _Context, _: int) -> np.ndarray:
    """Mean assay of a few tablets, % of label claim, with content-uniformity spread."""
    press, pat = c.sim["press"], c.sim["pat"]
    tablets, assay = c.rng.standard_normal(c.idx.size), c.rng.standard_normal(c.idx.size)
    spread = press["content_uniformity_rsd"] / np.sqrt(pat["tablets_per_sample"])
    true_lc = c.truth.tablet_api_lc(c.r)[c.idx]
    return true_lc * (1.0 + spread * tablets) * (1.0 + pat["assay_noise_rel"] * assay)


# every tag the simulator writes: tag -> (instrument model, feeder index or 0)
TAG_SOURCES: dict[str, tuple[Callable[[_Context, int], np.ndarray], int]] = {
    **{f"{unit}.MASSFLOW_SP": (_flow_sp, i) for i, unit in enumerate(_FEEDER_TAGS)},
    **{f"{unit}.MASSFLOW": (_flow, i) for i, unit in enumerate(_FEEDER_TAGS)},
    **{f"{unit}.HOPPER_MASS": (_hopper, i) for i, unit in enumerate(_FEEDER_TAGS)},
    "BLEND.SPEED_SP": (_speed_sp, 0),
    "BLEND.SPEED": (_speed, 0),
    "NIR.API_CONC": (_nir, 0),
    "PRESS.WEIGHT_SP": (_weight_sp, 0),
    "PRESS.TURRET_SPEED": (_turret, 0),
    "PRESS.COMP_FORCE": (_force, 0),
    "PRESS.TABLET_WEIGHT": (_tablet_weight, 0),
    "PRESS.TABLET_API": (_tablet_api, 0),
}


# the unit each instrument model writes its values in: the tag dictionary must declare it
TAG_UNITS: dict[str, str] = {
    **{f"{unit}.MASSFLOW_SP": "kg/h" for unit in _FEEDER_TAGS},
    **{f"{unit}.MASSFLOW": "kg/h" for unit in _FEEDER_TAGS},
    **{f"{unit}.HOPPER_MASS": "kg" for unit in _FEEDER_TAGS},
    "BLEND.SPEED_SP": "rpm",
    "BLEND.SPEED": "rpm",
    "NIR.API_CONC": "%w/w",
    "PRESS.WEIGHT_SP": "mg",
    "PRESS.TURRET_SPEED": "rpm",
    "PRESS.COMP_FORCE": "kN",
    "PRESS.TABLET_WEIGHT": "mg",
    "PRESS.TABLET_API": "%LC",
}


def resolution_decimals(range_high: float) -> int:
    """Decimals a historian keeps for a tag spanning up to range_high: about 5 significant."""
    return int(np.clip(4 - np.floor(np.log10(max(abs(range_high), 1e-6))), 1, 6))


def measure_run(truth: Truth, r: int, tags: dict, sim: dict) -> dict[str, np.ndarray]:
    """Historian samples of run r of a Truth, all tags, in the dictionary's tag order.

    Args:
        truth: the simulated batch.
        r: row of the run in the batch.
        tags: the checked tag dictionary (config.check_tags).
        sim: the validated sim config.

    Returns:
        {"t_s": int64 seconds after the run start, "tag": int32 index into list(tags),
        "value": float64 (NaN where the quality is not Good), "quality": int8 index into
        QUALITIES}, one entry per historian row, grouped by tag, time-ordered within a tag.
    """
    rng = truth.runs[r].rng(SENSORS)
    n_s = truth.time_s.size
    order = {tag: code for code, tag in enumerate(tags)}
    parts = {}
    # draws follow the simulator's own tag order, so the dictionary's order cannot change them
    for tag, (model, i) in TAG_SOURCES.items():
        meta = tags[tag]
        period = meta["sample_period_s"]
        idx = np.arange(0, n_s, period, dtype=np.int64)
        value = model(_Context(truth, r, idx, period, rng, sim), i)
        keep = np.ones(idx.size, dtype=bool)
        if tag == "NIR.API_CONC":
            # spectra the PAT software rejects leave no sample at all
            keep = rng.random(idx.size) >= sim["pat"]["nir_missing_rate"]
        quality = _historian_quality(value, meta, sim, rng)
        value = np.where(
            quality == GOOD, np.round(value, resolution_decimals(meta["range"][1])), np.nan
        )
        parts[tag] = (idx[keep], value[keep], quality[keep])
    t_s = np.concatenate([parts[tag][0] for tag in tags])
    codes = np.concatenate([np.full(parts[tag][0].size, order[tag], np.int32) for tag in tags])
    return {
        "t_s": t_s,
        "tag": codes,
        "value": np.concatenate([parts[tag][1] for tag in tags]),
        "quality": np.concatenate([parts[tag][2] for tag in tags]).astype(np.int8),
    }


def _historian_quality(
    value: np.ndarray, meta: dict, sim: dict, rng: np.random.Generator
) -> np.ndarray:
    """Quality per sample: rare Bad / Scan Timeout, Inp OutRange outside the tag's span."""
    u, which = rng.random(value.size), rng.random(value.size)
    quality = np.full(value.size, GOOD, dtype=np.int8)
    low, high = meta["range"]
    decimals = resolution_decimals(high)
    rounded = np.round(value, decimals)
    quality[(rounded < low) | (rounded > high) | ~np.isfinite(value)] = OUT_OF_RANGE
    failed = u < sim["historian"]["bad_quality_rate"]
    quality[failed] = np.where(which[failed] < 0.5, BAD, SCAN_TIMEOUT)
    return quality
