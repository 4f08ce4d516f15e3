"""`twin train`: Hydra config -> datamodule + TwinLitModule -> Lightning fit -> MLflow run.

The entry point composes the typed pieces from configs/train.yaml (datamodule, flowsheet,
model, solver, optimizer, trainer), trains, and records one MLflow run: the resolved config
as params and `config.yaml`, the manifest hash and git commit as tags, train/val metrics per
epoch, and the trained model registered as `cdc-line-twin` (training/twin_pyfunc.py). It
returns the monitored validation metric, so `twin train -m ...` sweeps can compare runs.
"""

import shutil
import sys
from pathlib import Path

import mlflow
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch import Callback, Trainer, seed_everything
from omegaconf import DictConfig, OmegaConf

from training.datamodule import CDCDataModule
from training.lit_module import TwinLitModule
from training.tracking import log_config, provenance_tags, tracking_uri
from training.twin_model import TwinModel, build_twin_model


class MlflowEpochMetrics(Callback):
    """Logs every epoch-level metric Lightning collected to the active MLflow run (rank 0),
    with the epoch as the step."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module) -> None:
        if not trainer.is_global_zero or mlflow.active_run() is None:
            return
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        mlflow.log_metrics(metrics, step=trainer.current_epoch)


def run_train(cfg: DictConfig) -> float:
    """`twin train`: train one model and record it in MLflow.

    Args:
        cfg: the composed configs/train.yaml.

    Returns:
        The final value of `cfg.monitor` (val/loss by default), for Hydra sweepers.

    Raises:
        ConfigError: the dataset's tags and the flowsheet disagree, or a bad model setting.
        KeyError: `cfg.monitor` was never logged (the message lists the metrics that were).
    """
    if cfg.seed is not None:  # seed 0 is a seed (STYLE.md)
        seed_everything(int(cfg.seed), workers=True)
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    datamodule, model, lit = build_training(cfg, config)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    trainer = Trainer(
        **instantiate(cfg.trainer, _convert_="all"),
        logger=False,
        callbacks=[MlflowEpochMetrics()],
        default_root_dir=str(output_dir),
    )
    _point_ddp_workers_at_twin()
    if not trainer.is_global_zero:  # DDP worker: trains its shard, records nothing
        trainer.fit(lit, datamodule=datamodule)
        return float("nan")
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(cfg.tracking.experiment_name)
    with mlflow.start_run(run_name=f"{cfg.model.kind}-{output_dir.name}") as run:
        log_config(config)
        mlflow.set_tags(provenance_tags(datamodule.manifest_sha256, cfg.model.kind))
        trainer.fit(lit, datamodule=datamodule)
        if cfg.monitor not in trainer.callback_metrics:
            raise KeyError(
                f"monitor {cfg.monitor!r} was not logged; logged: "
                f"{sorted(trainer.callback_metrics)}"
            )
        metric = float(trainer.callback_metrics[cfg.monitor])
        version = _register(cfg, model, datamodule, output_dir)
        print(
            f"train: run {run.info.run_id}, {cfg.monitor} = {metric:.4g}, registered "
            f"{cfg.tracking.registered_model_name} version {version}"
        )
    return metric


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


def _register(cfg: DictConfig, model: TwinModel, datamodule: CDCDataModule, workdir: Path) -> str:
    # mlflow.pyfunc warns on import (its own type hints): load it only when a run needs it.
    from training.twin_pyfunc import log_twin

    info = log_twin(
        model,
        example_input(datamodule, cfg.tracking.example_windows),
        {"input_tags": datamodule.input_tags, "measurement_tags": datamodule.measurement_tags},
        cfg.tracking.registered_model_name,
        workdir,
    )
    return str(info.registered_model_version)


def example_input(datamodule: CDCDataModule, n_windows: int) -> dict[str, np.ndarray]:
    """The first val windows in tag units, as the registered model takes them.

    Returns:
        {"past_u": (n, P, n_u), "past_y": (n, P, n_y) NaN where not sampled, "u": (n, T, n_u)}
        float32 arrays.
    """
    windows = datamodule.sequential_windows("val")
    items = [windows[i] for i in range(min(n_windows, len(windows)))]
    u_mean, u_std, y_mean, y_std = datamodule.normalisation
    past_u = torch.stack([w.past_u for w in items]) * u_std + u_mean
    past_y = torch.stack([w.past_y for w in items]) * y_std + y_mean
    past_y = torch.where(torch.stack([w.past_mask for w in items]), past_y, float("nan"))
    u = torch.stack([w.u for w in items]) * u_std + u_mean
    return {
        name: t.to(torch.float32).numpy()
        for name, t in (("past_u", past_u), ("past_y", past_y), ("u", u))
    }


def _point_ddp_workers_at_twin() -> None:
    """Lightning starts DDP workers by re-running sys.argv; cli.py rewrote it to "twin train",
    which is no file, so point it back at the `twin` script with the stage as first argument."""
    script = shutil.which("twin") or str(Path(sys.executable).with_name("twin"))
    if sys.argv and sys.argv[0].startswith("twin "):
        sys.argv = [script, sys.argv[0].split(" ", 1)[1], *sys.argv[1:]]
