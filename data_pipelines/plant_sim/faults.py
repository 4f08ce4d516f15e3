"""The five fault kinds of the plant: how each is drawn, injected and labelled.

design.py draws one FaultSpec per fault run; simulate.py turns the specs into per-second
multipliers (FaultProfiles) that the unit models apply; export.py writes the label of each
fault run to fault_labels.csv, the only place a fault is named. Magnitudes are fractions
(docs/plant_sim.md): feed factor lost, relative NIR bias (signed), impeller speed lost, share
of the excipient flow lost when the operator refills by hand, lubricant screw speed lost.
"""

from dataclasses import dataclass

import numpy as np

FAULT_KINDS = (
    "api_feeder_blockage",
    "nir_fouling",
    "blender_speed_loss",
    "excipient_refill_failure",
    "lubricant_feeder_stop",
)
# (affected_unit, affected_tag) of each kind: where an operator would first look
AFFECTED = {
    "api_feeder_blockage": ("FEED_API", "FEED_API.MASSFLOW"),
    "nir_fouling": ("NIR", "NIR.API_CONC"),
    "blender_speed_loss": ("BLEND", "BLEND.SPEED"),
    "excipient_refill_failure": ("FEED_EXC", "FEED_EXC.HOPPER_MASS"),
    "lubricant_feeder_stop": ("FEED_LUB", "FEED_LUB.MASSFLOW"),
}
# a speed trip of the lubricant feeder is a motor stop: seconds, not minutes
_TRIP_RAMP_S = 2.0


@dataclass(frozen=True)
class FaultSpec:
    """One fault injected into one run.

    Attributes:
        kind: one of FAULT_KINDS.
        onset_s: seconds after the run start where the fault begins. For
            excipient_refill_failure it is the planned time of the refill request that fails;
            the simulated hopper decides the actual one (Truth["refill_fail_onset_s"]).
        magnitude: size as a fraction (see the module docstring). For
            excipient_refill_failure the share of the excipient flow (as the load cell shows
            it) lost when the operator finally refills by hand.
        ramp_s: seconds from onset to full size.
        duration_s: seconds the fault lasts; inf when it persists to the end of the run (or,
            for excipient_refill_failure, until the operator's refill).
    """

    kind: str
    onset_s: float
    magnitude: float
    ramp_s: float
    duration_s: float


def draw_fault(kind: str, faults: dict, run_s: float, rng: np.random.Generator) -> FaultSpec:
    """Draw onset and size of one fault from the intervals of `sim["faults"]`.

    Args:
        kind: one of FAULT_KINDS.
        faults: the validated `sim["faults"]` section.
        run_s: run length in seconds.
        rng: the campaign design generator.

    Returns:
        The fault, with onset inside `faults["onset_fraction"]` of the run.

    Raises:
        ValueError: an unknown kind (the valid ones are listed).
    """
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; valid kinds: {list(FAULT_KINDS)}")
    cfg = faults[kind]
    onset_s = float(np.floor(rng.uniform(*faults["onset_fraction"]) * run_s))
    magnitude = float(rng.uniform(*cfg["magnitude"]))
    if kind == "nir_fouling":
        # fouling can bias the prediction either way, depending on what sticks to the window
        magnitude *= float(rng.choice([-1.0, 1.0]))
    # whole seconds, so label times fall on the historian's 1 s grid
    if kind == "lubricant_feeder_stop":
        ramp_s = _TRIP_RAMP_S
    else:
        ramp_s = max(1.0, round(60.0 * float(rng.uniform(*cfg.get("ramp_minutes", (0, 0))))))
    duration_s = (
        float(round(60.0 * float(rng.uniform(*cfg["duration_minutes"]))))
        if "duration_minutes" in cfg
        else float("inf")
    )
    return FaultSpec(kind, onset_s, magnitude, ramp_s, duration_s)


@dataclass
class FaultProfiles:
    """Per-second fault multipliers of a batch of runs, each (n_runs, n_s) unless noted.

    Attributes:
        api_feed_factor: multiplier of the API feeder's true feed factor (blockage).
        lubricant_speed: multiplier of the lubricant screw speed (feeder stop).
        blender_speed: multiplier of the impeller speed the drive reaches (speed loss).
        nir_bias_rel: relative bias added to the NIR reading (fouling).
        refill_blocked: (n_runs,) bool, the excipient refill system fails in this run.
        refill_threshold: (n_runs,) measured excipient flow / setpoint at which the operator
            refills by hand (1 - magnitude); -inf where refills work.
    """

    api_feed_factor: np.ndarray
    lubricant_speed: np.ndarray
    blender_speed: np.ndarray
    nir_bias_rel: np.ndarray
    refill_blocked: np.ndarray
    refill_threshold: np.ndarray


def fault_profiles(faults: list[FaultSpec | None], n_s: int) -> FaultProfiles:
    """Turn the fault of each run (None for a normal run) into per-second multipliers.

    Args:
        faults: one entry per run of the batch.
        n_s: run length in seconds (samples of the 1 s grid).

    Returns:
        FaultProfiles; a normal run has multipliers 1, bias 0 and no refill blocking.
    """
    n_runs = len(faults)
    t_s = np.arange(n_s, dtype=float)
    ones = np.ones((n_runs, n_s))
    out = FaultProfiles(
        ones.copy(),
        ones.copy(),
        ones.copy(),
        np.zeros((n_runs, n_s)),
        np.zeros(n_runs, dtype=bool),
        np.full(n_runs, -np.inf),
    )
    for r, fault in enumerate(faults):
        if fault is None:
            continue
        size = _shape(t_s, fault)
        if fault.kind == "api_feeder_blockage":
            out.api_feed_factor[r] = 1.0 - fault.magnitude * size
        elif fault.kind == "lubricant_feeder_stop":
            out.lubricant_speed[r] = 1.0 - fault.magnitude * size
        elif fault.kind == "blender_speed_loss":
            out.blender_speed[r] = 1.0 - fault.magnitude * size
        elif fault.kind == "nir_fouling":
            out.nir_bias_rel[r] = fault.magnitude * size
        else:  # excipient_refill_failure: acts on the refill logic, not on a signal
            out.refill_blocked[r] = True
            out.refill_threshold[r] = 1.0 - fault.magnitude
    return out


def _shape(t_s: np.ndarray, fault: FaultSpec) -> np.ndarray:
    """0 before onset, a linear ramp to 1, 1 until onset + duration, then 0 again."""
    rising = np.clip((t_s - fault.onset_s) / max(fault.ramp_s, 1e-9), 0.0, 1.0)
    return np.where(t_s < fault.onset_s + fault.duration_s, rising, 0.0)


def fault_window(
    fault: FaultSpec, run_s: int, refill_onset_s: float, refill_end_s: float
) -> tuple[float, float, float]:
    """Onset, end and magnitude of a simulated fault, as fault_labels.csv states them.

    Args:
        fault: the injected fault.
        run_s: run length in seconds; faults that persist end there.
        refill_onset_s: for excipient_refill_failure, the simulated time of the failed refill
            request (NaN if the hopper never asked for one); ignored for other kinds.
        refill_end_s: for excipient_refill_failure, the time of the operator's refill (NaN
            if the run ended first).

    Returns:
        (onset_s, end_s, magnitude) in seconds after the run start.
    """
    if fault.kind != "excipient_refill_failure":
        return fault.onset_s, min(fault.onset_s + fault.duration_s, float(run_s)), fault.magnitude
    if not np.isfinite(refill_onset_s):
        # the hopper never reached its refill level (a very short run): nothing happened
        return float(run_s), float(run_s), 0.0
    # on the historian's 1 s grid, covering the sub-second times of the integration steps
    end_s = float(np.ceil(refill_end_s)) if np.isfinite(refill_end_s) else float(run_s)
    return float(np.floor(refill_onset_s)), min(end_s, float(run_s)), fault.magnitude
