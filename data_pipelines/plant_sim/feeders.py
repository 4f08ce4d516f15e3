"""Loss-in-weight feeders: hopper, screw, gravimetric PI control and refills.

First unit of the line in simulate.py's step (feeders -> blender -> press). Three feeders
(API, excipient, lubricant) are simulated side by side as the last axis of every array
(n_runs, 3). The screw delivers feed factor x speed; the true feed factor rises with the
hopper fill (densification under the powder's own weight), drifts slowly and falls to zero
when the hopper runs empty. The controller measures the mass flow from the load cell and
corrects the speed with a PI law, limited to +-correction_limit of the setpoint as real LIW
controllers limit their feed-factor correction. During a refill the load cell cannot tell
flow from filling, so the controller runs volumetrically: it holds its speed and its flow
estimate until the refill ends.
"""

import math
from dataclasses import dataclass

import numpy as np

from data_pipelines.plant_sim.config import FEEDERS

# feed factor in g/rev -> kg/h per rpm: 60 rev/h per rpm, 1e-3 kg/g
_G_REV_TO_KG_H_RPM = 60.0 / 1000.0


@dataclass(frozen=True)
class FeederParams:
    """Feeder parameters; each per-feeder field is (3,) in the order API, excipient, lubricant."""

    feed_factor_kg_h_rpm: np.ndarray
    max_rpm: np.ndarray
    low_kg: np.ndarray
    high_kg: np.ndarray
    starve_kg: np.ndarray
    refill_kg_s: np.ndarray
    densification: np.ndarray
    drift_rel: np.ndarray
    pulsation_rel: np.ndarray
    load_cell_noise_rel: np.ndarray
    kp: float
    ti_s: float
    correction_limit: float
    load_cell_tau_s: float
    motor_tau_s: float


def feeder_params(sim: dict) -> FeederParams:
    """Collect the feeder parameters of the validated sim config into arrays."""

    def per_feeder(key: str) -> np.ndarray:
        return np.array([sim["feeders"][name][key] for name in FEEDERS], dtype=float)

    control = sim["feeder_control"]
    return FeederParams(
        feed_factor_kg_h_rpm=per_feeder("feed_factor_g_rev") * _G_REV_TO_KG_H_RPM,
        max_rpm=per_feeder("max_screw_rpm"),
        low_kg=per_feeder("hopper_low_kg"),
        high_kg=per_feeder("hopper_high_kg"),
        starve_kg=per_feeder("starve_kg"),
        refill_kg_s=per_feeder("refill_kg_s"),
        densification=per_feeder("densification"),
        drift_rel=per_feeder("drift_rel"),
        pulsation_rel=per_feeder("pulsation_rel"),
        load_cell_noise_rel=per_feeder("load_cell_noise_rel"),
        kp=control["kp"],
        ti_s=control["ti_s"],
        correction_limit=control["correction_limit"],
        load_cell_tau_s=control["load_cell_tau_s"],
        motor_tau_s=control["motor_tau_s"],
    )


@dataclass
class FeederState:
    """State of the three feeders of every run; arrays (n_runs, 3).

    Attributes:
        hopper_kg: powder in the hopper.
        rpm: screw speed.
        integral_kg_h: integral part of the PI correction.
        correction_kg_h: PI correction added to the setpoint (held during a refill).
        flow_est_kg_h: controller's filtered load-cell flow.
        flow_meas_kg_h: that flow with load-cell noise: what the historian records.
        flow_kg_h: true delivered flow during the last step.
        refilling: a refill is running.
        blocked: refills of this feeder fail (excipient_refill_failure), until a manual one.
        blocked_since_s: time of the first failed refill request, NaN before.
        block_threshold: measured flow / setpoint at which the operator refills by hand.
        manual_at_s: time of that manual refill, NaN before.
    """

    hopper_kg: np.ndarray
    rpm: np.ndarray
    integral_kg_h: np.ndarray
    correction_kg_h: np.ndarray
    flow_est_kg_h: np.ndarray
    flow_meas_kg_h: np.ndarray
    flow_kg_h: np.ndarray
    refilling: np.ndarray
    blocked: np.ndarray
    blocked_since_s: np.ndarray
    block_threshold: np.ndarray
    manual_at_s: np.ndarray


def true_feed_factor(
    hopper_kg: np.ndarray, base_kg_h_rpm: np.ndarray, p: FeederParams
) -> np.ndarray:
    """True feed factor, kg/h per rpm, of feeders in the given state.

    Args:
        hopper_kg: (n_runs, 3) hopper mass.
        base_kg_h_rpm: (n_runs, 3) feed factor at half fill with a full screw: calibrated
            value x drift x fault multiplier (see `second_inputs`).
        p: feeder parameters.

    Returns:
        (n_runs, 3) feed factor; 0 for an empty hopper.
    """
    # denser powder at the screw when the hopper is full (Engisch & Muzzio 2014 report
    # feed factors falling by several per cent as a hopper empties)
    fill = 1.0 + p.densification * (hopper_kg / p.high_kg - 0.5)
    starve = np.minimum(hopper_kg / p.starve_kg, 1.0)
    return base_kg_h_rpm * fill * starve


def second_inputs(
    sp_kg_h: np.ndarray, noise: dict, ff_mult: np.ndarray, speed_mult: np.ndarray, p: FeederParams
) -> dict[str, np.ndarray]:
    """What stays constant over the steps of one second, computed once per second.

    Args:
        sp_kg_h: (n_runs, 3) mass-flow setpoints.
        noise: standardised noise of this second, each (n_runs, 3): "drift", "pulsation"
            (both coloured, unit variance) and "load_cell" (white).
        ff_mult: (n_runs, 3) fault multiplier of the true feed factor (blockage).
        speed_mult: (n_runs, 3) fault multiplier of the screw speed (a motor trip).
        p: feeder parameters.

    Returns:
        {"sp_kg_h", "base_kg_h_rpm", "pulsation", "load_cell_kg_h", "limit_kg_h",
        "rpm_per_kg_h"}, each (n_runs, 3).
    """
    drift = np.maximum(1.0 + p.drift_rel * noise["drift"], 0.5)
    return {
        "sp_kg_h": sp_kg_h,
        "base_kg_h_rpm": p.feed_factor_kg_h_rpm * drift * ff_mult,
        "pulsation": np.maximum(1.0 + p.pulsation_rel * noise["pulsation"], 0.0),
        # the noise scales with the setpoint because it comes from differentiating the
        # load-cell weight, not from the flow itself
        "load_cell_kg_h": p.load_cell_noise_rel * sp_kg_h * noise["load_cell"],
        "limit_kg_h": p.correction_limit * sp_kg_h,
        "rpm_per_kg_h": speed_mult / p.feed_factor_kg_h_rpm,
    }


def initial_feeders(
    hopper0_kg: np.ndarray,
    first: dict[str, np.ndarray],
    blocked: np.ndarray,
    threshold: np.ndarray,
    p: FeederParams,
) -> FeederState:
    """Feeders in steady gravimetric control at the first setpoints.

    Args:
        hopper0_kg: (n_runs, 3) initial hopper mass.
        first: `second_inputs` of the first second.
        blocked: (n_runs, 3) bool, refills of this feeder fail.
        threshold: (n_runs, 3) measured flow / setpoint at which an operator refills a
            blocked feeder by hand.
        p: feeder parameters.

    Returns:
        The state, with the PI correction already matching the true feed factor.
    """
    sp = first["sp_kg_h"]
    ff = true_feed_factor(hopper0_kg, first["base_kg_h_rpm"], p)
    limit = first["limit_kg_h"]
    correction = np.minimum(np.maximum(sp * (p.feed_factor_kg_h_rpm / ff - 1.0), -limit), limit)
    rpm = (sp + correction) / p.feed_factor_kg_h_rpm
    return FeederState(
        hopper_kg=hopper0_kg.astype(float).copy(),
        rpm=rpm,
        integral_kg_h=correction.copy(),
        correction_kg_h=correction,
        flow_est_kg_h=sp.astype(float).copy(),
        flow_meas_kg_h=sp.astype(float).copy(),
        flow_kg_h=ff * rpm,
        refilling=np.zeros(hopper0_kg.shape, dtype=bool),
        blocked=blocked.copy(),
        blocked_since_s=np.full(hopper0_kg.shape, np.nan),
        block_threshold=threshold.copy(),
        manual_at_s=np.full(hopper0_kg.shape, np.nan),
    )


def feeder_step(
    st: FeederState, u: dict[str, np.ndarray], t_s: float, dt_s: float, p: FeederParams
) -> None:
    """Advance the feeders by one step (in place).

    Args:
        st: feeder state, (n_runs, 3) arrays.
        u: this second's `second_inputs`.
        t_s: time of the step's start, s after the run start.
        dt_s: step, s.
        p: feeder parameters.
    """
    ff = true_feed_factor(st.hopper_kg, u["base_kg_h_rpm"], p)
    st.flow_kg_h = np.minimum(ff * st.rpm * u["pulsation"], st.hopper_kg * (3600.0 / dt_s))
    st.hopper_kg -= st.flow_kg_h * (dt_s / 3600.0)
    _refill(st, u["sp_kg_h"], t_s, dt_s, p)
    gravimetric = ~st.refilling
    follow = 1.0 - math.exp(-dt_s / p.load_cell_tau_s)
    st.flow_est_kg_h = np.where(
        gravimetric, st.flow_est_kg_h + follow * (st.flow_kg_h - st.flow_est_kg_h), st.flow_est_kg_h
    )
    # the controller's display clamps at zero
    st.flow_meas_kg_h = np.maximum(st.flow_est_kg_h + u["load_cell_kg_h"], 0.0)
    error = u["sp_kg_h"] - st.flow_meas_kg_h
    limit = u["limit_kg_h"]
    # PI with the integral clamped to the correction limit (anti-windup); both are frozen
    # while the feeder runs volumetrically during a refill
    integral = np.minimum(
        np.maximum(st.integral_kg_h + (p.kp * dt_s / p.ti_s) * error, -limit), limit
    )
    st.integral_kg_h = np.where(gravimetric, integral, st.integral_kg_h)
    correction = np.minimum(np.maximum(p.kp * error + st.integral_kg_h, -limit), limit)
    st.correction_kg_h = np.where(gravimetric, correction, st.correction_kg_h)
    command = np.minimum((u["sp_kg_h"] + st.correction_kg_h) * u["rpm_per_kg_h"], p.max_rpm)
    st.rpm += (1.0 - math.exp(-dt_s / p.motor_tau_s)) * (np.maximum(command, 0.0) - st.rpm)


def _refill(st: FeederState, sp_kg_h: np.ndarray, t_s: float, dt_s: float, p: FeederParams) -> None:
    """Start refills at the low level, fill, stop at the high level.

    A blocked feeder's refill request fails; the hopper runs on until the flow the load cell
    shows has fallen to the operator's threshold, and the operator refills by hand.
    """
    request = (st.hopper_kg < p.low_kg) & ~st.refilling
    if st.blocked.any():
        failed = request & st.blocked
        st.blocked_since_s = np.where(
            failed & np.isnan(st.blocked_since_s), t_s, st.blocked_since_s
        )
        # the screw starving, not a setpoint step: a step up leaves the shown flow below the
        # new setpoint for a while, and a refill then would end the fault before it starved
        starved = (st.flow_meas_kg_h <= st.block_threshold * sp_kg_h) & (
            st.hopper_kg < p.starve_kg
        )
        manual = st.blocked & ~np.isnan(st.blocked_since_s) & starved
        st.manual_at_s = np.where(manual, t_s, st.manual_at_s)
        st.blocked &= ~manual
        request = (request & ~st.blocked) | manual
    st.refilling |= request
    st.hopper_kg += np.where(st.refilling, p.refill_kg_s * dt_s, 0.0)
    st.refilling &= st.hopper_kg < p.high_kg
