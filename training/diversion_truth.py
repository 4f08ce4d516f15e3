"""`twin evaluate-diversion`: the twin's out-of-spec windows on the labelled fault runs against
the simulator's truth (issue 8; docs/scenarios.md, "Diversion on the fault runs").

Data flow: registered version / run (as `twin export` resolves it) -> eager `OnlineTwin`, its
monitor fitted as export fits it (training.export.build_online_twin) -> scripted once,
`run_filter` over every run of `fault_split` with its recorded inputs and measurements -> the
filter's `prediction` of the diversion tag per row (h(x_pred): the twin file's one-step
prediction, before that row's measurements, i.e. what a plant system reads online) ->
`out_of_spec_windows`. The truth: the campaign re-simulated with `twin generate`'s seed and sim
config (training/plant_truth.py), checked against the recorded measurements, the true tablet
API on the same grid -> the same windows. Per run and per fault kind: window edges, overlap,
mass and tablets out of spec, whether the twin's window and the configured diversion rule
cover the truth -> diversion.csv, diversion_per_run.csv, diversion.md and an MLflow run
`evaluate-diversion-<time>`.

Region compared: rows from the label's onset to its end + `diversion.tail_s` (material still
in the blender and feed frame when the fault ends), never before `past_steps` (the filter's
first row). Out-of-spec time elsewhere in a run (transients after setpoint steps) is reported
per run, not compared.
"""

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from data_pipelines.plant_sim import simulate_runs, validate_sim_config
from hybrid_twin import ConfigError
from training.dataset import PreparedDataset, RunTensors
from training.diversion import DiversionRule, OutOfSpecWindow, check_rule, out_of_spec_windows
from training.export import (
    build_online_twin,
    engineering_runs,
    load_eager_twin,
    open_model_on_data,
    run_filter,
)
from training.fault_evaluation import detection, load_labels
from training.plant_truth import (
    FEEDER_FLOW_TAGS,
    NIR_TAG,
    campaign_runs,
    grid_truth,
    reproduction,
    seconds_between,
)
from training.tracking import git_commit

log = logging.getLogger(__name__)

PREDICTION, ALARM = 5, 11  # positions in OnlineTwin.update's outputs (UPDATE_OUTPUTS)


@dataclass(frozen=True)
class DiversionSettings:
    """What is diverted and how it is compared (configs/evaluate_diversion.yaml `diversion`).

    Attributes:
        tag: the quality attribute diverted on; limits: its (low, high) specification.
        weight_tag: input holding the target tablet weight (twin's tablet count).
        throughput_tags: inputs whose sum is the twin's throughput (its pressed mass).
        rule: the plant's diversion rule, applied to the label's (onset, end).
        tail_s: seconds after the label's end still compared.
        max_loadcell_dev: largest median load-cell flow deviation (train stds) accepted as
            the same run when re-simulated.
    """

    tag: str
    limits: tuple[float, float]
    weight_tag: str
    throughput_tags: tuple[str, ...]
    rule: DiversionRule
    tail_s: float
    max_loadcell_dev: float

    @classmethod
    def from_config(cls, cfg: DictConfig, dataset: PreparedDataset) -> "DiversionSettings":
        """Read and check `diversion`, `spec_limits` and `verify` against the dataset's tags.

        Raises:
            ConfigError: naming the key: a tag the dataset lacks, missing or inverted limits,
                a bad rule, a negative tail.
        """
        d = cfg.diversion
        tag = str(d.tag)
        if tag not in dataset.measurement_tags:
            raise ConfigError(f"diversion.tag: {tag!r} is not a measurement of {dataset.root}; "
                              f"measurements: {dataset.measurement_tags}")  # fmt: skip
        for key, names in (("weight_tag", [d.weight_tag]), ("throughput_tags", d.throughput_tags)):
            unknown = [str(n) for n in names if str(n) not in dataset.input_tags]
            if unknown:
                raise ConfigError(f"diversion.{key}: {unknown} not among the inputs "
                                  f"{dataset.input_tags}")  # fmt: skip
        limits = cfg.spec_limits.get(tag) if cfg.spec_limits is not None else None
        if limits is None or len(limits) != 2 or not float(limits[0]) < float(limits[1]):
            raise ConfigError(f"spec_limits.{tag}: expected [low, high] with low < high, got "
                              f"{limits if limits is None else list(limits)}")  # fmt: skip
        rule = DiversionRule.from_config(OmegaConf.to_container(d.rule), "diversion.rule")
        if float(d.tail_s) < 0:
            raise ConfigError(f"diversion.tail_s: must be >= 0 s, got {d.tail_s}")
        missing = [t for t in (*FEEDER_FLOW_TAGS, NIR_TAG) if t not in dataset.measurement_tags]
        if missing:
            raise ConfigError(
                f"data_path: {dataset.root} lacks {missing}: the truth comes from plant_sim's "
                "CDC line (configs/plant/cdc_line.yaml)"
            )
        return cls(tag, (float(limits[0]), float(limits[1])), str(d.weight_tag),
                   tuple(str(t) for t in d.throughput_tags), rule, float(d.tail_s),
                   float(cfg.verify.max_loadcell_dev))  # fmt: skip


def window_summary(
    windows: list[OutOfSpecWindow], prefix: str, limits: tuple[float, float]
) -> dict[str, float]:
    """First start, last end, total out-of-spec time, kg, tablets, and the worst value of the
    windows: the one farthest outside `limits` (low, high)."""
    if not windows:
        return {f"{prefix}_windows": 0, f"{prefix}_start_s": math.nan,
                f"{prefix}_end_s": math.nan, f"{prefix}_out_s": 0.0, f"{prefix}_kg": 0.0,
                f"{prefix}_tablets": 0.0, f"{prefix}_worst": math.nan}  # fmt: skip
    low, high = limits
    worst = max(windows, key=lambda w: max(low - w.worst, w.worst - high)).worst
    return {
        f"{prefix}_windows": len(windows),
        f"{prefix}_start_s": windows[0].start_s,
        f"{prefix}_end_s": windows[-1].end_s,
        f"{prefix}_out_s": sum(w.duration_s for w in windows),
        f"{prefix}_kg": sum(w.mass_kg for w in windows),
        f"{prefix}_tablets": sum(w.tablets for w in windows),
        f"{prefix}_worst": worst,
    }


def compare_windows(
    time_s: np.ndarray, true: tuple[np.ndarray, np.ndarray, np.ndarray],
    twin: tuple[np.ndarray, np.ndarray, np.ndarray], limits: tuple[float, float],
    rule_window: tuple[float, float],
) -> dict[str, float]:  # fmt: skip
    """The true and the twin's out-of-spec windows of one region, side by side.

    Args:
        time_s: (T,) the region's grid, s; true, twin: (values, throughput_kg_h,
            tablet_weight_mg), each (T,); limits: (low, high); rule_window: the rule's
            diversion (start, end), s.

    Returns:
        true_* and twin_* window summaries (window_summary); start_diff_s / end_diff_s (twin
        minus true, NaN unless both have a window); overlap_true (share of the truly
        out-of-spec time the twin flags; NaN without a true window) and overlap_twin (share of
        the twin's flagged time truly out; NaN without a twin window); twin_covers (the
        envelope of the twin's windows holds every true window) and twin_missed_s; rule_covers,
        rule_missed_s, rule_extra_s (in-spec time the rule diverts, up to the last compared
        row + dt: what lies after it is not known to be in spec) and rule_open_end (a true
        window still open there that the rule has not missed: whether it covers it is not
        known, and rule_covers is False).
    """
    low, high = limits
    true_w = out_of_spec_windows(time_s, true[0], limits, true[1], true[2])
    twin_w = out_of_spec_windows(time_s, twin[0], limits, twin[1], twin[2])
    dt = float(time_s[1] - time_s[0])
    true_out = (true[0] < low) | (true[0] > high)
    twin_out = (twin[0] < low) | (twin[0] > high)
    both_s = float((true_out & twin_out).sum()) * dt
    row = {**window_summary(true_w, "true", limits), **window_summary(twin_w, "twin", limits)}
    row["start_diff_s"] = row["twin_start_s"] - row["true_start_s"]
    row["end_diff_s"] = row["twin_end_s"] - row["true_end_s"]
    row["overlap_true"] = both_s / row["true_out_s"] if true_w else math.nan
    row["overlap_twin"] = both_s / row["twin_out_s"] if twin_w else math.nan
    envelope = (row["twin_start_s"], row["twin_end_s"]) if twin_w else (math.inf, math.inf)
    twin_check = check_rule(true_w, envelope)
    # The rule is judged up to the compared rows' end: beyond it (a label ending with the
    # run) its diversion counted as in-spec time, and a window still open there as covered.
    rule_check = check_rule(true_w, rule_window, horizon_s=float(time_s[-1]) + dt)
    row["twin_covers"] = twin_check.covered
    row["twin_missed_s"] = twin_check.missed_before_s + twin_check.missed_after_s
    row["rule_covers"] = rule_check.covered
    row["rule_missed_s"] = rule_check.missed_before_s + rule_check.missed_after_s
    row["rule_extra_s"] = rule_check.extra_s
    row["rule_open_end"] = rule_check.undetermined
    return row


def twin_predictions(
    online, dataset: PreparedDataset, runs: list[RunTensors], past_steps: int,
    dtype: torch.dtype, tag: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The scripted filter over the runs in one padded batch.

    Returns:
        prediction (R, T) of `tag` (the filter's one-step prediction; NaN before past_steps),
        alarm (R, T) bool (False before past_steps), u (R, T, n_u) inputs in tag units.
    """
    u, y, _ = engineering_runs(dataset, runs, dtype)
    steps = run_filter(torch.jit.script(online), u, y, past_steps)[1:]
    k = dataset.measurement_tags.index(tag)
    prediction = torch.stack([s[PREDICTION][:, k] for s in steps], dim=1).double().numpy()
    alarm = torch.stack([s[ALARM] for s in steps], dim=1).numpy().astype(bool)
    pad = ((0, 0), (past_steps, 0))
    return (np.pad(prediction, pad, constant_values=np.nan), np.pad(alarm, pad),
            u.double().numpy())  # fmt: skip


def diversion_per_run(
    online, dataset: PreparedDataset, runs: list[RunTensors], labels: pd.DataFrame,
    sim: dict, seed: int, settings: DiversionSettings, past_steps: int, dtype: torch.dtype,
) -> pd.DataFrame:  # fmt: skip
    """One row per labelled fault run: reproduction check, true vs twin windows, rule.

    Args:
        online: an OnlineTwin (eager or scripted; only its filter's prediction and alarm are
            read); runs: the fault run segments, longer than past_steps + 1 rows; labels:
            their `load_labels` rows; sim, seed: `twin generate`'s config and seed. A segment
            with < 2 rows in its run's fault window (before a data gap that split the run)
            is left out, warned.

    Raises:
        ConfigError: a run that the re-simulation does not reproduce (seed / sim); a run
            none of whose segments has 2 rows in the fault window after past_steps.
    """
    label = labels.set_index("run_id")
    ids = [r.run_id for r in runs]
    matched = campaign_runs(dataset, ids, sim, seed, label.fault_kind.to_dict())
    specs = list({spec.run_id: spec for spec, _ in matched.values()}.values())
    truth = simulate_runs(specs, sim)
    row_of = {spec.run_id: i for i, spec in enumerate(specs)}
    flow_cols = [dataset.input_tags.index(t) for t in settings.throughput_tags]
    weight_col = dataset.input_tags.index(settings.weight_tag)
    start_of = dataset.manifest["runs"]
    repro = {}
    for run in runs:  # before the (slow) filter: a wrong seed or sim config fails fast
        spec, offset_s = matched[run.run_id]
        repro[run.run_id] = reproduction(dataset, run, truth, row_of[spec.run_id], offset_s)
        if not repro[run.run_id]["loadcell_dev"] <= settings.max_loadcell_dev:
            raise ConfigError(
                f"seed / sim: run {run.run_id} re-simulated as {spec.run_id} deviates from its "
                f"recorded load-cell flows by {repro[run.run_id]['loadcell_dev']:.3g} train "
                f"stds (median), more than verify.max_loadcell_dev "
                f"{settings.max_loadcell_dev:g}: not the run `twin generate` wrote"
            )
    prediction, alarm, u = twin_predictions(online, dataset, runs, past_steps, dtype, settings.tag)
    rows, outside_fault = [], []
    for i, run in enumerate(runs):
        spec, offset_s = matched[run.run_id]
        r = row_of[spec.run_id]
        t = run.time_s.numpy()
        n = t.size
        true = grid_truth(truth, r, t + offset_s, dataset.dt_s)
        lab = label.loc[run.run_id]
        onset_s = seconds_between(start_of[run.run_id]["start"], lab.onset)
        end_s = seconds_between(start_of[run.run_id]["start"], lab.end)
        region = (t >= onset_s) & (t < end_s + settings.tail_s) & (np.arange(n) >= past_steps)
        if region.sum() < 2:  # e.g. the segment before a data gap, the fault after it
            outside_fault.append(run.run_id)
            continue
        rows_ = np.flatnonzero(region)
        onset_row, end_row = int(rows_[0]), int(np.searchsorted(t, end_s, side="right"))
        twin = (prediction[i, :n], u[i, :n][:, flow_cols].sum(axis=1), u[i, :n, weight_col])
        truth_series = (true.tablet_api_lc, true.pressed_kg_h, true.tablet_weight_mg)
        row = compare_windows(t[rows_], tuple(a[rows_] for a in truth_series),
                              tuple(a[rows_] for a in twin), settings.limits,
                              settings.rule.window(onset_s, end_s))  # fmt: skip
        # detected as evaluate-faults does: the alarm raised inside the fault window
        _, alarm_delay_s = detection(alarm[i, :n], t, onset_row, end_row, onset_s)
        low, high = settings.limits
        outside = (np.arange(n) >= past_steps) & ~region
        rows.append({
            "run_id": run.run_id, "fault_kind": lab.fault_kind, "magnitude": lab.magnitude,
            "onset_s": onset_s, "end_s": end_s, **row,
            "alarm_delay_s": alarm_delay_s,
            "true_other_out_s": float((outside & ((true.tablet_api_lc < low) |
                                      (true.tablet_api_lc > high))).sum()) * dataset.dt_s,
            "twin_other_out_s": float((outside & ((twin[0] < low) | (twin[0] > high))).sum())
            * dataset.dt_s,
            **repro[run.run_id],
        })  # fmt: skip
    unscored = sorted(set(label.source_run) - {label.source_run[row["run_id"]] for row in rows})
    if unscored:
        raise ConfigError(f"fault_labels.csv: runs {unscored} have no segment with 2 rows from "
                          f"their onset after past_steps ({past_steps})")
    if outside_fault:
        log.warning("evaluate-diversion: run segments with < 2 rows in their run's fault window "
                    "after past_steps (%d) are left out: %s", past_steps, ", ".join(outside_fault))
    return pd.DataFrame(rows)


def per_kind(per_run: pd.DataFrame) -> pd.DataFrame:
    """Per fault kind: runs, runs with a true / twin window, mean |edge differences| over runs
    where both have one, mean overlap over every run with a true window (a run the twin missed
    counts 0), tablets out of spec, coverage counts."""
    out = []
    for kind, g in per_run.groupby("fault_kind", sort=True):
        both = g[(g.true_windows > 0) & (g.twin_windows > 0)]
        out.append({
            "fault_kind": kind, "n_runs": len(g),
            "runs_true_window": int((g.true_windows > 0).sum()),
            "runs_twin_window": int((g.twin_windows > 0).sum()),
            "mean_abs_start_diff_s": float(both.start_diff_s.abs().mean()),
            "mean_abs_end_diff_s": float(both.end_diff_s.abs().mean()),
            "mean_overlap_true": float(g.overlap_true.mean()),
            "true_tablets": float(g.true_tablets.sum()),
            "twin_tablets": float(g.twin_tablets.sum()),
            "twin_covers": int(g.twin_covers.sum()),
            "rule_covers": int(g.rule_covers.sum()),
        })  # fmt: skip
    return pd.DataFrame(out)


def _rule_cell(r) -> str:
    if r.rule_covers:
        return "yes"
    if r.rule_missed_s > 0:
        return f"no ({r.rule_missed_s:.0f} s missed)"
    return "open at the end (not known)"


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else \
        format(value, spec)  # fmt: skip


def _span(row, side: str) -> str:
    """'start-end (n windows, out s)' of one side of a per-run row, '-' without a window."""
    n = int(getattr(row, f"{side}_windows"))
    if n == 0:
        return "-"
    start, end, out = (getattr(row, f"{side}_{k}") for k in ("start_s", "end_s", "out_s"))
    return f"{start:.0f}-{end:.0f} ({n} x, {out:.0f} s out)"


def table_markdown(per_run: pd.DataFrame, kinds: pd.DataFrame, settings: DiversionSettings) -> str:
    """Per run (true vs twin window, coverage), then per fault kind."""
    low, high = settings.limits
    lines = [
        f"{settings.tag} outside [{low:g}, {high:g}] from the label's onset to its end + "
        f"{settings.tail_s:g} s; rule {settings.rule.delay_s:g} s / +{settings.rule.margin_s:g} s.",
        "",
        "| run | fault kind | true windows (s) | twin windows (s) | start / end diff (s) | "
        "overlap of true / of twin | tablets true / twin | twin covers | rule covers |",
        "|" + "---|" * 9,
    ]
    for r in per_run.itertuples():
        lines.append(
            f"| {r.run_id} | {r.fault_kind} | {_span(r, 'true')} | {_span(r, 'twin')} | "
            f"{_fmt(r.start_diff_s, '+.0f')} / "
            f"{_fmt(r.end_diff_s, '+.0f')} | {_fmt(r.overlap_true, '.2f')} / "
            f"{_fmt(r.overlap_twin, '.2f')} | {r.true_tablets:.0f} / {r.twin_tablets:.0f} | "
            f"{'yes' if r.twin_covers else f'no ({r.twin_missed_s:.0f} s missed)'} | "
            f"{_rule_cell(r)} |"
        )
    lines += [
        "",
        "| fault kind | runs | with true / twin window | mean abs start / end diff (s) | "
        "mean overlap of true | tablets true / twin | twin covers | rule covers |",
        "|" + "---|" * 8,
    ]
    for k in kinds.itertuples():
        lines.append(
            f"| {k.fault_kind} | {k.n_runs} | {k.runs_true_window} / {k.runs_twin_window} | "
            f"{_fmt(k.mean_abs_start_diff_s, '.0f')} / {_fmt(k.mean_abs_end_diff_s, '.0f')} | "
            f"{_fmt(k.mean_overlap_true, '.2f')} | {k.true_tablets:.0f} / {k.twin_tablets:.0f}"
            f" | {k.twin_covers}/{k.n_runs} | {k.rule_covers}/{k.n_runs} |"
        )
    return "\n".join(lines) + "\n"


def run_evaluate_diversion(cfg: DictConfig) -> pd.DataFrame:
    """`twin evaluate-diversion`: per-run and per-kind tables, written, printed, logged;
    returns the per-run table."""
    from hydra.core.hydra_config import HydraConfig

    started = time.perf_counter()
    run_id, version, run, dataset, dtype, past_steps, model_uri = open_model_on_data(cfg)
    settings = DiversionSettings.from_config(cfg, dataset)
    try:
        sim = validate_sim_config(OmegaConf.to_container(cfg.sim, resolve=True))
    except ValueError as error:
        raise ConfigError(f"sim: {error}") from error
    online, fit_record = build_online_twin(load_eager_twin(run_id, dataset, model_uri), dataset,
                                           cfg, past_steps, dtype)  # fmt: skip
    runs = [r for r in dataset.load_split(str(cfg.fault_split)) if r.u.shape[0] > past_steps + 1]
    labels = load_labels(dataset, [r.run_id for r in runs])
    per_run = diversion_per_run(online, dataset, runs, labels, sim, int(cfg.seed), settings,
                                past_steps, dtype)  # fmt: skip
    kinds = per_kind(per_run)
    markdown = table_markdown(per_run, kinds, settings)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    kinds.to_csv(output_dir / "diversion.csv", index=False)
    per_run.to_csv(output_dir / "diversion_per_run.csv", index=False)
    (output_dir / "diversion.md").write_text(markdown)
    seconds = time.perf_counter() - started
    print(markdown)
    print(f"evaluate-diversion: model run {run_id} (version {version}, "
          f"{run.data.tags.get('model.kind')}); truth re-simulated with seed {cfg.seed} "
          f"(load-cell deviation <= {per_run.loadcell_dev.max():.2g} train stds); wrote "
          f"{output_dir / 'diversion.csv'}, diversion_per_run.csv and diversion.md; "
          f"{seconds:.1f} s")  # fmt: skip
    _log(cfg, kinds, per_run, output_dir, run, version, dataset.manifest_sha256, fit_record,
         seconds)  # fmt: skip
    return per_run


def _log(cfg, kinds, per_run, output_dir, run, version, manifest_sha256, fit_record, seconds):
    mlflow.set_experiment(str(cfg.tracking.experiment_name))
    with mlflow.start_run(run_name=f"evaluate-diversion-{output_dir.name}"):
        mlflow.set_tags({
            "twin.stage": "evaluate-diversion",
            "evaluated.run_id": run.info.run_id,
            "evaluated.version": str(version),
            "evaluated.model_kind": str(run.data.tags.get("model.kind")),
            "data.manifest_sha256": manifest_sha256,
            "git.commit": git_commit(),
        })  # fmt: skip
        mlflow.log_params({
            "diversion.tag": str(cfg.diversion.tag),
            "spec_limits": str(list(cfg.spec_limits[str(cfg.diversion.tag)])),
            "diversion.rule": f"{cfg.diversion.rule.delay_s}/{cfg.diversion.rule.margin_s}",
            "diversion.tail_s": float(cfg.diversion.tail_s),
            "seed": int(cfg.seed),
            "fit_runs": ",".join(fit_record["fit_runs"]),
        })  # fmt: skip
        metrics = {"seconds": seconds, "max_loadcell_dev": float(per_run.loadcell_dev.max())}
        for k in kinds.itertuples():
            for name in (
                "mean_abs_start_diff_s",
                "mean_abs_end_diff_s",
                "mean_overlap_true",
                "true_tablets",
                "twin_tablets",
                "twin_covers",
                "rule_covers",
            ):
                value = float(getattr(k, name))
                if not math.isnan(value):
                    metrics[f"diversion/{k.fault_kind}/{name}"] = value
        mlflow.log_metrics(metrics)
        for name in ("diversion.csv", "diversion_per_run.csv", "diversion.md"):
            mlflow.log_artifact(str(output_dir / name))
