"""The simulator's truth for the runs of a prepared dataset that `twin generate` made.

Place in the data flow: `twin evaluate-diversion` (training/diversion_truth.py) scores the
twin's out-of-spec windows on the labelled fault runs against what the plant really pressed.
The prepared dataset keeps only measurements; the truth comes from re-simulating the campaign
with the seed and sim config `twin generate` used (configs/generate.yaml): plant_sim is
deterministic per run (docs/plant_sim.md, "Determinism"), so `design_campaign(sim, seed)`
gives the same RunSpecs and `simulate_runs` the same trajectories, noise included.

`campaign_runs` matches each prepared run (segment) to its RunSpec by the manifest's
`source_run` and checks start time, kind and fault kind; `reproduction` measures how well the
re-simulation explains the recorded measurements (the controller's load-cell flows agree to
the historian's rounding; the noise-free flows and NIR to within the sensor noise), so a
wrong seed or sim config is caught before any window is compared. `grid_truth` puts the true
tablet API content, pressed mass flow and tablet weight on the prepared grid with the
prepared measurements' convention: row k holds the mean of the 1 s samples in (t_k - dt, t_k]
(data_pipelines/align.py).
"""

import datetime
from dataclasses import dataclass

import numpy as np

from data_pipelines.plant_sim import RunSpec, Truth, design_campaign
from hybrid_twin import ConfigError
from training.dataset import PreparedDataset, RunTensors

FEEDER_FLOW_TAGS = ("FEED_API.MASSFLOW", "FEED_EXC.MASSFLOW", "FEED_LUB.MASSFLOW")  # plant order
NIR_TAG = "NIR.API_CONC"


def seconds_between(start: str, stamp: str) -> float:
    """stamp - start in seconds; both ISO 8601 with an offset or Z (manifest, label times)."""

    def parse(text: str) -> datetime.datetime:
        return datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00"))

    return (parse(stamp) - parse(start)).total_seconds()


def campaign_runs(
    dataset: PreparedDataset, run_ids: list[str], sim: dict, seed: int,
    labels: dict[str, str] | None = None,
) -> dict[str, tuple[RunSpec, float]]:  # fmt: skip
    """The RunSpec behind each prepared run and the segment's offset in it.

    Args:
        dataset: the prepared dataset; run_ids: its runs (segments) to match.
        sim: the validated sim config `twin generate` used; seed: its seed.
        labels: optional run id -> labelled fault kind, checked against the RunSpec's fault.

    Returns:
        run id -> (RunSpec, offset_s): the segment's time_s + offset_s is seconds since the
        simulated run's start.

    Raises:
        ConfigError: naming `seed` and `sim` when a run's source is not in the re-designed
            campaign, or its start time, kind or fault kind differ from the recorded ones.
    """
    specs = {spec.run_id: spec for spec in design_campaign(sim, int(seed))}
    out = {}
    for run_id in run_ids:
        entry = dataset.manifest["runs"][run_id]
        source = str(entry.get("source_run", run_id))
        spec = specs.get(source)
        where = f"seed={seed} / sim: run {run_id} (source {source})"
        if spec is None:
            raise ConfigError(f"{where}: not in the re-designed campaign of {len(specs)} runs; "
                              "use the seed and sim config `twin generate` used")  # fmt: skip
        start = datetime.datetime.fromtimestamp(spec.start_ms / 1000.0, datetime.UTC)
        offset_s = seconds_between(start.isoformat(), entry["start"])
        kind = str(entry.get("kind", "normal"))
        fault = spec.fault.kind if spec.fault is not None else None
        wanted = labels.get(run_id) if labels else None
        if (
            not 0.0 <= offset_s < spec.duration_s
            or kind != spec.kind
            or wanted not in (None, fault)
        ):
            raise ConfigError(
                f"{where}: recorded start {entry['start']}, kind {kind}, fault {wanted}; "
                f"re-simulated start {start.isoformat()}, kind {spec.kind}, fault {fault}. "
                "The seed or sim config differs from the one `twin generate` used"
            )
        out[run_id] = (spec, offset_s)
    return out


def cell_means(signal: np.ndarray, time_s: np.ndarray, dt_s: float) -> np.ndarray:
    """Mean of a 1 s signal (sample s at t = s) over each grid cell (t_k - dt, t_k].

    Args:
        signal: (n_s,) or (n_s, m) samples at t = 0, 1, ..., n_s - 1 s.
        time_s: (T,) grid times, s since the signal's t = 0; dt_s: grid step, s.

    Returns:
        (T,) or (T, m); NaN for a cell holding no sample.
    """
    signal = np.asarray(signal, dtype=np.float64)
    cumulative = np.concatenate([np.zeros((1, *signal.shape[1:])), np.cumsum(signal, axis=0)])
    n_s = signal.shape[0]
    hi = np.minimum(np.floor(time_s + 1e-9).astype(np.int64), n_s - 1) + 1  # exclusive
    lo = np.maximum(np.floor(time_s - dt_s + 1e-9).astype(np.int64) + 1, 0)
    count = (hi - lo).astype(np.float64)
    ok = count > 0
    safe_lo, safe_hi = np.where(ok, lo, 0), np.where(ok, hi, 1)
    total = cumulative[safe_hi] - cumulative[safe_lo]
    count = count.reshape(-1, *([1] * (signal.ndim - 1)))
    return np.where(count > 0, total / np.maximum(count, 1.0), np.nan)


@dataclass(frozen=True)
class GridTruth:
    """The plant's true quality and production on a run's grid (means over (t_k - dt, t_k]).

    Attributes:
        tablet_api_lc: (T,) API content per tablet, % of the recipe's label claim.
        pressed_kg_h: (T,) mass flow pressed into tablets.
        tablet_weight_mg: (T,) true mean tablet weight.
    """

    tablet_api_lc: np.ndarray
    pressed_kg_h: np.ndarray
    tablet_weight_mg: np.ndarray


def grid_truth(truth: Truth, r: int, time_s: np.ndarray, dt_s: float) -> GridTruth:
    """Row r of a simulated batch on the grid time_s (s since the simulated run's start)."""
    pressed = np.diff(truth["cum_pressed_kg"][r, :, 2]) * 3600.0  # kg per 1 s -> kg/h
    pressed = np.concatenate([pressed, pressed[-1:]])
    return GridTruth(
        cell_means(truth.tablet_api_lc(r), time_s, dt_s),
        cell_means(pressed, time_s, dt_s),
        cell_means(truth["tablet_weight_mg"][r], time_s, dt_s),
    )


def reproduction(
    dataset: PreparedDataset, run: RunTensors, truth: Truth, r: int, offset_s: float
) -> dict[str, float]:
    """How well the re-simulated run explains its recorded measurements.

    Deviations are medians over the sampled rows of |recorded - simulated|, in units of the
    tag's train std. `loadcell_dev`: the feeders' load-cell flow (the controller's own reading,
    recorded without further noise), worst feeder: historian rounding only when the run is the
    same run. `flow_dev` and `nir_dev`: the noise-free delivered flows (worst feeder) and the
    noise-free NIR (outlet API fraction over the spectrum window, with the fault's NIR bias):
    within the sensor noise.
    """
    dt_s = dataset.dt_s
    t = run.time_s.numpy() + offset_s
    _, _, y_mean, y_std = (v.numpy() for v in dataset.normalisation())
    y = run.y.double().numpy() * y_std + y_mean
    mask = run.mask.numpy()
    tags = dataset.measurement_tags

    def deviation(tag: str, simulated: np.ndarray) -> float:
        k = tags.index(tag)
        rows = mask[:, k] & np.isfinite(simulated)
        return float(np.median(np.abs(y[rows, k] - simulated[rows])) / y_std[k])

    loadcell = cell_means(truth["feeder_flow_meas_kg_h"][r], t, dt_s)
    flow = cell_means(truth["feeder_flow_kg_h"][r], t, dt_s)
    nir_1s = 100.0 * truth["outlet_api_fraction"][r] * (1.0 + truth.faults.nir_bias_rel[r])
    # the NIR sample at t_k is the mean spectrum over (t_k - period, t_k] (plant_sim sensors)
    period_s = float(dataset.manifest["tags"][NIR_TAG]["sample_period_s"])
    return {
        "loadcell_dev": max(
            deviation(tag, loadcell[:, i]) for i, tag in enumerate(FEEDER_FLOW_TAGS)
        ),  # fmt: skip
        "flow_dev": max(deviation(tag, flow[:, i]) for i, tag in enumerate(FEEDER_FLOW_TAGS)),
        "nir_dev": deviation(NIR_TAG, cell_means(nir_1s, t, period_s)),
    }
