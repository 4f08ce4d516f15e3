"""Continuous blender: nonlinear hold-up, tanks in series with dead zones, impeller drive.

Second unit of simulate.py's step (feeders -> blender -> press). The hold-up M at steady
state follows an empirical power law in throughput F and impeller speed N,

    M_ss = M_ref (F / F_ref)^a (N / N_ref)^-b,

(hold-up grows with throughput and falls with speed, as measured on Gericke GCM blenders by
Vanarase & Muzzio 2011), so the discharge is the inverse law F_out(M, N) and dM/dt =
F_in - F_out. Mixing is non-ideal: the hold-up is n_tanks equal tanks in series, each with a
dead-zone share that exchanges material with its tank at a rate proportional to the impeller
speed. API and lubricant masses are carried per tank and zone; the excipient is the rest.
"""

import math
from dataclasses import dataclass

import numpy as np

from data_pipelines.plant_sim.mixing import transport_series

_MIN_SPEED_RATIO = 0.05  # the hold-up law diverges at a standing impeller
_TINY_KG = 1e-12


@dataclass(frozen=True)
class BlenderParams:
    """Blender parameters (see configs/sim/cdc_default.yaml, section blender)."""

    holdup_ref_kg: float
    throughput_ref_kg_h: float
    speed_ref_rpm: float
    holdup_throughput_exponent: float
    holdup_speed_exponent: float
    n_tanks: int
    dead_fraction: float
    exchange_rate_1_s: float
    motor_tau_s: float


def blender_params(sim: dict) -> BlenderParams:
    """Blender parameters from the validated sim config."""
    cfg = sim["blender"]
    return BlenderParams(**{k: cfg[k] for k in BlenderParams.__dataclass_fields__})


def steady_holdup_kg(
    throughput_kg_h: np.ndarray, speed_rpm: np.ndarray, p: BlenderParams
) -> np.ndarray:
    """Steady-state hold-up, kg, at a throughput (kg/h) and impeller speed (rpm)."""
    speed_ratio = np.maximum(np.asarray(speed_rpm) / p.speed_ref_rpm, _MIN_SPEED_RATIO)
    return (
        p.holdup_ref_kg
        * (np.asarray(throughput_kg_h) / p.throughput_ref_kg_h) ** p.holdup_throughput_exponent
        * speed_ratio**-p.holdup_speed_exponent
    )


def outflow_kg_h(holdup_kg: np.ndarray, speed_rpm: np.ndarray, p: BlenderParams) -> np.ndarray:
    """Discharge, kg/h, of a blender holding `holdup_kg` at `speed_rpm`: inverse of the law."""
    speed_ratio = np.maximum(speed_rpm / p.speed_ref_rpm, _MIN_SPEED_RATIO)
    scale = p.holdup_ref_kg * speed_ratio**-p.holdup_speed_exponent
    return p.throughput_ref_kg_h * (holdup_kg / scale) ** (1.0 / p.holdup_throughput_exponent)


@dataclass
class BlenderState:
    """Blender state of every run.

    Attributes:
        holdup_kg: (n_runs,) total hold-up.
        speed_rpm: (n_runs,) impeller speed.
        active_kg: (n_runs, 2, n_tanks) API and lubricant mass in the mixed part of each tank.
        dead_kg: (n_runs, 2, n_tanks) the same in each tank's dead zone.
        out_kg_h: (n_runs,) discharge during the last step.
        out_frac: (n_runs, 2) API and lubricant fraction of that discharge.
    """

    holdup_kg: np.ndarray
    speed_rpm: np.ndarray
    active_kg: np.ndarray
    dead_kg: np.ndarray
    out_kg_h: np.ndarray
    out_frac: np.ndarray


def initial_blender(
    throughput_kg_h: np.ndarray, speed_rpm: np.ndarray, frac: np.ndarray, p: BlenderParams
) -> BlenderState:
    """A blender at steady state, uniformly filled with a blend of fractions `frac` (n_runs, 2)."""
    holdup = steady_holdup_kg(throughput_kg_h, speed_rpm, p)
    tank = holdup / p.n_tanks
    ones = np.ones(p.n_tanks)
    active = ((1.0 - p.dead_fraction) * tank)[:, None, None] * frac[:, :, None] * ones
    dead = (p.dead_fraction * tank)[:, None, None] * frac[:, :, None] * ones
    return BlenderState(
        holdup,
        np.asarray(speed_rpm, float).copy(),
        active,
        dead,
        np.asarray(throughput_kg_h, float).copy(),
        frac.astype(float).copy(),
    )


def blender_step(
    st: BlenderState,
    inflow_kg_h: np.ndarray,
    inflow_frac: np.ndarray,
    speed_sp_rpm: np.ndarray,
    dt_s: float,
    p: BlenderParams,
) -> np.ndarray:
    """Advance the blender by one step (in place).

    Args:
        st: blender state.
        inflow_kg_h: (n_runs,) total feed.
        inflow_frac: (n_runs, 2) API and lubricant fraction of the feed.
        speed_sp_rpm: (n_runs,) speed the drive runs toward (setpoint x fault multiplier).
        dt_s: step, s.
        p: blender parameters.

    Returns:
        (n_runs, 2) API and lubricant mass discharged during the step, kg.
    """
    st.speed_rpm += (1.0 - math.exp(-dt_s / p.motor_tau_s)) * (speed_sp_rpm - st.speed_rpm)
    inflow_kg_s = inflow_kg_h * (1.0 / 3600.0)
    old_kg = st.holdup_kg
    # never discharge more than is there: the law is explicit in M
    out_kg_s = np.minimum(
        outflow_kg_h(old_kg, st.speed_rpm, p) * (1.0 / 3600.0), old_kg / dt_s + inflow_kg_s
    )
    new_kg = old_kg + (inflow_kg_s - out_kg_s) * dt_s
    active_tank_kg = old_kg * ((1.0 - p.dead_fraction) / p.n_tanks)
    out_comp = transport_series(
        st.active_kg, active_tank_kg, inflow_kg_s, inflow_frac, out_kg_s, dt_s
    )
    _dead_zone_exchange(st, old_kg, new_kg, active_tank_kg, dt_s, p)
    st.holdup_kg = new_kg
    st.out_kg_h = out_kg_s * 3600.0
    # a blender that discharged nothing keeps its last outlet composition
    out_kg = out_kg_s * dt_s
    st.out_frac = np.where(
        out_kg[:, None] > 0.0, out_comp / np.maximum(out_kg, _TINY_KG)[:, None], st.out_frac
    )
    return out_comp


def _dead_zone_exchange(
    st: BlenderState,
    old_kg: np.ndarray,
    new_kg: np.ndarray,
    active_tank_kg: np.ndarray,
    dt_s: float,
    p: BlenderParams,
) -> None:
    """Keep each dead zone at its share of the tank and swap material with the mixed part.

    After transport the mixed part of every tank holds the whole change of the tank's mass;
    the dead zone's share of that change moves across (with the composition of the zone it
    leaves), then an equal exchange flow q = k(N) * dead mass * dt swaps composition.
    """
    n, fd = p.n_tanks, p.dead_fraction
    if fd == 0.0:
        return
    dead_old = old_kg * (fd / n)
    grow = (new_kg - old_kg) * (fd / n)
    active_mass = active_tank_kg + (new_kg - old_kg) * (1.0 / n)
    w_active = st.active_kg / np.maximum(active_mass, _TINY_KG)[:, None, None]
    w_dead = st.dead_kg / np.maximum(dead_old, _TINY_KG)[:, None, None]
    moved = np.where((grow > 0)[:, None, None], w_active, w_dead) * grow[:, None, None]
    swap_kg = (
        np.minimum(st.speed_rpm * (p.exchange_rate_1_s * dt_s / p.speed_ref_rpm), 1.0) * dead_old
    )
    moved += swap_kg[:, None, None] * (w_active - w_dead)
    st.active_kg -= moved
    st.dead_kg += moved


def blender_impulse_response(
    sim: dict,
    throughput_kg_h: np.ndarray,
    speed_rpm: np.ndarray,
    duration_s: float,
    dt_s: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Residence-time distribution E(t) of the blender at steady state, by a tracer pulse.

    Args:
        sim: the validated sim config (its blender section is used).
        throughput_kg_h: (n,) steady throughputs.
        speed_rpm: (n,) steady impeller speeds.
        duration_s: how long to follow the tracer; several mean residence times.
        dt_s: integration step, s.

    Returns:
        t_s (n_steps,) times at the end of each step, and E (n, n_steps) in 1/s: the
        tracer share leaving per second, so sum(E * dt_s) -> 1 for a long duration.
    """
    p = blender_params(sim)
    throughput = np.asarray(throughput_kg_h, float)
    speed = np.asarray(speed_rpm, float)
    st = initial_blender(throughput, speed, np.zeros((throughput.size, 2)), p)
    st.active_kg[:, 0, 0] = 1.0  # 1 kg of tracer in the first tank's mixed part
    n_steps = int(np.ceil(duration_s / dt_s))
    density = np.empty((throughput.size, n_steps))
    zero_frac = np.zeros((throughput.size, 2))
    for k in range(n_steps):
        density[:, k] = blender_step(st, throughput, zero_frac, speed, dt_s, p)[:, 0] / dt_s
    return dt_s * np.arange(1, n_steps + 1), density
