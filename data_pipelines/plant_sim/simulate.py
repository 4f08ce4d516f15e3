"""The true plant in time: feeders -> blender -> press, all runs of a batch at once.

Core of plant_sim: `simulate_runs` integrates a batch of RunSpecs of equal length with a fixed
step dt_sim_s (a few per second), vectorised across runs, and records the true state once per
second in a Truth. sensors.py turns the Truth into historian samples; tests read it to check
mass balances and faults. Units of the state: kg, kg/h, rpm, mg, kN; fractions are mass
fractions (0-1); times are seconds after the run start.
"""

from dataclasses import dataclass

import numpy as np

from data_pipelines.plant_sim import blender, feeders, press
from data_pipelines.plant_sim.config import validate_sim_config
from data_pipelines.plant_sim.design import RunSpec
from data_pipelines.plant_sim.faults import FaultProfiles, fault_profiles
from data_pipelines.plant_sim.inputs import Setpoints, process_noise, setpoints

# Truth signals recorded each second: name -> (unit, trailing shape note)
SIGNALS = {
    "feeder_flow_kg_h": ("kg/h", "(n_runs, n_s, 3) true delivered flow: API, excipient, lub"),
    "feeder_flow_meas_kg_h": ("kg/h", "(n_runs, n_s, 3) load-cell flow of the controller"),
    "hopper_kg": ("kg", "(n_runs, n_s, 3) hopper mass"),
    "refilling": ("bool", "(n_runs, n_s, 3) a refill is running"),
    "screw_rpm": ("rpm", "(n_runs, n_s, 3) screw speed"),
    "blender_speed_rpm": ("rpm", "impeller speed"),
    "blender_holdup_kg": ("kg", "blender hold-up"),
    "blender_api_kg": ("kg", "API in the blender"),
    "blender_lub_kg": ("kg", "lubricant in the blender"),
    "blender_out_kg_h": ("kg/h", "blender discharge"),
    "outlet_api_fraction": ("-", "API fraction of the discharge (what the NIR sees)"),
    "outlet_lub_fraction": ("-", "lubricant fraction of the discharge"),
    "frame_holdup_kg": ("kg", "chute + feed frame hold-up"),
    "frame_api_kg": ("kg", "API in the feed frame"),
    "frame_lub_kg": ("kg", "lubricant in the feed frame"),
    "turret_rpm": ("rpm", "turret speed"),
    "fill_depth_mm": ("mm", "die fill depth"),
    "tablet_weight_mg": ("mg", "true mean tablet weight"),
    "tablet_api_fraction": ("-", "API fraction of the tablets"),
    "tablet_lub_fraction": ("-", "lubricant fraction of the tablets"),
    "force_kn": ("kN", "true mean main compression force"),
    "force_meas_kn": ("kN", "1-s force measurement (weight control input)"),
    "cum_fed_kg": ("kg", "(n_runs, n_s, 3) API, lub, total fed to the blender since t=0"),
    "cum_discharged_kg": ("kg", "(n_runs, n_s, 3) the same, discharged by the blender"),
    "cum_pressed_kg": ("kg", "(n_runs, n_s, 3) the same, pressed into tablets"),
}


@dataclass
class Truth:
    """True trajectories of a batch of runs, sampled at t = 0, 1, ..., n_s - 1 s.

    Attributes:
        runs: the simulated RunSpecs, in batch order.
        time_s: (n_s,) seconds after each run's start.
        signals: SIGNALS name -> array, (n_runs, n_s) unless SIGNALS says otherwise; the
            state at the start of each second, cumulative masses over [0, t).
        setpoints: the per-second setpoints that drove the batch.
        faults: the per-second fault multipliers.
        refill_fail_onset_s: (n_runs,) time of the failed excipient refill request, NaN
            where none failed.
        refill_manual_s: (n_runs,) time of the operator's manual excipient refill, NaN where
            there was none.
    """

    runs: list[RunSpec]
    time_s: np.ndarray
    signals: dict[str, np.ndarray]
    setpoints: Setpoints
    faults: FaultProfiles
    refill_fail_onset_s: np.ndarray
    refill_manual_s: np.ndarray

    def __getitem__(self, name: str) -> np.ndarray:
        return self.signals[name]

    def tablet_api_lc(self, r: int | slice = slice(None)) -> np.ndarray:
        """API content per tablet, % of label claim (the current recipe's dose), of run(s) r.

        Returns:
            (n_s,) for an int r, (n_runs, n_s) for a slice.
        """
        sp = self.setpoints
        dose = self["tablet_weight_mg"][r] * self["tablet_api_fraction"][r]
        return 100.0 * dose / (sp.weight_sp_mg[r] * sp.api_fraction[r])


def simulate_run(run: RunSpec, sim: dict) -> Truth:
    """Simulate one run; identical to its row in a batch (see simulate_runs)."""
    return simulate_runs([run], sim)


def simulate_runs(runs: list[RunSpec], sim: dict) -> Truth:
    """Integrate a batch of runs of equal length, vectorised across runs.

    Args:
        runs: RunSpecs with the same duration_s (design.design_campaign makes them).
        sim: the sim config; validated here.

    Returns:
        The Truth of the batch; row r belongs to runs[r] and does not depend on other rows.

    Raises:
        ValueError: runs of different lengths, an empty batch, or a bad sim config.
    """
    sim = validate_sim_config(sim)
    if not runs or len({run.duration_s for run in runs}) != 1:
        raise ValueError(
            "simulate_runs needs a non-empty batch of runs of one duration_s, "
            f"got durations {sorted({run.duration_s for run in runs})}"
        )
    n_s = runs[0].duration_s
    sp = setpoints(runs, n_s)
    prof = fault_profiles([run.fault for run in runs], n_s)
    noise = process_noise(runs, n_s, sim)
    plant = _Plant(runs, sp, prof, noise, sim)
    signals = {
        name: np.zeros(
            (len(runs), n_s) + plant.trailing(name), dtype=bool if name == "refilling" else float
        )
        for name in SIGNALS
    }
    dt_s = sim["dt_sim_s"]
    for k in range(n_s):
        plant.record(signals, k)
        u = plant.second_inputs(k)
        for j in range(int(round(1.0 / dt_s))):
            plant.step(u, k + j * dt_s, dt_s)
    _check_finite(signals, runs)
    return Truth(
        list(runs),
        np.arange(n_s, dtype=float),
        signals,
        sp,
        prof,
        plant.feeders.blocked_since_s[:, 1].copy(),
        plant.feeders.manual_at_s[:, 1].copy(),
    )


def _check_finite(signals: dict[str, np.ndarray], runs: list[RunSpec]) -> None:
    """A diverged integration must not reach the export as data.

    Raises:
        FloatingPointError: a signal that is not finite, naming it, the run and the second.
    """
    for name, values in signals.items():
        if values.dtype == bool:
            continue
        bad = ~np.isfinite(values.reshape(values.shape[0], values.shape[1], -1)).all(axis=2)
        if bad.any():
            r, k = np.argwhere(bad)[0]
            raise FloatingPointError(
                f"plant_sim: {name} of run {runs[r].run_id} is not finite from t = {k} s: the "
                "integration diverged (see sim.dt_sim_s and the hold-ups)"
            )


class _Plant:
    """The three units of a batch with their parameters, inputs and noise: one step at a time."""

    def __init__(
        self, runs: list[RunSpec], sp: Setpoints, prof: FaultProfiles, noise: dict, sim: dict
    ):
        self.sp, self.prof, self.noise = sp, prof, noise
        self.fp = feeders.feeder_params(sim)
        self.bp = blender.blender_params(sim)
        self.pp = press.press_params(sim)
        n_runs = len(runs)
        blocked = np.zeros((n_runs, 3), dtype=bool)
        blocked[:, 1] = prof.refill_blocked
        threshold = np.full((n_runs, 3), -np.inf)
        threshold[:, 1] = prof.refill_threshold
        hopper0 = np.array([run.hopper0_kg for run in runs], dtype=float)
        first = self.second_inputs(0)
        self.feeders = feeders.initial_feeders(
            hopper0, first["feeders"], blocked, threshold, self.fp
        )
        frac0 = np.stack([sp.api_fraction[:, 0], sp.lub_fraction[:, 0]], axis=1)
        self.blender = blender.initial_blender(
            sp.throughput_kg_h[:, 0], sp.blender_speed_rpm[:, 0], frac0, self.bp
        )
        self.press = press.initial_press(first["press"], frac0, self.pp)
        self.cum = np.zeros((3, n_runs, 3))  # fed, discharged, pressed x (API, lub, total)

    @staticmethod
    def trailing(name: str) -> tuple[int, ...]:
        return (3,) if SIGNALS[name][1].startswith("(n_runs, n_s, 3)") else ()

    def second_inputs(self, k: int) -> dict:
        """Setpoints, fault multipliers and noise of second k, prepared once for its steps."""
        sp, prof, noise = self.sp, self.prof, self.noise
        ff_mult = np.ones((sp.flow_sp_kg_h.shape[0], 3))
        speed_mult = ff_mult.copy()
        ff_mult[:, 0] = prof.api_feed_factor[:, k]
        speed_mult[:, 2] = prof.lubricant_speed[:, k]
        feeder_noise = {c: noise[c][:, k] for c in ("drift", "pulsation", "load_cell")}
        press_noise = {"density": noise["density"][:, k, 0], "force": noise["force"][:, k, 0]}
        return {
            "feeders": feeders.second_inputs(
                sp.flow_sp_kg_h[:, k], feeder_noise, ff_mult, speed_mult, self.fp
            ),
            "blender_speed_rpm": sp.blender_speed_rpm[:, k] * prof.blender_speed[:, k],
            "press": press.second_inputs(
                sp.throughput_kg_h[:, k],
                sp.weight_sp_mg[:, k],
                sp.api_fraction[:, k],
                sp.lub_fraction[:, k],
                press_noise,
                self.pp,
            ),
        }

    def step(self, u: dict, t_s: float, dt_s: float) -> None:
        """One integration step of length dt_s from t_s, with the inputs u of its second."""
        fd, cum = self.feeders, self.cum
        feeders.feeder_step(fd, u["feeders"], t_s, dt_s, self.fp)
        flow = fd.flow_kg_h
        fed_kg_h = flow[:, 0] + flow[:, 1] + flow[:, 2]
        feed_frac = flow[:, ::2] / np.maximum(fed_kg_h, 1e-12)[:, None]  # API, lubricant
        discharged = blender.blender_step(
            self.blender, fed_kg_h, feed_frac, u["blender_speed_rpm"], dt_s, self.bp
        )
        pressed = press.press_step(
            self.press, self.blender.out_kg_h, self.blender.out_frac, u["press"], dt_s, self.pp
        )
        cum[0, :, :2] += flow[:, ::2] * (dt_s / 3600.0)
        cum[0, :, 2] += fed_kg_h * (dt_s / 3600.0)
        cum[1, :, :2] += discharged
        cum[1, :, 2] += self.blender.out_kg_h * (dt_s / 3600.0)
        cum[2, :, :2] += pressed
        cum[2, :, 2] += self.press.out_kg

    def record(self, signals: dict[str, np.ndarray], k: int) -> None:
        """Write the state at the start of second k into the signal arrays."""
        fd, bl, pr = self.feeders, self.blender, self.press
        values = {
            "feeder_flow_kg_h": fd.flow_kg_h,
            "feeder_flow_meas_kg_h": fd.flow_meas_kg_h,
            "hopper_kg": fd.hopper_kg,
            "refilling": fd.refilling,
            "screw_rpm": fd.rpm,
            "blender_speed_rpm": bl.speed_rpm,
            "blender_holdup_kg": bl.holdup_kg,
            "blender_api_kg": np.add.reduce(bl.active_kg[:, 0] + bl.dead_kg[:, 0], axis=-1),
            "blender_lub_kg": np.add.reduce(bl.active_kg[:, 1] + bl.dead_kg[:, 1], axis=-1),
            "blender_out_kg_h": bl.out_kg_h,
            "outlet_api_fraction": bl.out_frac[:, 0],
            "outlet_lub_fraction": bl.out_frac[:, 1],
            "frame_holdup_kg": pr.frame_kg,
            "frame_api_kg": np.add.reduce(pr.frame_comp_kg[:, 0], axis=-1),
            "frame_lub_kg": np.add.reduce(pr.frame_comp_kg[:, 1], axis=-1),
            "turret_rpm": pr.turret_rpm,
            "fill_depth_mm": pr.fill_depth_mm,
            "tablet_weight_mg": pr.tablet_weight_mg,
            "tablet_api_fraction": pr.out_frac[:, 0],
            "tablet_lub_fraction": pr.out_frac[:, 1],
            "force_kn": pr.force_kn,
            "force_meas_kn": pr.force_meas_kn,
            "cum_fed_kg": self.cum[0],
            "cum_discharged_kg": self.cum[1],
            "cum_pressed_kg": self.cum[2],
        }
        for name, value in values.items():
            signals[name][:, k] = value
