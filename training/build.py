"""Datamodule, twin and Lightning module from a composed `twin train` config.

Kept apart from training/train.py so that what builds a training run imports no MLflow:
benchmarks and the GPU checks (benchmarks/bench_training.py, bench_gpu_training.py) build
exactly what `twin train` trains without a tracking store.
"""

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from training.datamodule import CDCDataModule
from training.lit_module import TwinLitModule
from training.twin_model import TwinModel, build_twin_model


def build_training(cfg: DictConfig, config: dict) -> tuple[CDCDataModule, TwinModel, TwinLitModule]:
    """Datamodule, model and Lightning module from the composed config.

    Args:
        cfg: the composed config (for `_target_` nodes); config: the same, resolved, plain.

    Raises:
        ConfigError: the dataset's tags and the flowsheet disagree, or a bad model setting.
    """
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
