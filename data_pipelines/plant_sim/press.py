"""Tablet press: feed frame hold-up, turret level control, die fill, weight control, force.

Last unit of simulate.py's step (feeders -> blender -> press). The chute and feed frame are
a few well-mixed tanks whose level a PI controller holds by the turret speed (with feed
forward from the throughput setpoint). The die fill gives the tablet weight: fill depth x
die area x fill density, the density depending on blend composition and turret speed. The
main compression force rises steeply with the weight at a fixed punch gap,

    F = F_ref (W / W_sp)^p exp(c_api (w_api - w_ref)) exp(-c_lub (w_lub / w_lub,ref - 1)),

and the weight controller, as on force-controlled presses, trims the fill depth so that the
measured force matches the force its recipe calibration expects at the target weight. A
composition change the calibration does not know (lubricant lost) thus shifts the weight.
"""

import math
from dataclasses import dataclass

import numpy as np

from data_pipelines.plant_sim.mixing import transport_series

_MIN_TURRET_RATIO = 0.1  # keeps the speed laws finite when the turret nearly stops
_TINY_KG = 1e-12


@dataclass(frozen=True)
class PressParams:
    """Press parameters: sim["press"] plus the lubricant fraction the laws refer to."""

    n_stations: int
    die_area_mm2: float
    fill_density_g_ml: float
    api_fraction_ref: float
    lubricant_fraction_ref: float
    turret_ref_rpm: float
    max_turret_rpm: float
    feed_frame_holdup_kg: float
    feed_frame_tanks: int
    level_kp_rpm_per_kg: float
    level_ti_s: float
    turret_tau_s: float
    force_ref_kn: float
    force_weight_exponent: float
    force_api_coeff: float
    force_lub_coeff: float
    force_speed_exponent: float
    density_api_coeff: float
    density_lub_coeff: float
    density_speed_coeff: float
    density_noise_rel: float
    weight_kp: float
    weight_ti_s: float
    force_noise_rel: float


def press_params(sim: dict) -> PressParams:
    """Press parameters from the validated sim config."""
    cfg = dict(sim["press"])
    cfg["die_area_mm2"] = np.pi / 4.0 * cfg.pop("die_diameter_mm") ** 2
    cfg["lubricant_fraction_ref"] = max(sim["design"]["lubricant_fraction"], 1e-6)
    return PressParams(**{k: cfg[k] for k in PressParams.__dataclass_fields__})


@dataclass
class PressState:
    """Press state of every run, (n_runs,) arrays unless noted.

    Attributes:
        frame_kg: hold-up of chute + feed frame.
        frame_comp_kg: (n_runs, 2, n_tanks) API and lubricant mass per feed-frame tank.
        turret_rpm, level_integral_rpm: turret speed and the level controller's integral.
        fill_depth_mm, weight_integral: die fill depth and the weight controller's integral.
        tablet_weight_mg: true mean tablet weight; force_kn: true mean compression force;
        force_meas_kn: its 1-s measurement; out_frac: (n_runs, 2) API and lubricant fraction
        of the tablets made in the last step; out_kg: their total mass, kg.
    """

    frame_kg: np.ndarray
    frame_comp_kg: np.ndarray
    turret_rpm: np.ndarray
    level_integral_rpm: np.ndarray
    fill_depth_mm: np.ndarray
    weight_integral: np.ndarray
    tablet_weight_mg: np.ndarray
    force_kn: np.ndarray
    force_meas_kn: np.ndarray
    out_frac: np.ndarray
    out_kg: np.ndarray | None = None


def fill_density(
    frac: np.ndarray, speed_ratio: np.ndarray, noise: np.ndarray, p: PressParams
) -> np.ndarray:
    """Die-fill density, g/mL (= mg/mm^3), of a blend with API/lubricant fractions (n_runs, 2).

    Args:
        frac: (n_runs, 2) API and lubricant mass fraction of the blend in the feed frame.
        speed_ratio: (n_runs,) turret speed / turret_ref_rpm.
        noise: (n_runs,) standardised density noise.
        p: press parameters.
    """
    return (
        p.fill_density_g_ml
        * (1.0 - p.density_api_coeff * (frac[:, 0] - p.api_fraction_ref))
        * (1.0 + p.density_lub_coeff * (frac[:, 1] / p.lubricant_fraction_ref - 1.0))
        * (1.0 - p.density_speed_coeff * (speed_ratio - 1.0))  # less time to fill a die
        * (1.0 + p.density_noise_rel * noise)
    )


def blend_force_factor(
    api_fraction: np.ndarray, lub_fraction: np.ndarray, p: PressParams
) -> np.ndarray:
    """Force at the target weight relative to force_ref_kn, for a blend (turret at reference).

    More API (a harder, less compressible powder here) needs more force; more lubricant
    less, as it lowers die-wall and interparticle friction.
    """
    return np.exp(
        p.force_api_coeff * (api_fraction - p.api_fraction_ref)
        - p.force_lub_coeff * (lub_fraction / p.lubricant_fraction_ref - 1.0)
    )


def second_inputs(
    throughput_kg_h: np.ndarray,
    weight_sp_mg: np.ndarray,
    api_fraction: np.ndarray,
    lub_fraction: np.ndarray,
    noise: dict,
    p: PressParams,
) -> dict[str, np.ndarray]:
    """What stays constant over the steps of one second, computed once per second.

    Args:
        throughput_kg_h, weight_sp_mg, api_fraction, lub_fraction: (n_runs,) setpoints and
            recipe of this second (the force calibration of the weight control uses the recipe).
        noise: standardised noise of this second, (n_runs,) each: "density" (coloured),
            "force" (white).
        p: press parameters.

    Returns:
        {"weight_sp_mg", "turret_ff_rpm", "depth_ff_mm", "recipe_force", "density_noise",
        "force_noise"}, each (n_runs,).
    """
    return {
        "weight_sp_mg": weight_sp_mg,
        "turret_ff_rpm": _feed_forward_rpm(throughput_kg_h, weight_sp_mg, p),
        "depth_ff_mm": weight_sp_mg / (p.die_area_mm2 * p.fill_density_g_ml),
        "recipe_force": blend_force_factor(api_fraction, lub_fraction, p),
        "density_noise": noise["density"],
        "force_noise": 1.0 + p.force_noise_rel * noise["force"],
    }


def initial_press(u: dict[str, np.ndarray], frac: np.ndarray, p: PressParams) -> PressState:
    """A press at steady state: level at setpoint, tablets at target weight and force.

    Args:
        u: `second_inputs` of the first second.
        frac: (n_runs, 2) API and lubricant fraction of the blend.
        p: press parameters.
    """
    n_runs = frac.shape[0]
    rpm = u["turret_ff_rpm"]
    speed_ratio = np.maximum(rpm / p.turret_ref_rpm, _MIN_TURRET_RATIO)
    density = fill_density(frac, speed_ratio, np.zeros(n_runs), p)
    depth = u["weight_sp_mg"] / (p.die_area_mm2 * density)
    tank_kg = p.feed_frame_holdup_kg / p.feed_frame_tanks
    comp = tank_kg * frac[:, :, None] * np.ones(p.feed_frame_tanks)
    force = (
        p.force_ref_kn
        * blend_force_factor(frac[:, 0], frac[:, 1], p)
        * speed_ratio**p.force_speed_exponent
    )
    return PressState(
        frame_kg=np.full(n_runs, p.feed_frame_holdup_kg),
        frame_comp_kg=comp,
        turret_rpm=rpm.copy(),
        level_integral_rpm=np.zeros(n_runs),
        fill_depth_mm=depth,
        weight_integral=depth / u["depth_ff_mm"] - 1.0,
        tablet_weight_mg=u["weight_sp_mg"].astype(float).copy(),
        force_kn=force,
        force_meas_kn=force.copy(),
        out_frac=frac.astype(float).copy(),
    )


def _feed_forward_rpm(
    throughput_kg_h: np.ndarray, weight_sp_mg: np.ndarray, p: PressParams
) -> np.ndarray:
    """Turret speed that presses `throughput_kg_h` into tablets of the target weight."""
    tablets_per_h_per_rpm = 60.0 * p.n_stations
    return throughput_kg_h / (tablets_per_h_per_rpm * weight_sp_mg * 1e-6)


def press_step(
    st: PressState,
    inflow_kg_h: np.ndarray,
    inflow_frac: np.ndarray,
    u: dict[str, np.ndarray],
    dt_s: float,
    p: PressParams,
) -> np.ndarray:
    """Advance feed frame and press by one step (in place).

    Args:
        st: press state.
        inflow_kg_h: (n_runs,) blender discharge.
        inflow_frac: (n_runs, 2) its API and lubricant fraction.
        u: this second's `second_inputs`.
        dt_s: step, s.
        p: press parameters.

    Returns:
        (n_runs, 2) API and lubricant mass pressed into tablets during the step, kg; the
        total is `tablets_kg_s * dt_s`, stored as st.out_kg.
    """
    tank_kg = st.frame_kg * (1.0 / p.feed_frame_tanks)
    st.out_frac = st.frame_comp_kg[:, :, -1] / np.maximum(tank_kg, _TINY_KG)[:, None]
    _weight_and_force(st, u, dt_s, p)
    tablets_kg_s = st.turret_rpm * (p.n_stations * 1e-6 / 60.0) * st.tablet_weight_mg
    inflow_kg_s = inflow_kg_h * (1.0 / 3600.0)
    out_kg_s = np.minimum(tablets_kg_s, st.frame_kg / dt_s + inflow_kg_s)
    out_comp = transport_series(st.frame_comp_kg, tank_kg, inflow_kg_s, inflow_frac, out_kg_s, dt_s)
    st.out_kg = out_kg_s * dt_s
    st.frame_kg = st.frame_kg + (inflow_kg_s - out_kg_s) * dt_s
    _level_control(st, u, dt_s, p)
    return out_comp


def _weight_and_force(
    st: PressState, u: dict[str, np.ndarray], dt_s: float, p: PressParams
) -> None:
    """Die fill -> weight -> force; then the fill-depth controller acts on the measured force."""
    frac = st.out_frac
    speed_ratio = np.maximum(st.turret_rpm * (1.0 / p.turret_ref_rpm), _MIN_TURRET_RATIO)
    density = fill_density(frac, speed_ratio, u["density_noise"], p)
    st.tablet_weight_mg = st.fill_depth_mm * p.die_area_mm2 * density
    blend = blend_force_factor(frac[:, 0], frac[:, 1], p)
    weight_term = (st.tablet_weight_mg / u["weight_sp_mg"]) ** p.force_weight_exponent
    st.force_kn = p.force_ref_kn * blend * weight_term * speed_ratio**p.force_speed_exponent
    st.force_meas_kn = st.force_kn * u["force_noise"]
    # the controller inverts its recipe-calibrated force law to a relative weight error; the
    # turret-speed term is common to both sides and cancels
    measured_ratio = np.maximum(blend * weight_term * u["force_noise"], 1e-12) / u["recipe_force"]
    error = 1.0 - measured_ratio ** (1.0 / p.force_weight_exponent)
    st.weight_integral += (p.weight_kp * dt_s / p.weight_ti_s) * error
    st.fill_depth_mm = u["depth_ff_mm"] * np.maximum(
        1.0 + p.weight_kp * error + st.weight_integral, 0.1
    )


def _level_control(st: PressState, u: dict[str, np.ndarray], dt_s: float, p: PressParams) -> None:
    """Turret speed PI on the feed-frame level, with feed forward from the throughput setpoint."""
    error_kg = st.frame_kg - p.feed_frame_holdup_kg
    # anti-windup: the integral never asks for more than the turret can do
    st.level_integral_rpm = np.minimum(
        np.maximum(
            st.level_integral_rpm + (p.level_kp_rpm_per_kg * dt_s / p.level_ti_s) * error_kg,
            -p.max_turret_rpm,
        ),
        p.max_turret_rpm,
    )
    command = u["turret_ff_rpm"] + p.level_kp_rpm_per_kg * error_kg + st.level_integral_rpm
    command = np.minimum(np.maximum(command, 0.0), p.max_turret_rpm)
    st.turret_rpm += (1.0 - math.exp(-dt_s / p.turret_tau_s)) * (command - st.turret_rpm)
