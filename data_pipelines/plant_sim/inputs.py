"""What drives a batch of runs: setpoints per second and the process noise of each run.

Between design.py (RunSpecs) and simulate.py (the time loop). Setpoint schedules become
zero-order-held (n_runs, n_s) arrays; the process noise of each run is drawn from that run's
own generator (RunSpec.rng(PROCESS)) before the loop, so a run simulated alone gets exactly
the draws it gets inside a batch. Coloured noise is a unit-variance AR(1) sequence at 1 s.
"""

from dataclasses import dataclass

import numpy as np

from data_pipelines.plant_sim.design import PROCESS, RunSpec

# standardised noise channels of the process, in the order they are drawn
NOISE_CHANNELS = (
    ("drift", 3),
    ("pulsation", 3),
    ("load_cell", 3),
    ("density", 1),
    ("force", 1),
)


@dataclass
class Setpoints:
    """Per-second setpoints of a batch, (n_runs, n_s) unless noted.

    Attributes:
        throughput_kg_h, api_fraction, blender_speed_rpm: the design factors.
        lub_fraction, weight_sp_mg: recipe lubricant fraction and target tablet weight.
        flow_sp_kg_h: (n_runs, n_s, 3) mass-flow setpoints of API, excipient, lubricant.
    """

    throughput_kg_h: np.ndarray
    api_fraction: np.ndarray
    blender_speed_rpm: np.ndarray
    lub_fraction: np.ndarray
    weight_sp_mg: np.ndarray
    flow_sp_kg_h: np.ndarray


def setpoints(runs: list[RunSpec], n_s: int) -> Setpoints:
    """Zero-order-held setpoint arrays of a batch of runs of n_s seconds each."""
    shape = (len(runs), n_s)
    out = {
        name: np.empty(shape) for name in ("throughput_kg_h", "api_fraction", "blender_speed_rpm")
    }
    for r, run in enumerate(runs):
        times = np.array([step.time_s for step in run.steps])
        index = np.searchsorted(times, np.arange(n_s), side="right") - 1
        for name, values in out.items():
            values[r] = np.array([getattr(step, name) for step in run.steps])[index]
    lub = np.repeat(np.array([[run.lubricant_fraction] for run in runs]), n_s, axis=1)
    weight = np.repeat(np.array([[run.tablet_weight_mg] for run in runs]), n_s, axis=1)
    throughput, api = out["throughput_kg_h"], out["api_fraction"]
    flows = np.stack([throughput * api, throughput * (1.0 - api - lub), throughput * lub], axis=-1)
    return Setpoints(throughput, api, out["blender_speed_rpm"], lub, weight, flows)


def process_noise(runs: list[RunSpec], n_s: int, sim: dict) -> dict[str, np.ndarray]:
    """Standardised process noise of every run, per second.

    Args:
        runs: the batch.
        n_s: seconds per run.
        sim: the validated sim config (for the correlation times).

    Returns:
        {channel: (n_runs, n_s, width)} for the channels of NOISE_CHANNELS; drift,
        pulsation and density are AR(1) with unit variance, the others white.
    """
    width = sum(w for _, w in NOISE_CHANNELS)
    white = np.stack([run.rng(PROCESS).standard_normal((n_s, width)) for run in runs])
    control, press = sim["feeder_control"], sim["press"]
    tau_s = {
        "drift": control["drift_tau_s"],
        "pulsation": control["pulsation_tau_s"],
        "density": press["density_noise_tau_s"],
    }
    phi = np.concatenate(
        [
            np.full(w, np.exp(-1.0 / tau_s[name]) if name in tau_s else 0.0)
            for name, w in NOISE_CHANNELS
        ]
    )
    coloured = _ar1(white, phi)
    out, start = {}, 0
    for name, w in NOISE_CHANNELS:
        out[name] = coloured[:, :, start : start + w]
        start += w
    return out


def _ar1(white: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """x[k] = phi x[k-1] + sqrt(1 - phi^2) e[k], x[0] = e[0]: unit variance from the start."""
    out = np.empty_like(white)
    gain = np.sqrt(1.0 - phi**2)
    out[:, 0] = white[:, 0]
    for k in range(1, white.shape[1]):
        out[:, k] = phi * out[:, k - 1] + gain * white[:, k]
    return out
