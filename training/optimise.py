"""`twin optimise`: settings that minimise API-content variability, checked on the plant.

Data flow: configs/optimise.yaml (scenario.yaml's twin and line, plus `optimise:` and
`plant_check:`) -> the twin (training/scenario.py's load_scenario_twin) -> OperatingProblem
and the gradient search through the twin (training/operating_point.py) -> the start and the
optimised settings under the same disturbance profiles on the simulated plant
(training/plant_check.py) -> `optimise.csv` (the search, per iteration), `optimise.md`
(settings, the twin's and the plant's objective before and after; printed too) and
`optimise.png` in the Hydra output folder, and an MLflow run `optimise-<time>`.
"""

import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from hybrid_twin import ConfigError
from hybrid_twin.errors import config_bool
from training.config_dir import config_dir
from training.dataset import PreparedDataset
from training.operating_point import (
    OperatingProblem,
    OptimisationResult,
    flow_factors,
    optimise_settings,
    parse_problem,
    twin_objective,
)
from training.plant_check import plant_objective, plant_runs
from training.scenario import load_scenario_twin
from training.scenario_spec import parse_line
from training.tracking import git_commit, tracking_uri


def run_optimise(cfg: DictConfig) -> dict[str, float]:
    """`twin optimise`: search on the twin, check on the plant; returns the measured numbers.

    Returns:
        {"twin_rms_start", "twin_rms_best", "plant_rms_start", "plant_rms_best"} (tag units;
        the plant's are NaN with plant_check.enabled false) and the settings, "best.<name>".

    Raises:
        ConfigError: a bad setting (the message names the key), no twin, no sim config.
    """
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))
    mlflow.set_tracking_uri(tracking_uri())
    config = OmegaConf.to_container(cfg, resolve=True)
    line = parse_line(config["line"])
    dataset = None if config["twin"]["file"] else PreparedDataset.open(config["data_path"])
    twin = load_scenario_twin(cfg, dataset)
    problem = parse_problem(config["optimise"], line, twin)
    check = config["plant_check"]
    if config_bool(check["enabled"], "plant_check.enabled"):  # refused before the search
        plant_runs(problem.start, problem, line, _sim(check["sim"]), str(config["speed_tag"]),
                   str(check["weight_tag"]), int(check["seed"]))  # fmt: skip
    result = optimise_settings(twin, line, problem)
    numbers = {
        "twin_rms_start": math.sqrt(result.objective_start),
        "twin_rms_best": math.sqrt(result.objective_best),
        "plant_rms_start": math.nan,
        "plant_rms_best": math.nan,
    }
    plant = None
    if check["enabled"]:
        plant = plant_objective(
            [result.start, result.best],
            problem,
            line,
            _sim(check["sim"]),
            str(config["speed_tag"]),
            str(check["weight_tag"]),
            int(check["seed"]),
        )
        numbers["plant_rms_start"], numbers["plant_rms_best"] = (math.sqrt(p[0]) for p in plant)
    numbers.update({f"best.{k}": v for k, v in result.best.items()})
    out = Path(HydraConfig.get().runtime.output_dir)
    names = list(problem.bounds)
    history = pd.DataFrame(result.history, columns=["iteration", "objective", *names])
    # the objective is a mean square (unit^2); the tables report its root
    history.insert(2, "rms", history["objective"] ** 0.5)
    history.to_csv(out / "optimise.csv", index=False)
    markdown = optimise_markdown(problem, result, numbers, twin.source)
    (out / "optimise.md").write_text(markdown)
    _plot(twin, line, problem, result, plant).savefig(out / "optimise.png")
    _log(config, twin.source, numbers, out)
    print(markdown)
    print(f"optimise: wrote {out}")
    return numbers


def optimise_markdown(
    problem: OperatingProblem, result: OptimisationResult, numbers: dict, source: str
) -> str:
    """The settings and the objective, twin and plant, at the start and the optimum."""
    lines = [
        f"twin: {source}",
        "",
        f"{len(problem.profiles)} {problem.feeder}-feeder disturbance profiles, "
        f"{problem.steps * problem.dt_s / 60:g} min each; objective: RMS deviation of "
        f"{problem.tag} from {problem.target:g} from {problem.from_row * problem.dt_s / 60:g}"
        " min on.",
        "",
        "| setting | bounds | start | optimised |",
        "|---|---|---|---|",
    ]
    for name, (low, high) in problem.bounds.items():
        lines.append(
            f"| {name} | {low:g}-{high:g} | {result.start[name]:.4g} | {result.best[name]:.4g} |"
        )
    lines += ["", "| RMS deviation | start | optimised | change |", "|---|---|---|---|"]
    for where in ("twin", "plant"):
        before, after = numbers[f"{where}_rms_start"], numbers[f"{where}_rms_best"]
        if not math.isnan(before):
            lines.append(
                f"| {where} | {before:.4g} | {after:.4g} | {100 * (after / before - 1):+.1f} % |"
            )
    return "\n".join(lines) + "\n"


def _sim(name: str) -> dict:
    """The plant_sim config `plant_check.sim` (under the config folder or a path)."""
    path = Path(name) if Path(name).is_absolute() else config_dir() / name
    if not path.is_file():
        raise ConfigError(f"plant_check.sim: no file {path}")
    return yaml.safe_load(path.read_text())


def _plot(twin, line, problem, result, plant) -> Figure:
    """Profile 0 at the start and the optimum: the twin's attribute (and the plant's truth);
    beside it the objective over the iterations."""
    factors = torch.as_tensor(flow_factors(problem, line, twin.dt_s)[:1], dtype=twin.dtype)
    figure = Figure(figsize=(11, 3.8))
    left, right = figure.subplots(1, 2, width_ratios=[2, 1])
    t_min = np.arange(problem.steps) * twin.dt_s / 60.0
    for (label, settings), colour in zip(
        (("start", result.start), ("optimised", result.best)), ("tab:red", "tab:blue"), strict=True
    ):
        values = torch.tensor(list(settings.values()), dtype=twin.dtype)
        with torch.no_grad():
            attribute = twin_objective(twin, line, problem, values, factors)[1][0].numpy()
        left.plot(t_min, attribute, color=colour, label=f"twin, {label}")
    if plant is not None:
        for (_, api), colour, label in zip(
            plant, ("tab:red", "tab:blue"), ("start", "optimised"), strict=True
        ):
            left.plot(
                np.arange(api.shape[1]) / 60.0,
                api[0],
                color=colour,
                alpha=0.5,
                lw=0.8,
                ls="--",
                label=f"plant truth, {label}",
            )
    left.set(xlabel="time, min", ylabel=problem.tag, title="disturbance profile 0")
    left.legend(fontsize=8)
    iterations = [h[0] for h in result.history]
    right.plot(iterations, [math.sqrt(h[1]) for h in result.history], color="k")
    right.set(xlabel="iteration", ylabel="RMS deviation (twin)", title="gradient search")
    figure.tight_layout()
    return figure


def _log(config: dict, source: str, numbers: dict, out: Path) -> None:
    mlflow.set_experiment(str(config["tracking"]["experiment_name"]))
    with mlflow.start_run(run_name=f"optimise-{out.name}"):
        mlflow.set_tags(
            {"twin.stage": "optimise", "twin.source": source, "git.commit": git_commit()}
        )
        mlflow.log_params({"optimise": config["optimise"], "plant_check": config["plant_check"]})
        mlflow.log_metrics({k: v for k, v in numbers.items() if not math.isnan(v)})
        for name in ("optimise.csv", "optimise.md", "optimise.png"):
            mlflow.log_artifact(str(out / name))
