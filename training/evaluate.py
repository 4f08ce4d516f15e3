"""`twin evaluate`: the trained kinds side by side on held-out runs, logged and written to disk.

For each model kind (hybrid, mechanistic, black_box) it takes a training run from MLflow (the
latest finished one trained on this dataset, or the run id configured), loads its registered
scripted twin, forecasts the split's runs open loop (training/evaluation.py) and tabulates the
RMSE per regime (interpolation / extrapolation), PAT tag and horizon. The table goes to
`evaluation.csv` and `evaluation.md` in the Hydra output folder, to stdout, to a new MLflow
run of the same experiment (metrics + both files), and, per kind, into its training run as
`test/rmse/<regime>/<tag>/<h>min` metrics.

`mode=simulation` scores instead one free-running simulation per held-out run segment, from
its first `init_steps` rows to its end (the system-identification protocol;
training/simulation_eval.py), for every one of the latest `last_n` runs of each kind (seeds),
with the mean and spread per kind and a plot of simulated vs measured.
"""

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import mlflow
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from mlflow.entities import Run
from omegaconf import DictConfig, ListConfig, OmegaConf

from hybrid_twin import ConfigError
from hybrid_twin.errors import config_number, unknown_key_message
from training.dataset import PreparedDataset
from training.evaluation import forecast, forecast_origins, horizon_errors
from training.simulation_eval import (
    median_run,
    plot_simulation,
    simulate_runs,
    simulation_markdown,
    summarise,
)
from training.tracking import check_training_run, git_commit, load_twin, tracking_uri

log = logging.getLogger(__name__)

BASELINES = ("mechanistic", "black_box")
MODELS_SCHEME = "models:/"
MODES = ("forecast", "simulation")


def run_evaluate(cfg: DictConfig) -> pd.DataFrame:
    """`twin evaluate`: returns the long table (one row per kind, regime, tag and horizon).

    Raises:
        ConfigError: a bad setting, no training run for a kind, or a run trained on other data.
        DatasetError: the dataset fails verification or no run is long enough to forecast.
    """
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))
    mode = str(OmegaConf.select(cfg, "mode", default="forecast"))
    if mode not in MODES:
        raise ConfigError(f"mode: unknown mode {mode!r}; valid: {', '.join(MODES)}")
    dataset = PreparedDataset.open(cfg.data_path)
    mlflow.set_tracking_uri(tracking_uri())
    if mode == "simulation":
        return run_simulation(cfg, dataset)
    horizons, stride_min, batch_size = forecast_settings(cfg, dataset.measurement_tags)
    named = {kind: _training_run(cfg, kind, dataset.manifest_sha256) for kind in cfg.kinds}
    runs = {kind: run for kind, (run, _) in named.items()}
    versions = {kind: uri for kind, (_, uri) in named.items() if uri is not None}
    table = evaluate_runs(
        runs,
        dataset,
        split=str(cfg.split),
        horizons_min=horizons,
        stride_min=stride_min,
        batch_size=batch_size,
        model_uris=versions,
    )
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    markdown = comparison_markdown(table, headline_tag=str(cfg.headline_tag))
    table.to_csv(output_dir / "evaluation.csv", index=False)
    (output_dir / "evaluation.md").write_text(markdown)
    _log(cfg, table, runs, versions, dataset.manifest_sha256, output_dir, horizons)
    print(markdown)
    print(f"evaluate: wrote {output_dir / 'evaluation.csv'} and evaluation.md")
    return table


def forecast_settings(
    cfg: DictConfig, measurement_tags: Sequence[str]
) -> tuple[list[float], float, int]:
    """(horizons_min, stride_min, batch_size) of `mode=forecast`, checked with headline_tag
    before any forecast: otherwise a bare TypeError minutes in, or silently no bold row.

    Raises:
        ConfigError: naming the key and its value.
    """
    value = cfg.horizons_min
    values = list(value) if isinstance(value, ListConfig | list) else [value]  # 10: [10]
    horizons = [config_number(h, "horizons_min", "min") for h in values]
    if not horizons or min(horizons) <= 0:
        raise ConfigError(
            f"horizons_min: expected a non-empty list of numbers > 0 (min), got {value!r}"
        )
    horizons = [int(h) if h.is_integer() else h for h in horizons]  # the table shows 10, not 10.0
    stride_min = config_number(cfg.stride_min, "stride_min", "min")
    batch_size = _whole(cfg.batch_size, "batch_size")
    tag = str(cfg.headline_tag)
    if tag not in measurement_tags:
        raise ConfigError(
            f"headline_tag: {unknown_key_message('measurement tag', tag, measurement_tags)}"
        )
    return horizons, stride_min, batch_size


def evaluate_runs(
    runs: Mapping[str, Run],
    dataset: PreparedDataset,
    split: str,
    horizons_min: Sequence[float],
    stride_min: float,
    batch_size: int = 64,
    model_uris: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Forecast `split` with each run's twin (the run's newest model, or the registered
    version `model_uris[kind]` names); the long RMSE table.

    Returns:
        Columns kind, run_id, regime, tag, unit, horizon_min, rmse, n (sampled points pooled).
    """
    dt_s = dataset.dt_s
    horizon_steps = [_steps(h * 60.0, dt_s, f"horizons_min {h}") for h in horizons_min]
    stride_steps = _steps(stride_min * 60.0, dt_s, f"stride_min {stride_min}")
    segments = dataset.load_split(split)
    regimes = sorted({_regime(dataset, s.run_id) for s in segments})
    normalisation = dataset.normalisation()
    rows = []
    past = {kind: int(run.data.params["datamodule.past_steps"]) for kind, run in runs.items()}
    if len(set(past.values())) > 1:  # origins follow P: the kinds would be scored apart
        raise ConfigError(
            f"evaluate: the runs' datamodule.past_steps differ ({past}): their forecast "
            "origins would differ, and the table would compare other windows; evaluate "
            "runs of one past window together"
        )
    for kind, run in runs.items():
        past_steps = past[kind]
        origins = forecast_origins(segments, past_steps, max(horizon_steps), stride_steps)
        group = torch.tensor([regimes.index(_regime(dataset, r)) for r in origins.run_ids])
        twin = load_twin(run.info.run_id, (model_uris or {}).get(kind))
        predicted = forecast(twin, origins.windows, batch_size)
        diverged = int((~torch.isfinite(predicted) & origins.windows.mask).any(dim=(1, 2)).sum())
        if diverged:
            log.warning("evaluate: %s: %d of %d forecast windows are not finite; their "
                        "non-finite points are left out of the RMSE and of n", kind, diverged,
                        predicted.shape[0])  # fmt: skip
        errors = horizon_errors(
            predicted, origins.windows, normalisation, horizon_steps, group, len(regimes)
        )
        rmse = errors.rmse()
        for g, regime in enumerate(regimes):
            for i, tag in enumerate(dataset.measurement_tags):
                for j, horizon in enumerate(horizons_min):
                    rows.append(
                        {
                            "kind": kind,
                            "run_id": run.info.run_id,
                            "regime": regime,
                            "tag": tag,
                            "unit": dataset.manifest["tags"][tag]["unit"],
                            "horizon_min": horizon,
                            "rmse": float(rmse[g, i, j]),
                            "n": int(errors.count[g, i, j]),
                        }
                    )
    return pd.DataFrame(rows)


def comparison_markdown(table: pd.DataFrame, headline_tag: str) -> str:
    """One table per regime: rows tag x horizon, one RMSE column per kind, and the hybrid's
    RMSE over the better baseline's where both are there (below 1: the hybrid is better)."""
    kinds = list(dict.fromkeys(table["kind"]))
    baselines = [k for k in kinds if k in BASELINES]
    parts = []
    for regime, block in table.groupby("regime", sort=False):
        rows = ["tag", "unit", "horizon_min"]
        # Reindexed to every row of the block: one no kind has a number for (no sample within
        # the horizon, or every forecast non-finite) is shown as "-", not left out.
        wide = block.pivot_table(index=rows, columns="kind", values="rmse", sort=False).reindex(
            index=pd.MultiIndex.from_frame(block[rows].drop_duplicates()), columns=kinds
        )
        header = ["tag", "unit", "horizon"] + kinds
        with_ratio = "hybrid" in kinds and baselines
        if with_ratio:
            header.append("hybrid / best baseline")
        lines = [
            f"### {regime} runs: open-loop RMSE",
            "",
            _md_row(header),
            _md_row(["---"] * len(header)),
        ]
        for (tag, unit, horizon), values in wide.iterrows():
            cells = [f"**{tag}**" if tag == headline_tag else tag, unit, f"{horizon:g} min"]
            cells += [_fmt(values[k]) for k in kinds]
            if with_ratio:
                best = min((values[b] for b in baselines if not math.isnan(values[b])),
                           default=math.nan)  # a baseline with no number is no baseline
                cells.append("n/a" if best <= 0 else _fmt(values["hybrid"] / best))  # NaN: "-"
            lines.append(_md_row(cells))
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def run_simulation(cfg: DictConfig, dataset: PreparedDataset) -> pd.DataFrame:
    """`twin evaluate mode=simulation`: whole-segment simulation RMSE of the latest `last_n`
    runs of each kind (or the ids `runs.<kind>` lists); returns the long table.

    Writes simulation.csv (one row per run, segment and tag), simulation_summary.csv and
    simulation.md (mean ± std per kind), simulation_<segment>.png (each kind's median run
    against the measurements) to the output folder and to an MLflow run `simulate-<time>`;
    each training run gets `test/sim_rmse/<segment>/<tag>`.

    Raises:
        ConfigError: a bad setting, too few runs of a kind, a run trained on other data.
    """
    runs = {kind: _training_runs(cfg, kind, dataset.manifest_sha256) for kind in cfg.kinds}
    init = _init_steps(cfg, [run for found in runs.values() for run in found])
    twins = {
        kind: [
            (r.info.run_id, r.data.params.get("seed", ""), load_twin(r.info.run_id)) for r in found
        ]
        for kind, found in runs.items()
    }
    table, traces = simulate_runs(twins, dataset, str(cfg.split), init)
    summary = summarise(table)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    markdown = simulation_markdown(summary)
    table.to_csv(output_dir / "simulation.csv", index=False)
    summary.to_csv(output_dir / "simulation_summary.csv", index=False)
    (output_dir / "simulation.md").write_text(markdown)
    typical = {kind: traces[kind][median_run(table, kind)] for kind in traces}
    units = [dataset.manifest["tags"][tag]["unit"] for tag in dataset.measurement_tags]
    plots = plot_simulation(typical, dataset.measurement_tags, units, output_dir)
    client = mlflow.MlflowClient()
    for r in table[table["rmse"].notna()].itertuples():
        client.log_metric(r.run_id, f"test/sim_rmse/{r.segment}/{r.tag}", r.rmse)
    mlflow.set_experiment(str(cfg.tracking.experiment_name))
    with mlflow.start_run(run_name=f"simulate-{output_dir.name}"):
        mlflow.set_tags(
            {
                "twin.stage": "evaluate",
                "evaluate.mode": "simulation",
                "data.manifest_sha256": dataset.manifest_sha256,
                "git.commit": git_commit(),
                **{f"evaluated.{k}": ",".join(t[0] for t in v) for k, v in twins.items()},
            }
        )
        mlflow.log_params({"split": cfg.split, "init_steps": init, "data_path": cfg.data_path})
        for r in summary.itertuples():
            name = f"sim_rmse/{r.segment}/{r.tag}/{r.kind}"
            mlflow.log_metric(f"{name}/mean", r.mean)
            if r.std == r.std:
                mlflow.log_metric(f"{name}/std", r.std)
        for name in ("simulation.csv", "simulation_summary.csv", "simulation.md"):
            mlflow.log_artifact(str(output_dir / name))
        for path in plots:
            mlflow.log_artifact(str(path), artifact_path="plots")
    print(markdown)
    print(
        f"evaluate: wrote {output_dir / 'simulation.csv'}, simulation.md and {len(plots)} plot(s)"
    )
    return table


def _init_steps(cfg: DictConfig, runs: Sequence[Run]) -> int:
    """n: `init_steps`, else the runs' common `datamodule.past_steps`."""
    configured = OmegaConf.select(cfg, "init_steps")
    if configured is not None:
        return _whole(configured, "init_steps")
    steps = {int(r.data.params["datamodule.past_steps"]) for r in runs}
    if len(steps) != 1:
        raise ConfigError(
            f"init_steps: the runs were trained with different past_steps {sorted(steps)}; "
            f"set init_steps"
        )
    return steps.pop()


def _training_runs(cfg: DictConfig, kind: str, manifest_sha256: str) -> list[Run]:
    """`runs.<kind>` (one id or a list of ids), else the latest `last_n` finished runs of the
    kind on this dataset, newest first."""
    named = OmegaConf.select(cfg, f"runs.{kind}")
    if named:
        ids = [named] if isinstance(named, str) else list(named)
        if any(str(i).startswith(MODELS_SCHEME) for i in ids):
            raise ConfigError(f"runs.{kind}: mode=simulation takes training run ids, "
                              f"got {ids}; mode=forecast scores a registered version")  # fmt: skip
        client = mlflow.MlflowClient()
        runs = [check_training_run(client, str(run_id), f"runs.{kind}") for run_id in ids]
        for run in runs:
            _check_run(cfg, run, kind, manifest_sha256)
        return runs
    last_n = _whole(OmegaConf.select(cfg, "last_n", default=1), "last_n")
    runs = _search_runs(cfg, kind, manifest_sha256, last_n)
    if len(runs) < last_n:
        raise ConfigError(
            f"last_n={last_n}: only {len(runs)} finished `twin train model={kind}` run(s) on "
            f"this dataset in experiment {cfg.tracking.experiment_name!r}"
        )
    return runs


def _training_run(cfg: DictConfig, kind: str, manifest_sha256: str) -> tuple[Run, str | None]:
    """(The configured run of `kind`, or its latest finished one on this dataset; the
    registered version's URI where `runs.<kind>` names one, else None)."""
    experiment = str(cfg.tracking.experiment_name)
    run_id = OmegaConf.select(cfg, f"runs.{kind}")
    if isinstance(run_id, ListConfig | list):  # a list is for mode=simulation's seeds
        raise ConfigError(
            f"runs.{kind}: forecast mode evaluates one run per kind, got a list {list(run_id)}; "
            f"give one run id, or use mode=simulation to pool several"
        )
    version_uri = None
    if run_id and str(run_id).startswith(MODELS_SCHEME):
        version_uri = str(run_id)
        run = _version_run(version_uri, f"runs.{kind}")
        if run.data.tags.get("model.kind") != kind:
            raise ConfigError(
                f"runs.{kind}: {version_uri} was trained as {run.data.tags.get('model.kind')!r}"
            )
    elif run_id:
        run = check_training_run(mlflow.MlflowClient(), str(run_id), f"runs.{kind}")
        if run.data.tags.get("model.kind") != kind:
            raise ConfigError(
                f"runs.{kind}: run {run_id} trained kind {run.data.tags.get('model.kind')!r}"
            )
    else:
        found = _search_runs(cfg, kind, manifest_sha256, 1)
        if not found:
            raise ConfigError(
                f"no finished `twin train model={kind}` run on this dataset (manifest "
                f"{manifest_sha256[:12]}) in experiment {experiment!r} at {tracking_uri()}; "
                f"train one, or name one with runs.{kind}=<run id>"
            )
        run = found[0]
    _check_run(cfg, run, kind, manifest_sha256)
    return run, version_uri


def _version_run(uri: str, key: str) -> Run:
    """The training run of registered version `models:/<name>/<version>` (a resumed run
    registers several; `runs:/<id>/model` holds only its newest).

    Raises:
        ConfigError: not of that form, or no such version in the registry, naming `key`.
    """
    from mlflow.exceptions import MlflowException

    name, _, version = uri[len(MODELS_SCHEME) :].rpartition("/")
    if not name or not version.isdigit():
        raise ConfigError(f"{key}: expected a run id or {MODELS_SCHEME}<name>/<version number>, "
                          f"got {uri!r}")  # fmt: skip
    client = mlflow.MlflowClient()
    try:
        return client.get_run(client.get_model_version(name, version).run_id)
    except MlflowException:
        raise ConfigError(f"{key}: {uri} is not in the registry at {tracking_uri()}") from None


def _search_runs(cfg: DictConfig, kind: str, manifest_sha256: str, n: int) -> list[Run]:
    """The latest n FINISHED training runs of `kind` on this dataset, newest first."""
    return mlflow.search_runs(
        experiment_names=[str(cfg.tracking.experiment_name)],
        filter_string=(
            f"tags.`model.kind` = '{kind}' and attributes.status = 'FINISHED' "
            f"and tags.`data.manifest_sha256` = '{manifest_sha256}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=n,
        output_format="list",
    )


def _check_run(cfg: DictConfig, run: Run, kind: str, manifest_sha256: str) -> None:
    if run.data.tags.get("model.kind") != kind:
        raise ConfigError(
            f"runs.{kind}: run {run.info.run_id} trained kind {run.data.tags.get('model.kind')!r}"
        )
    trained_on = run.data.tags.get("data.manifest_sha256")
    if trained_on != manifest_sha256:
        raise ConfigError(
            f"run {run.info.run_id} ({kind}) was trained on manifest {trained_on}, "
            f"data_path {cfg.data_path} has {manifest_sha256}: its normalisation would not match"
        )


def _log(
    cfg: DictConfig,
    table: pd.DataFrame,
    runs: Mapping[str, Run],
    versions: Mapping[str, str],
    manifest_sha256: str,
    output_dir: Path,
    horizons_min: Sequence[float],
) -> None:
    def key(row) -> str:
        return f"test/rmse/{row.regime}/{row.tag}/{row.horizon_min:g}min"

    finite = table[table["rmse"].notna()]
    client = mlflow.MlflowClient()
    for kind, run in runs.items():
        if kind in versions:  # an earlier version of the run: its metrics are not the run's
            continue
        metrics = {key(r): r.rmse for r in finite[finite["kind"] == kind].itertuples()}
        for name, value in metrics.items():
            client.log_metric(run.info.run_id, name, value)
    mlflow.set_experiment(str(cfg.tracking.experiment_name))
    with mlflow.start_run(run_name=f"evaluate-{output_dir.name}"):
        mlflow.set_tags(
            {
                "twin.stage": "evaluate",
                "data.manifest_sha256": manifest_sha256,
                "git.commit": git_commit(),
                **{f"evaluated.{kind}": run.info.run_id for kind, run in runs.items()},
                **{f"evaluated.{kind}.model_uri": uri for kind, uri in versions.items()},
            }
        )
        mlflow.log_params(
            {
                "split": cfg.split,
                "horizons_min": list(horizons_min),
                "stride_min": cfg.stride_min,
                "data_path": cfg.data_path,
            }
        )
        mlflow.log_metrics({f"{key(r)}/{r.kind}": r.rmse for r in finite.itertuples()})
        mlflow.log_artifact(str(output_dir / "evaluation.csv"))
        mlflow.log_artifact(str(output_dir / "evaluation.md"))


def _regime(dataset: PreparedDataset, run_id: str) -> str:
    return str(dataset.manifest["runs"][run_id].get("regime") or "all")


def _steps(seconds: float, dt_s: float, what: str) -> int:
    steps = seconds / dt_s
    if steps < 1 or not math.isclose(steps, round(steps), rel_tol=0, abs_tol=1e-6):
        raise ConfigError(f"{what}: {seconds:g} s is not a whole number >= 1 of dt {dt_s:g} s")
    return int(round(steps))


def _whole(value: object, key: str) -> int:
    number = config_number(value, key)
    if not number.is_integer() or number < 1:
        raise ConfigError(f"{key}: expected a whole number >= 1, got {value!r}")
    return int(number)


def _fmt(value: float) -> str:
    return "-" if value != value else f"{value:.4g}"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
