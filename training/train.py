"""`twin train`: Hydra config -> datamodule + TwinLitModule -> Lightning fit -> MLflow run.

The entry point composes the typed pieces from configs/train.yaml (datamodule, flowsheet,
model, solver, optimizer, trainer), trains, and records one MLflow run: the resolved config
as params and `config.yaml`, the manifest hash and git commit as tags, train/val metrics per
epoch, and the trained model registered as `cdc-line-twin` (training/twin_pyfunc.py). It
returns the monitored validation metric, so `twin train -m ...` sweeps can compare runs.

Every epoch writes `<output dir>/checkpoints/last.ckpt` holding the MLflow run id;
`twin train resume_from=<that file> trainer.max_epochs=<more>` reopens the same run, trains on
from the checkpoint and registers a new version (docs/training.md, "Resuming a run").
"""

import logging
import os
import pickle
import secrets
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import mlflow
import numpy as np
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from mlflow.entities import LifecycleStage
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from omegaconf import DictConfig, OmegaConf

from hybrid_twin import ConfigError
from hybrid_twin.errors import config_number
from training.build import build_training
from training.datamodule import CDCDataModule
from training.dataset import DatasetError
from training.lit_module import check_resumed_schedule
from training.tracking import (
    flatten_params,
    git_commit,
    log_config,
    provenance_tags,
    tracking_uri,
)
from training.twin_model import TwinModel

log = logging.getLogger(__name__)

# trainer.precision values whose weights stay float32 (mixed: autocast around the networks)
TRAINING_PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "16", "bf16")
# Trainer arguments `run_train` passes itself; under trainer.* they were a duplicate keyword
TRAINER_ARGUMENTS_OF_TWIN = {"default_root_dir", "logger", "callbacks"}
CHECKPOINT_DIR = "checkpoints"  # under the Hydra output dir; `last.ckpt` is rewritten every epoch
RUN_ID_KEY = "mlflow_run_id"  # the MLflow run a checkpoint belongs to, inside the checkpoint
SEED_KEY = "twin_seed"  # the run's seed (drawn where `seed` was null), inside the checkpoint
# A seed Lightning and numpy accept: 0 <= seed < 2^32
SEED_LIMIT = 2**32
# `seed=null`: rank 0's drawn seed, inherited by the DDP workers Lightning starts in the fit
DRAWN_SEED_ENV = "TWIN_DRAWN_SEED"
# Config keys a resumed run may change: how it trains (epochs, devices, threads), not what.
RESUMABLE_KEYS = ("trainer.*", "num_threads", "lit.cuda_graphs", "solver.torch_compile")


VAL_PREFIX = "val/"  # the metrics validation logs (lit_module.py)


class MlflowEpochMetrics(Callback):
    """Logs every epoch-level metric Lightning collected to the active MLflow run (rank 0),
    with the epoch as the step, and writes that run's id into every checkpoint.

    val/* metrics are logged only for the epochs that validated: Lightning keeps the last
    values in `callback_metrics`, so an epoch without validation (check_val_every_n_epoch > 1)
    would re-log them as if they were new.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._val_metrics: dict[str, float] = {}  # this epoch's validation, not yet logged
        self.seed = seed

    def on_validation_end(self, trainer: Trainer, pl_module) -> None:
        if trainer.sanity_checking:  # a check of the code path, not a measurement
            return
        self._val_metrics = _metrics(trainer, lambda name: name.startswith(VAL_PREFIX))

    def on_train_epoch_end(self, trainer: Trainer, pl_module) -> None:
        metrics = _metrics(trainer, lambda name: not name.startswith(VAL_PREFIX))
        metrics.update(self._val_metrics)
        self._val_metrics = {}
        if trainer.is_global_zero and mlflow.active_run() is not None:
            mlflow.log_metrics(metrics, step=trainer.current_epoch)

    def on_save_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        run = mlflow.active_run()
        if trainer.is_global_zero and run is not None:  # rank 0 writes the file
            checkpoint[RUN_ID_KEY] = run.info.run_id
            checkpoint[SEED_KEY] = self.seed


def _metrics(trainer: Trainer, wanted: Callable[[str], bool]) -> dict[str, float]:
    return {name: float(v) for name, v in trainer.callback_metrics.items() if wanted(name)}


class Resume(NamedTuple):
    """A checkpoint to train on from: its path, MLflow run and the epochs it has done."""

    path: Path
    run_id: str
    epochs_done: int
    seed: int | None = None  # the run's seed; None from a checkpoint of before SEED_KEY


def run_train(cfg: DictConfig) -> float:
    """`twin train`: train one model and record it in MLflow.

    Args:
        cfg: the composed configs/train.yaml.

    Returns:
        The final value of `cfg.monitor` (val/loss by default), for Hydra sweepers.

    Raises:
        ConfigError: the dataset's tags and the flowsheet disagree, or a bad model setting;
            or `resume_from` cannot be resumed (see `read_checkpoint`, `_resume_tags`).
        FileNotFoundError: `resume_from` names no file.
        KeyError: `cfg.monitor` was never logged (the message lists the metrics that were).
    """
    check_run_settings(cfg)
    check_validation_cadence(cfg.trainer)
    resume = None
    if cfg.resume_from is not None:
        resume = read_checkpoint(Path(cfg.resume_from), cfg.trainer.max_epochs,
                                 str(cfg.lit.lr_schedule))  # fmt: skip
    seed_drawn = cfg.seed is None and (resume is None or resume.seed is None)
    if cfg.seed is None:
        # One seed for everything, logged as the param `seed`, so that the run can be
        # repeated with `seed=<it>`; a resumed run goes on with its own.
        cfg.seed = resume.seed if resume is not None else _drawn_seed()
    if cfg.seed is not None:  # seed 0 is a seed (STYLE.md)
        seed_everything(int(cfg.seed), workers=True)
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    ckpt_path = None if resume is None else str(resume.path)
    datamodule, model, lit = build_training(cfg, config)
    if cfg.tracking.plot_split:  # checked now, not after the fit: plots come before registering
        try:
            datamodule.dataset.run_ids(str(cfg.tracking.plot_split))
        except DatasetError as error:
            raise ConfigError(f"tracking.plot_split: {error}") from None
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    callbacks: list[Callback] = [MlflowEpochMetrics(cfg.seed)]
    if cfg.trainer.enable_checkpointing:
        callbacks.append(_last_checkpoint(output_dir))
    arguments = trainer_arguments(cfg.trainer)
    trainer = Trainer(
        **arguments,
        logger=False,
        callbacks=callbacks,
        default_root_dir=str(output_dir),
    )
    _point_ddp_workers_at_twin()
    if not trainer.is_global_zero:  # DDP worker: trains its shard, records nothing
        trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path)
        return float("nan")
    mlflow.set_tracking_uri(tracking_uri())
    with _mlflow_run(cfg, config, datamodule, output_dir, resume) as run:
        # what ran, beside the param asked for (trainer=gpu falls back to the CPU)
        mlflow.set_tag("trainer.accelerator_used", str(arguments.get("accelerator", "auto")))
        if seed_drawn and cfg.seed is not None:  # asked for null: the param is the drawn one
            mlflow.set_tag("seed.drawn", "true")
        trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path)
        if cfg.monitor not in trainer.callback_metrics:
            raise KeyError(
                f"monitor {cfg.monitor!r} was not logged; logged: "
                f"{sorted(trainer.callback_metrics)}"
            )
        metric = float(trainer.callback_metrics[cfg.monitor])
        if cfg.tracking.plot_split:
            from training.run_plots import log_run_plots

            log_run_plots(
                model.to("cpu"),
                datamodule.dataset,
                str(cfg.tracking.plot_split),
                int(cfg.datamodule.past_steps),
                output_dir / "plots",
            )
        # the last step: a run that fails before it registers no version, which "the latest
        # registered version" (export, evaluate-faults, serve) would then have picked up
        version = _register(cfg, model, datamodule, output_dir)
        print(
            f"train: run {run.info.run_id}, {cfg.monitor} = {metric:.4g}, registered "
            f"{cfg.tracking.registered_model_name} version {version}"
        )
    return metric


def _drawn_seed() -> int:
    """A seed for `seed=null`: drawn in [0, 2^32), or, in a DDP worker, rank 0's (the
    workers re-run `twin train` with the same overrides, and each drew its own)."""
    inherited = os.environ.get(DRAWN_SEED_ENV)
    if inherited is not None and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return int(inherited)
    seed = secrets.randbelow(SEED_LIMIT)
    os.environ[DRAWN_SEED_ENV] = str(seed)
    log.info("seed is null: drew seed %d (logged as the run's param `seed`)", seed)
    return seed


def trainer_arguments(trainer_cfg: DictConfig) -> dict:
    """`lightning.Trainer` keyword arguments from configs/trainer/<name>.yaml. `trainer=gpu`
    on a machine without a CUDA device falls back to the CPU with a warning (the GPU-only
    options already apply on CUDA only), rather than stop in Lightning's accelerator check;
    the run's tag `trainer.accelerator_used` says so."""
    arguments = instantiate(trainer_cfg, _convert_="all")
    if arguments.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        warnings.warn(
            f"trainer.accelerator={arguments['accelerator']}: no CUDA device here, training "
            "on the CPU instead (the compiled steps and CUDA graphs apply on CUDA only)",
            stacklevel=2,
        )
        arguments["accelerator"] = "cpu"
    return arguments


def check_run_settings(cfg: DictConfig) -> None:
    """The numbers a run needs before anything is built: Lightning and torch met a bad one
    late and without its name (`trainer.max_epochs=three`: a bare AssertionError after the
    build; `optimizer.lr=abc`: a TypeError inside AdamW; `max_epochs=0`: no val/loss).

    Raises:
        ConfigError: naming the key.
    """
    tracking = cfg.get("tracking") or {}
    counts = {"trainer.max_epochs": cfg.trainer.get("max_epochs"),
              "trainer.check_val_every_n_epoch": cfg.trainer.get("check_val_every_n_epoch"),
              "seed": cfg.get("seed"), "num_threads": cfg.get("num_threads"),
              "tracking.example_windows": tracking.get("example_windows", 1)}  # fmt: skip
    for key, value in counts.items():
        if value is None and key == "tracking.example_windows":  # the input example needs one
            raise ConfigError(f"{key}: expected a whole number >= 1, got null")
        if value is None:  # null: Lightning's default, a drawn seed, torch's threads
            continue
        number = config_number(value, key)
        low = 0 if key == "seed" else 1
        if number != int(number) or number < low:
            raise ConfigError(f"{key}: expected a whole number >= {low}, got {value!r}")
        if key == "seed" and number >= SEED_LIMIT:  # Lightning refused it, naming no key
            raise ConfigError(f"seed: expected a whole number below 2^32, got {value!r}")
    for key in ("lr", "weight_decay"):
        value = cfg.optimizer.get(key)
        if value is not None and config_number(value, f"optimizer.{key}") < 0:
            raise ConfigError(f"optimizer.{key}: expected a number >= 0, got {value!r}")
    precision = str(cfg.trainer.get("precision", 32))
    if precision not in TRAINING_PRECISIONS:  # bf16-true registered a model that cannot predict
        raise ConfigError(
            f"trainer.precision: expected one of {', '.join(TRAINING_PRECISIONS)}, got "
            f"{precision!r}: the solver, the unit models and the registered model are float32 "
            "(a mixed precision autocasts the networks only; model.fused_precision sets the "
            "fused network's products)"
        )
    reserved = sorted(set(cfg.trainer) & TRAINER_ARGUMENTS_OF_TWIN)
    if reserved:
        raise ConfigError(
            f"trainer.{reserved[0]}: set by `twin train` itself (the Hydra output folder, "
            "MLflow, the checkpoint and metric callbacks), not a trainer setting"
        )


def check_validation_cadence(trainer_cfg: DictConfig) -> None:
    """The last epoch must validate: its val/loss is what `twin train` returns and records
    with the model it registers.

    Raises:
        ConfigError: `check_val_every_n_epoch` that does not divide `max_epochs`.
    """
    every = trainer_cfg.get("check_val_every_n_epoch")
    epochs = trainer_cfg.get("max_epochs")
    if isinstance(every, int) and every > 1 and isinstance(epochs, int) and epochs % every:
        raise ConfigError(
            f"trainer.check_val_every_n_epoch={every} does not divide trainer.max_epochs="
            f"{epochs}: the last epoch would not be validated, and the registered model would "
            f"carry the val/loss of epoch {epochs // every * every - 1} (0-based); pick "
            f"max_epochs as a multiple of {every}"
        )


def read_checkpoint(path: Path, max_epochs: int | None, lr_schedule: str | None = None
                    ) -> Resume:  # fmt: skip
    """The checkpoint `resume_from` names, checked before anything trains or is recorded.

    Args:
        path: a `last.ckpt` that `twin train` wrote; max_epochs: `trainer.max_epochs`;
        lr_schedule: `lit.lr_schedule`, checked against the checkpoint's when given.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: not a Lightning checkpoint, no MLflow run id in it (not written by
            `twin train`), `trainer.max_epochs` does not go past the epochs it has done, or
            another lr schedule (`check_resumed_schedule`).
    """
    if not path.is_file():
        raise FileNotFoundError(f"resume_from: no checkpoint file {str(path)!r}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # what torch.load raises on a file that is not a checkpoint varies with its bytes
    # (a file cut short can also end in OSError EINVAL, from the zip reader's seek)
    except (pickle.UnpicklingError, RuntimeError, EOFError, IndexError, KeyError,
            ValueError, OSError) as error:  # fmt: skip
        raise ConfigError(
            f"resume_from: {str(path)!r} is not a Lightning checkpoint ({type(error).__name__})"
        ) from error
    if not isinstance(checkpoint, dict) or not checkpoint.get(RUN_ID_KEY):
        raise ConfigError(
            f"resume_from: checkpoint {str(path)!r} holds no MLflow run id ({RUN_ID_KEY!r}); "
            f"only checkpoints that `twin train` wrote can be resumed"
        )
    epochs_done = int(checkpoint.get("epoch", -1)) + 1  # saved at the end of epoch `epoch`
    if max_epochs is not None and 0 <= int(max_epochs) <= epochs_done:
        raise ConfigError(
            f"resume_from: checkpoint {str(path)!r} has trained {epochs_done} epochs; set "
            f"trainer.max_epochs above {epochs_done} (got {max_epochs}) to train on"
        )
    if lr_schedule is not None:  # refused in the fit, the run would be marked FAILED
        check_resumed_schedule(checkpoint, lr_schedule, max_epochs)
    seed = checkpoint.get(SEED_KEY)
    return Resume(path.resolve(), str(checkpoint[RUN_ID_KEY]), epochs_done,
                  None if seed is None else int(seed))  # fmt: skip


@contextmanager
def _mlflow_run(
    cfg: DictConfig,
    config: dict,
    datamodule: CDCDataModule,
    output_dir: Path,
    resume: Resume | None,
) -> Iterator[mlflow.ActiveRun]:
    """A new MLflow run with the config and provenance, or the resumed run, reopened."""
    checkpoint = str(output_dir / CHECKPOINT_DIR / "last.ckpt")
    if resume is None:
        mlflow.set_experiment(cfg.tracking.experiment_name)
        name, sweep_tags = _run_name_and_sweep(str(cfg.model.kind), output_dir)
        with mlflow.start_run(run_name=name) as run:
            log_config(config)
            mlflow.set_tags(provenance_tags(datamodule.manifest_sha256, cfg.model.kind))
            mlflow.set_tags(sweep_tags)
            if cfg.trainer.enable_checkpointing:
                mlflow.set_tag("checkpoint", checkpoint)
            yield run
        return
    tags = _resume_tags(resume, config, datamodule.manifest_sha256)
    if cfg.trainer.enable_checkpointing:
        tags["checkpoint"] = checkpoint  # the newest one to resume from
    status_before = mlflow.MlflowClient().get_run(resume.run_id).info.status
    n = tags["resume.count"]
    run = mlflow.start_run(run_id=resume.run_id)
    status = "FINISHED"
    try:
        mlflow.set_tags(tags)
        mlflow.log_text(yaml.safe_dump(dict(config), sort_keys=False), f"resume/{n}/config.yaml")
        yield run
        mlflow.set_tag(f"resume.{n}.outcome", "finished")
    except BaseException as error:
        # A resume that fails leaves the run as it found it: a finished run marked FAILED
        # hid its registered versions from `twin evaluate` and `twin export run_id=`.
        status = status_before if status_before in ("FINISHED", "KILLED") else "FAILED"
        # Lightning answers Ctrl-C in the fit with sys.exit(1)
        stopped = isinstance(error, KeyboardInterrupt | SystemExit)
        outcome = f"{'interrupted' if stopped else 'failed'}: {type(error).__name__}: {error}"
        mlflow.set_tag(f"resume.{n}.outcome", outcome[:500])
        raise
    finally:
        mlflow.end_run(status)


def _run_name_and_sweep(kind: str, output_dir: Path) -> tuple[str, dict[str, str]]:
    """The MLflow run's name, and for a job of a sweep (`-m`) the tags that find it:
    `sweep.dir`, `sweep.job` (Hydra's job number) and `sweep.overrides` (the job's own).

    A job's folder is named after its overrides, which a `/` (a path, `monitor=val/...`)
    split into nested folders; the name of the last of them alone made the run's name."""
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return f"{kind}-{output_dir.name}", {}
    sweep_dir = Path(hydra.sweep.dir)
    tags = {"sweep.dir": str(sweep_dir.resolve()), "sweep.job": str(hydra.job.num),
            "sweep.overrides": ",".join(hydra.overrides.task)}  # fmt: skip
    return f"{kind}-{sweep_dir.name}-{hydra.job.num}", tags


def _resume_tags(resume: Resume, config: dict, manifest_sha256: str) -> dict[str, str]:
    """Tags recording resume number n of a run: `resume.<n>.checkpoint`, `.epoch`,
    `.git.commit`, and `resume.<n>.<key>` = the new value of each changed resumable key.

    The run's params stay those it started with (MLflow cannot change a param).

    Raises:
        ConfigError: the run is not in the tracking store (or deleted), the dataset changed,
            or the config changes a key other than RESUMABLE_KEYS and resume_from.
    """
    try:
        run = mlflow.MlflowClient().get_run(resume.run_id)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        raise ConfigError(
            f"resume_from: checkpoint {str(resume.path)!r} belongs to MLflow run "
            f"{resume.run_id!r}, which is not in the tracking store {tracking_uri()!r}"
        ) from error
    if run.info.lifecycle_stage == LifecycleStage.DELETED:
        raise ConfigError(
            f"resume_from: MLflow run {resume.run_id!r} of checkpoint {str(resume.path)!r} "
            f"is deleted in {tracking_uri()!r}"
        )
    logged = run.data.tags.get("data.manifest_sha256")
    if logged is not None and logged != manifest_sha256:
        raise ConfigError(
            f"resume_from: run {resume.run_id!r} trained on a dataset with manifest SHA-256 "
            f"{logged}, datamodule.path now has {manifest_sha256}"
        )
    n = int(run.data.tags.get("resume.count", "0")) + 1
    tags = {
        "resume.count": str(n),
        f"resume.{n}.checkpoint": str(resume.path),
        f"resume.{n}.epoch": str(resume.epochs_done),
        f"resume.{n}.git.commit": git_commit(),
    }
    params = run.data.params
    flat = flatten_params(config)
    # A key the run had and the config now lacks (`~lit.theta_only_epochs`) falls back to
    # its default: a change like any other. trainer=ddp turns `trainer.strategy: auto` into
    # trainer.strategy._target_ and more: the keys it adds are new values, the one they
    # replace is unset.
    changed = {key: value for key, value in flat.items()
               if key != "resume_from" and params.get(key) != value}  # fmt: skip
    changed.update({key: "(unset)" for key in params if key not in flat})
    # A key the run never had is one a newer version of the code added, at the value it
    # had before it was a key: recorded, not refused.
    refused = [f"{k}: {params.get(k, '(unset)')} -> {v}" for k, v in changed.items()
               if k in params and not _may_change(k)]  # fmt: skip
    if refused:
        raise ConfigError(
            f"resume_from: run {resume.run_id!r} was trained with other settings; a resumed "
            f"run may change only {', '.join(RESUMABLE_KEYS)}. Changed: {'; '.join(refused)}"
        )
    tags.update({f"resume.{n}.{key}": value for key, value in changed.items()})
    return tags


def _may_change(key: str) -> bool:
    return key.startswith("trainer.") or key in RESUMABLE_KEYS


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
    windows = datamodule.sequential_windows(datamodule.hparams.val_split)
    items = [windows[i] for i in range(min(n_windows, len(windows)))]
    # Whole-run windows (eval_full_runs) differ in length: the example keeps the shortest's.
    steps = min(w.u.shape[0] for w in items)
    u_mean, u_std, y_mean, y_std = datamodule.normalisation
    past_u = torch.stack([w.past_u for w in items]) * u_std + u_mean
    past_y = torch.stack([w.past_y for w in items]) * y_std + y_mean
    past_y = torch.where(torch.stack([w.past_mask for w in items]), past_y, float("nan"))
    u = torch.stack([w.u[:steps] for w in items]) * u_std + u_mean
    return {
        name: t.to(torch.float32).numpy()
        for name, t in (("past_u", past_u), ("past_y", past_y), ("u", u))
    }


def _last_checkpoint(output_dir: Path) -> ModelCheckpoint:
    """Writes `<output_dir>/checkpoints/last.ckpt` at the end of every epoch (rank 0)."""
    return ModelCheckpoint(
        dirpath=output_dir / CHECKPOINT_DIR,
        filename="last",
        save_top_k=1,  # no monitor: keeps only the newest, here always the same file
        enable_version_counter=False,
        # every epoch, validated or not (by default Lightning saves after validation only
        # once check_val_every_n_epoch > 1)
        save_on_train_epoch_end=True,
    )


def _point_ddp_workers_at_twin() -> None:
    """Lightning starts DDP workers by re-running sys.argv; cli.py rewrote it to "twin train",
    which is no file, so point it back at the `twin` script with the stage as first argument."""
    script = shutil.which("twin") or str(Path(sys.executable).with_name("twin"))
    if sys.argv and sys.argv[0].startswith("twin "):
        sys.argv = [script, sys.argv[0].split(" ", 1)[1], *sys.argv[1:]]
