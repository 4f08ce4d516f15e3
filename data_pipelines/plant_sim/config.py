"""Checks the plain-dict configuration of the plant simulator before anything is simulated.

First step of `write_historian_export`: the `sim` dict (configs/sim/cdc_default.yaml) and the
`tags` mapping (configs/plant/cdc_line.yaml) arrive as plain dicts from the CLI. Every key
of `sim` is required; an unknown or missing key, or a value outside its allowed range, raises
`ConfigError` (a ValueError) naming the key path and what was allowed. The ranges below are
sanity bounds (what the equations tolerate), not the plausible values, which the YAML holds.
"""

import copy
import math
from dataclasses import dataclass

import pandas as pd

from data_pipelines.errors import ConfigError
from data_pipelines.timestamps import EARLIEST_NS

FEEDERS = ("api", "excipient", "lubricant")
FACTORS = ("throughput_kg_h", "api_fraction", "blender_speed_rpm")
INF = math.inf


@dataclass(frozen=True)
class Field:
    """One leaf of the sim config: kind is int, float, interval ([a, b], a <= b) or utc."""

    kind: str
    low: float = -INF
    high: float = INF
    unit: str = ""


def _f(low: float, high: float = INF, unit: str = "") -> Field:
    return Field("float", low, high, unit)


def _i(low: float, high: float = INF) -> Field:
    return Field("int", low, high)


def _iv(low: float, high: float = INF, unit: str = "") -> Field:
    return Field("interval", low, high, unit)


_FEEDER = {
    "feed_factor_g_rev": _f(1e-4, 1e3, "g/rev"),
    "max_screw_rpm": _f(1.0, 5000.0, "rpm"),
    "hopper_low_kg": _f(0.0, 1e3, "kg"),
    "hopper_high_kg": _f(1e-3, 1e3, "kg"),
    "starve_kg": _f(1e-6, 1e3, "kg"),
    "refill_kg_s": _f(1e-4, 100.0, "kg/s"),
    "densification": _f(0.0, 0.5),
    "drift_rel": _f(0.0, 0.2),
    "pulsation_rel": _f(0.0, 0.3),
    "load_cell_noise_rel": _f(0.0, 0.3),
    "hopper_noise_kg": _f(0.0, 10.0, "kg"),
}
_FAULTS = {
    "onset_fraction": _iv(0.05, 0.9),
    "api_feeder_blockage": {"magnitude": _iv(0.0, 1.0), "ramp_minutes": _iv(0.01, 600.0, "min")},
    "nir_fouling": {"magnitude": _iv(0.0, 0.5), "ramp_minutes": _iv(0.01, 600.0, "min")},
    "blender_speed_loss": {
        "magnitude": _iv(0.0, 0.9),
        "ramp_minutes": _iv(0.01, 60.0, "min"),
        "duration_minutes": _iv(0.1, 1e4, "min"),
    },
    "excipient_refill_failure": {"magnitude": _iv(0.05, 0.95)},
    "lubricant_feeder_stop": {"magnitude": _iv(0.0, 1.0), "duration_minutes": _iv(0.1, 1e4, "min")},
}
SCHEMA: dict = {
    "start_utc": Field("utc"),
    "run_hours": _f(0.05, 48.0, "h"),
    "gap_minutes": _f(0.0, 1440.0, "min"),
    "dt_sim_s": _f(0.05, 1.0, "s"),
    "n_normal_runs": _i(0, 1000),
    "n_extrapolation_runs": _i(0, 1000),
    "n_fault_runs_per_kind": _i(0, 100),
    "n_setpoint_changes": _i(0, 50),
    "design": {
        "throughput_kg_h": _iv(1.0, 500.0, "kg/h"),
        "api_fraction": _iv(0.001, 0.6),
        "blender_speed_rpm": _iv(20.0, 3000.0, "rpm"),
        "min_step_fraction": _f(0.0, 0.5),
        "lubricant_fraction": _f(0.0, 0.05),
        "tablet_weight_mg": _f(10.0, 2000.0, "mg"),
    },
    "extrapolation": {"throughput_kg_h": _iv(1.0, 500.0, "kg/h"), "api_fraction": _iv(0.001, 0.6)},
    "feeders": {name: _FEEDER for name in FEEDERS},
    "feeder_control": {
        "kp": _f(0.0, 10.0),
        "ti_s": _f(0.1, 1e4, "s"),
        "correction_limit": _f(0.0, 1.0),
        "load_cell_tau_s": _f(0.01, 600.0, "s"),
        "motor_tau_s": _f(0.01, 60.0, "s"),
        "pulsation_tau_s": _f(0.01, 600.0, "s"),
        "drift_tau_s": _f(1.0, 1e6, "s"),
    },
    "blender": {
        "holdup_ref_kg": _f(0.01, 100.0, "kg"),
        "throughput_ref_kg_h": _f(1.0, 500.0, "kg/h"),
        "speed_ref_rpm": _f(10.0, 3000.0, "rpm"),
        "holdup_throughput_exponent": _f(0.1, 1.0),
        "holdup_speed_exponent": _f(0.0, 2.0),
        "n_tanks": _i(1, 50),
        "dead_fraction": _f(0.0, 0.5),
        "exchange_rate_1_s": _f(0.0, 0.5, "1/s"),
        "motor_tau_s": _f(0.01, 60.0, "s"),
        "speed_noise_rpm": _f(0.0, 100.0, "rpm"),
    },
    "press": {
        "n_stations": _i(1, 100),
        "die_diameter_mm": _f(1.0, 30.0, "mm"),
        "fill_density_g_ml": _f(0.1, 2.0, "g/mL"),
        "api_fraction_ref": _f(0.0, 0.6),
        "turret_ref_rpm": _f(1.0, 200.0, "rpm"),
        "max_turret_rpm": _f(1.0, 200.0, "rpm"),
        "feed_frame_holdup_kg": _f(0.005, 10.0, "kg"),
        "feed_frame_tanks": _i(1, 10),
        "level_kp_rpm_per_kg": _f(0.0, 1e5, "rpm/kg"),
        "level_ti_s": _f(0.1, 1e4, "s"),
        "turret_tau_s": _f(0.01, 60.0, "s"),
        "force_ref_kn": _f(0.1, 100.0, "kN"),
        "force_weight_exponent": _f(0.5, 10.0),
        "force_api_coeff": _f(-10.0, 10.0),
        "force_lub_coeff": _f(-1.0, 1.0),
        "force_speed_exponent": _f(-1.0, 1.0),
        "density_api_coeff": _f(-1.0, 1.0),
        "density_lub_coeff": _f(-0.5, 0.5),
        "density_speed_coeff": _f(-0.5, 0.5),
        "density_noise_rel": _f(0.0, 0.1),
        "density_noise_tau_s": _f(0.1, 1e4, "s"),
        "weight_kp": _f(0.0, 5.0),
        "weight_ti_s": _f(0.1, 1e4, "s"),
        "force_noise_rel": _f(0.0, 0.2),
        "tablet_weight_rsd": _f(0.0, 0.2),
        "content_uniformity_rsd": _f(0.0, 0.3),
    },
    "pat": {
        "nir_noise_rel": _f(0.0, 0.2),
        "nir_missing_rate": _f(0.0, 0.5),
        "nir_outlier_rate": _f(0.0, 0.2),
        "nir_outlier_rel": _iv(0.0, 0.9),
        "tablets_per_sample": _i(1, 1000),
        "balance_noise_mg": _f(0.0, 10.0, "mg"),
        "assay_noise_rel": _f(0.0, 0.2),
    },
    "historian": {"bad_quality_rate": _f(0.0, 0.1)},
    "faults": _FAULTS,
}


def validate_sim_config(sim: dict) -> dict:
    """Check the `sim` dict against SCHEMA and the relations between its keys.

    Args:
        sim: content of configs/sim/cdc_default.yaml (or an override of it) as plain dicts.

    Returns:
        A deep copy with ints as int, floats as float and intervals as (low, high) tuples.

    Raises:
        ConfigError: an unknown key (the valid ones are listed), a missing key, a value of the
            wrong type or outside its allowed range (the range is named), or inconsistent keys
            (e.g. hopper_low_kg >= hopper_high_kg).
    """
    checked = _check_section(sim, SCHEMA, "sim")
    _check_relations(checked)
    return checked


def _check_section(node: object, schema: dict, path: str) -> dict:
    if not isinstance(node, dict):
        raise ConfigError(f"{path} must be a mapping, got {type(node).__name__}")
    unknown = sorted(set(node) - set(schema))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(schema)}")
    missing = sorted(set(schema) - set(node))
    if missing:
        raise ConfigError(f"{path}: missing key(s) {missing}")
    out = {}
    for key, spec in schema.items():
        where = f"{path}.{key}"
        if isinstance(spec, dict):
            out[key] = _check_section(node[key], spec, where)
        else:
            out[key] = _check_leaf(copy.deepcopy(node[key]), spec, where)
    return out


def _check_leaf(value: object, field: Field, where: str) -> object:
    allowed = f"[{field.low:g}, {field.high:g}]{' ' + field.unit if field.unit else ''}"
    if field.kind == "utc":
        return _check_utc(value, where)
    if field.kind == "interval":
        if not (isinstance(value, list | tuple) and len(value) == 2):
            raise ConfigError(f"{where} must be a pair [low, high] inside {allowed}, got {value!r}")
        pair = tuple(_number(v, where, allowed) for v in value)
        if not (field.low <= pair[0] <= pair[1] <= field.high):
            raise ConfigError(f"{where} = {list(pair)} must satisfy low <= high inside {allowed}")
        return pair
    number = _number(value, where, allowed)
    if field.kind == "int" and not float(number).is_integer():
        raise ConfigError(f"{where} must be a whole number in {allowed}, got {value!r}")
    if not field.low <= number <= field.high:
        raise ConfigError(f"{where} = {value!r} is outside the allowed range {allowed}")
    return int(number) if field.kind == "int" else float(number)


def _range(value: object, where: str) -> tuple[float, float]:
    """[low, high], two finite numbers with low < high, else a ConfigError naming `where`."""
    numbers = isinstance(value, list | tuple) and len(value) == 2 and all(
        not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) for v in value
    )
    if not numbers or not value[0] < value[1]:
        raise ConfigError(f"{where} = {value!r} must be [low, high], two numbers with low < high")
    return float(value[0]), float(value[1])


def _number(value: object, where: str, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number in {allowed}, got {value!r}")
    return float(value)


def _check_utc(value: object, where: str) -> str:
    try:
        stamp = pd.Timestamp(str(value))
    except ValueError as err:
        raise ConfigError(f"{where} = {value!r} is not an ISO 8601 timestamp") from err
    if stamp.tzinfo is None or stamp.utcoffset().total_seconds() != 0:
        raise ConfigError(f"{where} = {value!r} must carry the UTC offset (+00:00 or Z)")
    if stamp.value < EARLIEST_NS:  # `twin prepare` would take every sample for a placeholder
        raise ConfigError(f"{where} = {value!r} is before 1980, which `twin prepare` reads as "
                          "the placeholder of a time never set")  # fmt: skip
    return str(value)


def _check_relations(sim: dict) -> None:
    steps_per_s = 1.0 / sim["dt_sim_s"]
    if abs(steps_per_s - round(steps_per_s)) > 1e-9:
        raise ConfigError(f"sim.dt_sim_s = {sim['dt_sim_s']} must divide 1 s (0.5, 0.25, 0.2, ...)")
    if sim["n_normal_runs"] + sim["n_fault_runs_per_kind"] == 0:
        raise ConfigError("sim: n_normal_runs + n_fault_runs_per_kind must be >= 1 (no runs)")
    if sim["n_extrapolation_runs"] > sim["n_normal_runs"]:
        raise ConfigError(
            f"sim.n_extrapolation_runs = {sim['n_extrapolation_runs']} must be in "
            f"[0, n_normal_runs = {sim['n_normal_runs']}]"
        )
    for name in FEEDERS:
        feeder = sim["feeders"][name]
        if not feeder["starve_kg"] < feeder["hopper_low_kg"] < feeder["hopper_high_kg"]:
            raise ConfigError(
                f"sim.feeders.{name}: need starve_kg < hopper_low_kg < "
                f"hopper_high_kg, got {feeder['starve_kg']}, "
                f"{feeder['hopper_low_kg']}, {feeder['hopper_high_kg']}"
            )
    design, extrapolation = sim["design"], sim["extrapolation"]
    for key, (low, high) in extrapolation.items():
        d_low, d_high = design[key]
        if low < d_high and high > d_low:
            raise ConfigError(
                f"sim.extrapolation.{key} = {[low, high]} must lie outside the "
                f"design range sim.design.{key} = {[d_low, d_high]}"
            )
    top_api = max(design["api_fraction"][1], extrapolation["api_fraction"][1])
    if top_api + design["lubricant_fraction"] >= 1.0:
        raise ConfigError("sim.design: api_fraction + lubricant_fraction must stay below 1")
    if sim["press"]["turret_ref_rpm"] > sim["press"]["max_turret_rpm"]:
        raise ConfigError("sim.press.turret_ref_rpm must not exceed sim.press.max_turret_rpm")
    _check_transport_steps(sim)
    _check_capacity(sim)


def _check_capacity(sim: dict) -> None:
    """Refuse a design the equipment cannot run: the press's turret or a feeder's screw would
    sit at its top speed, and the run would silently not make the recipe."""
    design, extrapolation, press = sim["design"], sim["extrapolation"], sim["press"]
    top_kg_h = max(design["throughput_kg_h"][1], extrapolation["throughput_kg_h"][1])
    tablet_kg = design["tablet_weight_mg"] * 1e-6
    turret_rpm = top_kg_h / (60.0 * press["n_stations"] * tablet_kg)
    if turret_rpm > press["max_turret_rpm"]:
        raise ConfigError(
            f"sim.press.max_turret_rpm = {press['max_turret_rpm']:g}: {top_kg_h:g} kg/h of "
            f"{design['tablet_weight_mg']:g} mg tablets on {press['n_stations']} stations need "
            f"{turret_rpm:.4g} rpm (sim.design.tablet_weight_mg, the top throughput of "
            "sim.design / sim.extrapolation)"
        )
    top_api = max(design["api_fraction"][1], extrapolation["api_fraction"][1])
    low_api = min(design["api_fraction"][0], extrapolation["api_fraction"][0])
    lubricant = design["lubricant_fraction"]
    fractions = {"api": top_api, "excipient": 1.0 - low_api - lubricant, "lubricant": lubricant}
    for name, fraction in fractions.items():
        feeder = sim["feeders"][name]
        # the feed factor at a nearly empty hopper: densification lowers it by half its span
        capacity_kg_h = (feeder["feed_factor_g_rev"] * (1.0 - feeder["densification"] / 2.0)
                         * feeder["max_screw_rpm"] * 60.0 / 1000.0)  # fmt: skip
        if fraction * top_kg_h > capacity_kg_h:
            raise ConfigError(
                f"sim.feeders.{name}: at most {capacity_kg_h:.3g} kg/h (feed_factor_g_rev x "
                f"max_screw_rpm, a low hopper), but the campaign asks {fraction * top_kg_h:.3g} "
                f"kg/h ({fraction:.3g} of {top_kg_h:g} kg/h)"
            )


# The mixing's explicit upwind step (mixing.transport_series) keeps masses positive while a
# step moves less than a tank holds; half a tank leaves room for transients.
MAX_TANK_SHARE_PER_STEP = 0.5


def _check_transport_steps(sim: dict) -> None:
    """Refuse a dt_sim_s that moves too much of a blender or feed-frame tank per step at the
    campaign's highest flow (the simulation would oscillate, then diverge)."""
    design, extrapolation, press = sim["design"], sim["extrapolation"], sim["press"]
    top_kg_h = max(design["throughput_kg_h"][1], extrapolation["throughput_kg_h"][1])
    blender = sim["blender"]
    # smallest hold-up: the highest throughput at the highest speed
    holdup_kg = (
        blender["holdup_ref_kg"]
        * (top_kg_h / blender["throughput_ref_kg_h"]) ** blender["holdup_throughput_exponent"]
        * (design["blender_speed_rpm"][1] / blender["speed_ref_rpm"])
        ** -blender["holdup_speed_exponent"]
    )
    # the turret may run at its top speed while the frame drains
    turret_kg_h = (press["max_turret_rpm"] * 60.0 * press["n_stations"]
                   * design["tablet_weight_mg"] * 1e-6)  # fmt: skip
    tanks = {
        "blender": (
            holdup_kg * (1.0 - blender["dead_fraction"]) / blender["n_tanks"], top_kg_h,
            "blender.holdup_ref_kg, blender.n_tanks",
        ),
        "feed frame": (
            press["feed_frame_holdup_kg"] / press["feed_frame_tanks"], max(top_kg_h, turret_kg_h),
            "press.feed_frame_holdup_kg, press.feed_frame_tanks",
        ),
    }  # fmt: skip
    for name, (tank_kg, flow_kg_h, keys) in tanks.items():
        moved_kg = flow_kg_h / 3600.0 * sim["dt_sim_s"]
        if moved_kg > MAX_TANK_SHARE_PER_STEP * tank_kg:
            raise ConfigError(
                f"sim.dt_sim_s = {sim['dt_sim_s']} s moves {moved_kg:.3g} kg per step at "
                f"{flow_kg_h:.3g} kg/h through a {name} tank of {tank_kg:.3g} kg (from {keys}); "
                f"the simulation's explicit transport needs under {MAX_TANK_SHARE_PER_STEP:g} "
                "of a tank per step: lower dt_sim_s or give the tanks more hold-up"
            )


def check_tags(tags: dict, produced: dict[str, str]) -> dict:
    """Check the tag dictionary against the tags the simulator writes.

    Args:
        tags: the `tags:` mapping of configs/plant/<plant>.yaml, {TAG: {role, unit,
            sample_period_s, range: [low, high], description}}.
        produced: the tags the simulator knows how to write, {TAG: the unit it writes in}.

    Returns:
        {TAG: {"role", "unit", "sample_period_s" (int, s), "range" (low, high),
        "description"}} in the dictionary's order.

    Raises:
        ConfigError: a tag missing from either side, a missing field, a unit other than the
            simulator's (it writes its values in one unit and converts none), a sample period
            that is not a whole number of seconds >= 1, or a range that is not two numbers
            low < high.
    """
    if not isinstance(tags, dict):
        raise ConfigError(f"tags must be a mapping TAG -> metadata, got {type(tags).__name__}")
    extra, absent = sorted(set(tags) - set(produced)), sorted(set(produced) - set(tags))
    if extra or absent:
        raise ConfigError(
            f"tag dictionary and simulator disagree: unknown to the simulator "
            f"{extra}, missing from the dictionary {absent}"
        )
    out = {}
    for tag, meta in tags.items():
        fields = ("role", "unit", "sample_period_s", "range", "description")
        lacking = [f for f in fields if not isinstance(meta, dict) or f not in meta]
        if lacking:
            raise ConfigError(f"tags.{tag}: missing field(s) {lacking}")
        period = meta["sample_period_s"]
        if not (isinstance(period, int | float) and period >= 1 and float(period).is_integer()):
            raise ConfigError(
                f"tags.{tag}.sample_period_s = {period!r} must be a whole number "
                f"of seconds >= 1 (the simulator samples on a 1 s grid)"
            )
        if str(meta["unit"]) != produced[tag]:
            raise ConfigError(
                f"tags.{tag}.unit = {meta['unit']!r}: the simulator writes this tag in "
                f"{produced[tag]!r} and converts nothing; declare {produced[tag]!r}"
            )
        low, high = _range(meta["range"], f"tags.{tag}.range")
        out[tag] = {
            "role": str(meta["role"]),
            "unit": str(meta["unit"]),
            "sample_period_s": int(period),
            "range": (low, high),
            "description": str(meta["description"]),
        }
    return out
