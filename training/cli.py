"""The `twin` command: one subcommand per pipeline stage, each a Hydra application.

    twin <stage> [hydra overrides ...]      e.g. `twin prepare data.dt_s=2.0`
    twin <stage> --help                     the stage's config and override syntax
    twin <stage> --cfg job                  print the composed config without running

Each stage's root config is `configs/<stage>.yaml`; see training/config_dir.py for where the
configs are looked up.
"""

import itertools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from training.config_dir import config_dir


class Stage(NamedTuple):
    summary: str
    run: Callable[[DictConfig], object]


# What a user's input or settings can be refused with (module, class). Any of them is
# printed as its message alone; anything else is a bug of ours, with its traceback.
USER_ERRORS = (
    ("hybrid_twin.errors", "ConfigError"),
    ("hybrid_twin.monitoring", "MonitorDataError"),
    ("data_pipelines.errors", "DataValidationError"),
    ("data_pipelines.errors", "ConfigError"),
    ("training.dataset", "DatasetError"),
    ("training.export", "TwinFileError"),
    ("training.export", "ExportMismatchError"),
    ("serving.settings", "SettingsError"),
    ("serving.twin_file", "TwinFileError"),
    ("serving.twin_formats", "ProgramFileError"),
    ("serving.twin_store", "IncompatibleTwinError"),
)


def _is_user_error(error: BaseException) -> bool:
    # a module not imported raised nothing: checking only those loaded imports nothing
    kinds = [getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules]
    return isinstance(error, (FileNotFoundError, *kinds))


def _reporting(stage: str, run: Callable[[DictConfig], object]) -> Callable[[DictConfig], object]:
    """`run`, with a refused input or setting reported as `twin <stage>: error: <message>`
    and exit status 1, not the traceback Hydra prints above it (the message names the file,
    row, key or run). In a sweep the error goes to Hydra, which runs the other jobs on;
    HYDRA_FULL_ERROR=1 keeps the traceback."""

    def task(cfg: DictConfig) -> object:
        try:
            return run(cfg)
        except Exception as error:
            full = os.environ.get("HYDRA_FULL_ERROR") == "1"
            if full or not _is_user_error(error) or HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            print(f"twin {stage}: error: {error}", file=sys.stderr)
            raise SystemExit(1) from None

    return task


def _stages() -> dict[str, Stage]:
    from training import data_stages

    return {
        "generate": Stage("simulate the built-in CDC line and write a historian export",
                          data_stages.run_generate),
        "prepare": Stage("validate, align and split a historian export into a dataset",
                         data_stages.run_prepare),
        "train": Stage("train a twin (hybrid, mechanistic or black box), track it in MLflow",
                       _run_train),
        "evaluate": Stage("forecast held-out runs with each trained kind; RMSE table",
                          _run_evaluate),
        "export": Stage("one TorchScript twin file (forecast, EKF, fault detector), verified",
                        _run_export),
        "evaluate-faults": Stage("fault table per fault kind: the twin's detector vs PCA T^2/SPE",
                                 _run_evaluate_faults),
        "evaluate-diversion": Stage("fault runs: the twin's out-of-spec windows vs the simulator's "
                                    "truth", _run_evaluate_diversion),
        "serve": Stage("the prediction and monitoring service (FastAPI) for one twin file",
                       _run_serve),
        "scenario": Stage("what-if scenarios through a trained twin; out-of-spec diversion windows",
                          _run_scenario),
        "optimise": Stage("settings minimising API variability under feeder disturbances; "
                          "checked on the plant", _run_optimise),
    }


def _run_optimise(cfg: DictConfig) -> object:
    from training.optimise import run_optimise

    return run_optimise(cfg)


def _run_scenario(cfg: DictConfig) -> object:
    from training.scenario import run_scenario

    return run_scenario(cfg)


def _run_train(cfg: DictConfig) -> float:
    # Imported on use: Lightning and MLflow take seconds to load, which `twin --help`,
    # `generate` and `prepare` should not pay.
    from training.train import run_train

    return run_train(cfg)


def _run_evaluate(cfg: DictConfig) -> object:
    from training.evaluate import run_evaluate

    return run_evaluate(cfg)


def _run_export(cfg: DictConfig) -> object:
    from training.export import run_export

    return run_export(cfg)


def _run_evaluate_faults(cfg: DictConfig) -> object:
    from training.fault_evaluation import run_evaluate_faults

    return run_evaluate_faults(cfg)


def _run_evaluate_diversion(cfg: DictConfig) -> object:
    from training.diversion_truth import run_evaluate_diversion

    return run_evaluate_diversion(cfg)


def _run_serve(cfg: DictConfig) -> None:
    # serving imports nothing of training (DESIGN.md): it gets a plain mapping, not a DictConfig.
    from serving.server import run_serve

    return run_serve(OmegaConf.to_container(cfg, resolve=True))


def _usage(stages: dict[str, Stage]) -> str:
    width = max(len(name) for name in stages)
    lines = [
        "usage: twin <stage> [hydra overrides ...]",
        "",
        "Hybrid digital twin of a continuous pharmaceutical line: pipeline stages.",
        "",
        "stages:",
        *(f"  {name:<{width}}  {stage.summary}" for name, stage in stages.items()),
        "",
        "`twin <stage> --help` shows a stage's configuration and Hydra's override syntax.",
    ]
    return "\n".join(lines)


def _path_safe(text: str, limit: int = 120) -> str:
    """One folder name of `text`: `/` as `_`, cut to `limit` characters (the full overrides
    are the MLflow run's tag `sweep.overrides`)."""
    return str(text).replace("/", "_")[:limit]


_OWN_FOLDERS: dict[str, str] = {}


def _own_folder(path: str) -> str:
    """`path`, or `path-2`, `path-3`, ...: the first of them this process creates.

    The stages' folders are named to the second: two runs started in the same second shared
    one, and the later one's config, log and checkpoint replaced the first's. mkdir is the
    claim (one process wins each name); Hydra resolves the name more than once, so each
    process keeps its answer.
    """
    path = os.path.abspath(str(path))
    if path not in _OWN_FOLDERS:
        for n in itertools.count(1):
            candidate = path if n == 1 else f"{path}-{n}"
            try:
                Path(candidate).mkdir(parents=True)
            except FileExistsError:
                continue
            _OWN_FOLDERS[path] = candidate
            break
    return _OWN_FOLDERS[path]


def main(argv: list[str] | None = None) -> int:
    """Dispatch `twin <stage> ...` to the stage's Hydra application."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stages = _stages()
    if not argv:
        # No stage is a usage error (exit 2, as for an unknown stage): a script calling
        # `twin $STAGE` with an empty variable must not pass.
        print(_usage(stages), file=sys.stderr)
        return 2
    if argv[0] in {"-h", "--help", "help"}:
        print(_usage(stages))
        return 0
    name, overrides = argv[0], argv[1:]
    if name not in stages:
        print(f"twin: unknown stage {name!r}; valid stages: {', '.join(stages)}",
              file=sys.stderr)
        return 2
    # Hydra reads its overrides from sys.argv, so the stage name is taken off first.
    sys.argv = [f"twin {name}", *overrides]
    # configs/<stage>.yaml, "-" as "_" (evaluate-faults -> evaluate_faults.yaml).
    config_name = name.replace("-", "_")
    # configs/train.yaml names a sweep job's folder after its overrides: a `/` in one (a
    # path, monitor=val/loss) made nested folders of it, and many of them a name too long
    OmegaConf.register_new_resolver("path_safe", _path_safe, replace=True)
    OmegaConf.register_new_resolver("own_folder", _own_folder, replace=True)
    _OWN_FOLDERS.clear()  # a second `main` in this process is another run
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)
    app(_reporting(name, stages[name].run))()
    return 0


if __name__ == "__main__":
    sys.exit(main())
