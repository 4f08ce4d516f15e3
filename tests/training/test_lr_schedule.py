"""`lit.lr_schedule`: the lr each epoch trains at, under a real Lightning Trainer.

The twin is the mechanistic one on the tiny dataset (2 steps of 4 windows per epoch, no
validation): the tests look at the optimiser's lr, not at what the model learns.
"""

import functools
import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from hybrid_twin import ConfigError
from tests.training.shipped import shipped_config
from training.datamodule import CDCDataModule
from training.lit_module import TwinLitModule
from training.twin_model import build_twin_model

LR = 1e-2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def datamodule(tiny_cdc_dataset) -> CDCDataModule:
    dm = CDCDataModule(
        tiny_cdc_dataset,
        window_steps=12,
        past_steps=6,
        batch_size=4,
        windows_per_epoch=8,
        num_workers=0,
        seed=0,
    )
    dm.setup("fit")
    return dm


def _lit(datamodule: CDCDataModule, lr_schedule: str) -> TwinLitModule:
    seed_everything(0)
    model = build_twin_model(
        shipped_config("flowsheet", "cdc_line"),
        shipped_config("model", "mechanistic"),
        {"name": "rk4", "n_substeps": 1},
        datamodule.input_tags,
        datamodule.measurement_tags,
        datamodule.normalisation,
        datamodule.dt_s,
        generator=torch.Generator().manual_seed(0),
    )
    optimizer = functools.partial(torch.optim.AdamW, lr=LR)
    return TwinLitModule(model, optimizer, datamodule.measurement_tags, lr_schedule=lr_schedule)


class EpochLr(Callback):
    """The lr of the optimiser's (only) parameter group as each training epoch starts."""

    def __init__(self) -> None:
        self.lr: dict[int, float] = {}

    def on_train_epoch_start(self, trainer: Trainer, pl_module) -> None:
        self.lr[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]


def _fit(lit, datamodule, max_epochs: int, callbacks=(), ckpt_path=None, **trainer_args) -> EpochLr:
    epoch_lr = EpochLr()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[epoch_lr, *callbacks],
        **trainer_args,
    )
    trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path)
    return epoch_lr


def _cosine_lr(epoch: int, epochs: int) -> float:
    # docs/training.md: full lr in the first epoch, 1 % of it in the last.
    return LR * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * epoch / (epochs - 1))))


def test_cosine_lr_of_every_epoch_is_the_closed_form(datamodule):
    lit = _lit(datamodule, "cosine")
    epoch_lr = _fit(lit, datamodule, max_epochs=5)
    assert sorted(epoch_lr.lr) == [0, 1, 2, 3, 4]
    for epoch, lr in epoch_lr.lr.items():
        assert lr == pytest.approx(_cosine_lr(epoch, 5), rel=1e-12), epoch
    assert epoch_lr.lr[0] == pytest.approx(LR, rel=1e-12)
    assert epoch_lr.lr[4] == pytest.approx(0.01 * LR, rel=1e-12)
    assert float(lit.trainer.callback_metrics["train/lr"]) == pytest.approx(0.01 * LR, rel=1e-6)


def test_no_schedule_trains_every_epoch_at_the_configured_lr(datamodule):
    lit = _lit(datamodule, "none")
    # The default hands Lightning the bare optimiser, as before schedules existed.
    assert isinstance(lit.configure_optimizers(), torch.optim.AdamW)
    epoch_lr = _fit(lit, datamodule, max_epochs=3)
    assert epoch_lr.lr == {0: LR, 1: LR, 2: LR}
    assert "train/lr" not in lit.trainer.callback_metrics


def test_an_unknown_schedule_is_a_config_error_naming_the_key(datamodule):
    with pytest.raises(ConfigError, match=r"lit\.lr_schedule.*'linear'"):
        _lit(datamodule, "linear")


def test_cosine_without_a_finite_epoch_count_is_a_config_error(datamodule):
    lit = _lit(datamodule, "cosine")
    with pytest.raises(ConfigError, match=r"lit\.lr_schedule=cosine.*trainer\.max_epochs"):
        _fit(lit, datamodule, max_epochs=-1, max_steps=2)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_resumed_cosine_run_goes_on_along_its_curve_and_keeps_its_length(datamodule, tmp_path):
    def every_epoch() -> list[Callback]:
        # The same checkpoint callback on resume, or Lightning warns (warnings fail tests).
        return [ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)]

    _fit(_lit(datamodule, "cosine"), datamodule, max_epochs=4, callbacks=every_epoch())
    after_two = tmp_path / "epoch=1.ckpt"

    def resume(lr_schedule: str, max_epochs: int) -> EpochLr:
        lit = _lit(datamodule, lr_schedule)
        return _fit(lit, datamodule, max_epochs, callbacks=every_epoch(), ckpt_path=after_two)

    resumed = resume("cosine", 4)
    assert sorted(resumed.lr) == [2, 3]
    for epoch, lr in resumed.lr.items():
        assert lr == pytest.approx(_cosine_lr(epoch, 4), rel=1e-12), epoch
    with pytest.raises(ConfigError, match=r"lit\.lr_schedule.*'cosine' over 4.*over 6"):
        resume("cosine", 6)
    with pytest.raises(ConfigError, match=r"lit\.lr_schedule.*'cosine'.*'none'"):
        resume("none", 6)
