"""`twin scenario`: what-if scenarios through a trained twin, with diversion windows, logged.

Data flow: configs/scenario.yaml (the twin, the line's feeders, spec limits, the diversion
rule, which scenarios) + configs/scenarios/<name>.yaml (start and events, docs/scenarios.md)
-> the twin from a twin file (`twin export`) or an MLflow run / registered version
(training/scenario_twin.py) -> each scenario run open loop (training/scenario_run.py) -> per
scenario `<name>.csv` (inputs and predicted tags over time) and `<name>.png`, and
`scenarios.csv` / `scenarios.md` (per tag: limits, range, out-of-spec time and material;
per disturbance: the diversion rule's check) in the Hydra output folder, on stdout and in an
MLflow run `scenario-<time>`.
"""

import math
from collections.abc import Mapping
from pathlib import Path

import mlflow
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hybrid_twin import ConfigError
from training.config_dir import config_dir
from training.dataset import PreparedDataset
from training.diversion import DiversionRule
from training.scenario_plots import plot_scenario
from training.scenario_run import ScenarioResult, run_scenario_once, summary_rows
from training.scenario_spec import LineSpec, Scenario, parse_line, parse_scenario
from training.scenario_twin import ScenarioTwin, twin_from_file, twin_from_model
from training.tracking import git_commit, tracking_uri


def run_scenario(cfg: DictConfig) -> pd.DataFrame:
    """`twin scenario`: run every configured scenario; returns the summary table.

    Raises:
        ConfigError: a bad setting or scenario file (the message names file and key), no twin.
        TwinFileError: an unreadable twin file.
    """
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))
    mlflow.set_tracking_uri(tracking_uri())
    config = OmegaConf.to_container(cfg, resolve=True)
    line = parse_line(config["line"])
    needs_data = not config["twin"]["file"] or any(
        starts_from_recording(s) for s in _raw_scenarios(config).values()
    )
    dataset = PreparedDataset.open(config["data_path"]) if needs_data else None
    twin = load_scenario_twin(cfg, dataset)
    scenarios = [
        parse_scenario(raw, source, line, twin.setpoint_tags, twin.dt_s, config["spec_limits"])
        for source, raw in _raw_scenarios(config).items()
    ]
    check_unique_names(scenarios)
    rule = DiversionRule.from_config(config["diversion"]["rule"])
    out = Path(HydraConfig.get().runtime.output_dir)
    results = run_all(twin, scenarios, line, rule, config, dataset, out)
    summary = pd.DataFrame([row for r in results for row in summary_rows(r, twin.units)])
    markdown = scenarios_markdown(results, summary, twin, str(config["diversion"]["tag"]), rule)
    summary.to_csv(out / "scenarios.csv", index=False)
    (out / "scenarios.md").write_text(markdown)
    _log(config, twin, results, summary, out)
    print(markdown)
    print(f"scenario: wrote {len(results)} scenario(s) to {out}")
    return summary


def starts_from_recording(raw) -> bool:
    """Whether a scenario starts from a recorded run (a malformed start is parse_scenario's
    to name)."""
    start = raw.get("start") if isinstance(raw, Mapping) else None
    return isinstance(start, Mapping) and start.get("from") == "recorded"


def check_unique_names(scenarios: list[Scenario]) -> None:
    """Outputs are named by `name`: two scenarios of one name would overwrite each other.

    Raises:
        ConfigError: a name given by more than one file, naming the files.
    """
    sources: dict[str, list[str]] = {}
    for scenario in scenarios:
        sources.setdefault(scenario.name, []).append(scenario.source)
    for name, files in sources.items():
        if len(files) > 1:
            raise ConfigError(
                f"run: scenarios {', '.join(files)} all have name {name!r}; their outputs "
                f"({name}.csv, {name}.png, the tables) would overwrite each other: give each "
                "its own name"
            )


def run_all(
    twin: ScenarioTwin, scenarios: list[Scenario], line: LineSpec, rule: DiversionRule,
    config: dict, dataset: PreparedDataset | None, out: Path,
) -> list[ScenarioResult]:  # fmt: skip
    """Run, write `<name>.csv` and `<name>.png` for each scenario."""
    tag = str(config["diversion"]["tag"])
    results = []
    for scenario in scenarios:
        result = run_scenario_once(twin, scenario, line, rule, tag,
                                   str(config["diversion"]["weight_tag"]), dataset)  # fmt: skip
        result.table.to_csv(out / f"{scenario.name}.csv", index=False)
        diversion = rule.window(*result.disturbance_s) if result.disturbance_s else None
        figure = plot_scenario(result, twin.units, tag, diversion, str(config["speed_tag"]),
                               [f.setpoint for f in line.feeders.values()])  # fmt: skip
        figure.savefig(out / f"{scenario.name}.png")
        results.append(result)
    return results


def load_scenario_twin(cfg: DictConfig, dataset: PreparedDataset | None) -> ScenarioTwin:
    """`twin.file`, else the run of `twin.run_id` / `twin.model_uri` / the latest registered
    version (training/export.py's resolve_model), with the dataset's tag order and units.

    Raises:
        ConfigError: no such version or run, or a run trained on other data than data_path.
    """
    if cfg.twin.file:
        return twin_from_file(str(cfg.twin.file))
    from training.export import check_trained_on, resolve_model
    from training.tracking import load_twin

    run_id, version, model_uri = resolve_model(cfg.twin, prefix="twin.")
    run = mlflow.get_run(run_id)
    check_trained_on(run, dataset, dataset.root, where="twin: ")
    units = {t: dataset.manifest["tags"][t]["unit"] for t in dataset.manifest["tags"]}
    kind = run.data.tags.get("model.kind")
    return twin_from_model(
        load_twin(run_id, model_uri), dataset.input_tags, dataset.measurement_tags, units,
        int(run.data.params["datamodule.past_steps"]),
        f"run {run_id} ({kind}, {cfg.twin.registered_model_name} v{version})",
    )  # fmt: skip


def scenarios_markdown(
    results: list[ScenarioResult], summary: pd.DataFrame, twin: ScenarioTwin, tag: str,
    rule: DiversionRule,
) -> str:  # fmt: skip
    """Per scenario: its quality table against the limits, then the diversion check."""
    parts = [f"twin: {twin.source}"]
    for result in results:
        s = result.scenario
        rows = summary[summary["scenario"] == s.name]
        lines = [
            f"### {s.name}: {s.description}", "",
            "| tag | unit | spec | start | min | max | end | out of spec | first out | back in |"
            " kg | tablets |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        horizon_min = s.steps * twin.dt_s / 60.0
        open_tags = []
        for r in rows.itertuples():
            at_least = ">= " if r.open_at_end else ""  # cut off at the horizon
            back_in = "still out at the end" if r.open_at_end else _min(r.last_back_min)
            lines.append(
                f"| {r.tag} | {r.unit} | {r.low:g}-{r.high:g} | {r.start:.4g} | {r.min:.4g} | "
                f"{r.max:.4g} | {r.end:.4g} | {at_least}{r.out_of_spec_s:g} s | "
                f"{_min(r.first_out_min)} | {back_in} | {at_least}{r.out_of_spec_kg:.3g} | "
                f"{at_least}{r.out_of_spec_tablets:.0f} |"
            )
            if r.open_at_end:
                open_tags.append(r.tag)
        if open_tags:
            lines += ["", f"Still out of spec when the {horizon_min:g} min horizon ends: "
                      f"{', '.join(open_tags)}; their out-of-spec time, kg and tablets are "
                      f"lower bounds (a longer `duration_min` shows the rest)."]  # fmt: skip
        if result.rule is not None:
            start, end = rule.window(*result.disturbance_s)
            horizon_note = (f" (judged up to the {horizon_min:g} min horizon)"
                            if end > horizon_min * 60.0 else "")  # fmt: skip
            lines += ["", f"Diversion rule (disturbance start + {rule.delay_s:g} s to its end + "
                      f"{rule.margin_s:g} s = {start / 60:g}-{end / 60:g} min) "
                      f"{result.rule.verdict} the {tag} windows{horizon_note}: missed "
                      f"{result.rule.missed_before_s:g} s before, "
                      f"{result.rule.missed_after_s:g} s after; {result.rule.extra_s:g} s of "
                      f"in-spec material diverted."]  # fmt: skip
        for feeder, t_s in result.inputs.hopper_empty_s.items():
            lines += ["", f"Warning: the {feeder} hopper runs empty at {t_s / 60:g} min."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _min(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:g} min"


def _raw_scenarios(config: dict) -> dict[str, dict]:
    """`run` (names in configs/scenarios/ or paths to YAML files) -> {path: content}.

    Raises:
        ConfigError: an empty list or a file that does not exist.
    """
    names = config.get("run") or []
    if isinstance(names, str):  # run=api_feeder_dip: one name, not its letters
        names = [names]
    if not names:
        raise ConfigError("run: list at least one scenario (a name in configs/scenarios/)")
    found = {}
    for name in names:
        path = Path(name) if str(name).endswith((".yaml", ".yml")) else (
            config_dir() / "scenarios" / f"{name}.yaml")  # fmt: skip
        if not path.is_file():
            known = sorted(p.stem for p in (config_dir() / "scenarios").glob("*.yaml"))
            raise ConfigError(f"run: no scenario file {path}; known: {', '.join(known)}")
        found[str(path)] = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return found


def _log(config: dict, twin: ScenarioTwin, results: list[ScenarioResult], summary: pd.DataFrame,
         out: Path) -> None:  # fmt: skip
    mlflow.set_experiment(str(config["tracking"]["experiment_name"]))
    with mlflow.start_run(run_name=f"scenario-{out.name}"):
        mlflow.set_tags({"twin.stage": "scenario", "twin.source": twin.source,
                         "git.commit": git_commit()})  # fmt: skip
        mlflow.log_params({"scenarios": [r.scenario.name for r in results],
                           "diversion.tag": config["diversion"]["tag"],
                           "diversion.rule": config["diversion"]["rule"]})  # fmt: skip
        for r in summary.itertuples():
            prefix = f"{r.scenario}/{r.tag}"
            metrics = {"min": r.min, "max": r.max, "out_of_spec_s": r.out_of_spec_s,
                       "out_of_spec_tablets": r.out_of_spec_tablets}  # fmt: skip
            mlflow.log_metrics({f"{prefix}/{name}": v for name, v in metrics.items()})
        for result in results:
            if result.rule is not None and not result.rule.undetermined:
                mlflow.log_metric(f"{result.scenario.name}/rule_covers", float(result.rule.covered))
            for suffix in ("csv", "png"):
                mlflow.log_artifact(str(out / f"{result.scenario.name}.{suffix}"), "scenarios")
        mlflow.log_artifact(str(out / "scenarios.csv"))
        mlflow.log_artifact(str(out / "scenarios.md"))
