"""Datamodule, twin and Lightning module from a composed `twin train` config.

Kept apart from training/train.py so that what builds a training run imports no MLflow:
benchmarks and the GPU checks (benchmarks/bench_training.py, bench_gpu_training.py) build
exactly what `twin train` trains without a tracking store.
"""

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from hybrid_twin import ConfigError
from training.datamodule import CDCDataModule
from training.lit_module import TwinLitModule
from training.twin_model import TwinModel, build_twin_model


def build_training(cfg: DictConfig, config: dict) -> tuple[CDCDataModule, TwinModel, TwinLitModule]:
    """Datamodule, model and Lightning module from the composed config.

    Args:
        cfg: the composed config (for `_target_` nodes); config: the same, resolved, plain.

    Raises:
        ConfigError: the dataset's tags and the flowsheet disagree, a bad model setting, or
            `initial_state: learned` with windows that do not start at a run's first row.
    """
    check_learned_start(config["initial_state"], config["datamodule"])
    datamodule = CDCDataModule(**config["datamodule"])
    generator = None if cfg.seed is None else torch.Generator().manual_seed(int(cfg.seed))
    model = build_twin_model(
        config["flowsheet"],
        config["model"],
        config["solver"],
        datamodule.input_tags,
        datamodule.measurement_tags,
        datamodule.normalisation,
        datamodule.dt_s,
        config["initial_state"],
        generator,
    )
    lit = TwinLitModule(
        model, instantiate(cfg.optimizer), datamodule.measurement_tags, **config["lit"]
    )
    return datamodule, model, lit


def check_learned_start(initial_state: str, datamodule: dict) -> None:
    """A learned start is the state at a run's first row: every window must begin there.

    Raises:
        ConfigError: `initial_state: learned` without whole-run train and evaluation windows.
    """
    if initial_state != "learned":
        return
    missing = [k for k in ("train_full_runs", "eval_full_runs") if not datamodule.get(k)]
    if missing:
        raise ConfigError(
            "initial_state: learned starts every window from one learned state at a run's "
            f"first row, so windows must be whole runs; set datamodule.{missing[0]}=true"
        )
