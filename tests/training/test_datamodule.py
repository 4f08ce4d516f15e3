"""CDCDataModule: loaders, shapes, determinism, and its Hydra config (training/datamodule.py)."""

import inspect
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from hybrid_twin import ConfigError
from training.datamodule import CDCDataModule
from training.dataset import DatasetError
from training.windows import Window

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "datamodule" / "cdc_default.yaml"
P, T, BATCH = 4, 10, 8


def make_datamodule(path, **overrides) -> CDCDataModule:
    settings = dict(
        window_steps=T, past_steps=P, batch_size=BATCH, windows_per_epoch=20, num_workers=0, seed=0
    )
    return CDCDataModule(path, **{**settings, **overrides})


def test_exposes_sizes_tags_and_train_stats_before_setup(prepared):
    dm = make_datamodule(prepared.path)
    manifest = prepared.manifest
    assert dm.input_tags == manifest["inputs"] + manifest["disturbances"]
    assert dm.measurement_tags == manifest["measurements"]
    assert (dm.n_inputs, dm.n_measurements, dm.dt_s) == (3, 3, 5.0)
    stats = dm.normalisation
    nir = manifest["normalisation"]["NIR.API_CONC"]
    assert stats.y_mean[1].item() == pytest.approx(nir["mean"])
    assert stats.y_std[1].item() == pytest.approx(nir["std"])
    assert len(dm.manifest_sha256) == 64


def test_loaders_give_the_documented_shapes(prepared):
    dm = make_datamodule(prepared.path)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [batch.u.shape[0] for batch in batches] == [8, 8, 4]  # 20 windows per epoch
    batch = batches[0]
    assert isinstance(batch, Window)
    assert batch.u.shape == (BATCH, T, 3) and batch.u.dtype == torch.float32
    assert batch.y.shape == batch.mask.shape == (BATCH, T, 3) and batch.mask.dtype == torch.bool
    assert batch.past_u.shape == (BATCH, P, 3)
    assert batch.past_y.shape == batch.past_mask.shape == (BATCH, P, 3)
    assert batch.time_s.shape == (BATCH, T)
    assert batch.t0.shape == batch.run_index.shape == (BATCH,)
    val = next(iter(dm.val_dataloader()))
    assert val.u.shape == (4, T, 3)  # R004: 50 rows -> 4 windows of 10 after P = 4
    dm.setup("test")
    assert next(iter(dm.test_dataloader())).y.shape == (4, T, 3)


def test_train_windows_depend_only_on_seed_and_epoch(prepared):
    def t0s(dm, epoch):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return torch.cat([batch.t0 for batch in loader])

    a, b = make_datamodule(prepared.path), make_datamodule(prepared.path)
    assert torch.equal(t0s(a, 0), t0s(b, 0))
    assert not torch.equal(t0s(a, 0), t0s(a, 1))
    assert not torch.equal(t0s(a, 0), t0s(make_datamodule(prepared.path, seed=1), 0))


def test_worker_processes_draw_the_same_windows(prepared):
    def epoch_t0s(num_workers):
        dm = make_datamodule(prepared.path, num_workers=num_workers)
        return torch.cat([batch.t0 for batch in dm.train_dataloader()])

    assert torch.equal(epoch_t0s(0), epoch_t0s(2))


class _RecordingModule(pl.LightningModule):
    """Records the windows each training epoch sees; a minimal model around one parameter."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch: Window, batch_idx: int):
        self.seen.setdefault(self.current_epoch, []).append(batch.t0)
        return ((batch.y * self.weight)[batch.mask] ** 2).sum()

    def validation_step(self, batch: Window, batch_idx: int):
        self.log("val_loss", ((batch.y * self.weight)[batch.mask] ** 2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


# Lightning 2.6's pytree helper builds torch's LeafSpec, which torch 2.13 deprecates; every
# Trainer.fit under torch 2.13 warns so, whatever the data module does.
@pytest.mark.filterwarnings(
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"
)
def test_trainer_sets_the_epoch_so_each_epoch_draws_new_windows(prepared):
    # Two workers: Lightning warns about fewer on machines with more than two cores.
    dm, model = make_datamodule(prepared.path, num_workers=2), _RecordingModule()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    windows = dm.train_windows
    for epoch in (0, 1):
        expected = torch.tensor([windows[k].t0 for k in dm.train_sampler.draws(epoch)])
        assert torch.equal(torch.cat(model.seen[epoch]), expected)
    assert not torch.equal(torch.cat(model.seen[0]), torch.cat(model.seen[1]))


def test_full_run_evaluation_batches_one_run_at_a_time(prepared):
    dm = make_datamodule(prepared.path, eval_full_runs=True)
    dm.setup("test")
    (batch,) = list(dm.test_dataloader())
    assert batch.u.shape == (1, 47 - P, 3)
    fault = list(dm.eval_dataloader("fault"))
    assert [b.u.shape for b in fault] == [(1, 30 - P, 3)]


def test_split_without_a_long_enough_run_names_the_split(prepared):
    dm = make_datamodule(prepared.path, eval_window_steps=60)
    with pytest.raises(DatasetError, match="split 'val' of .*R004: 50 usable rows < 64"):
        dm.setup("validate")


def test_sizes_below_their_minimum_are_refused_before_any_file_is_read(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        CDCDataModule(tmp_path / "nowhere", batch_size=0)
    with pytest.raises(ValueError, match="eval_window_steps must be an int >= 1 or null"):
        CDCDataModule(tmp_path / "nowhere", eval_window_steps=0)


def test_hydra_config_holds_exactly_the_constructor_arguments(prepared):
    cfg = OmegaConf.load(CONFIG)
    parameters = list(inspect.signature(CDCDataModule).parameters)
    assert list(cfg.keys()) == parameters
    dm = CDCDataModule(
        # seed is ${seed}, the run's: resolved by train.yaml, given here
        **{**OmegaConf.to_container(cfg), "path": str(prepared.path), "num_workers": 0, "seed": 0}
    )
    assert dm.hparams.window_steps == cfg.window_steps
    assert dm.hparams.path == str(prepared.path)


@pytest.mark.parametrize("split", ["test", "fault"])
def test_validating_on_a_held_out_split_is_refused_naming_the_key(tmp_path, split):
    with pytest.raises(ConfigError, match=f"datamodule.val_split: .*got '{split}'"):
        CDCDataModule(tmp_path / "nowhere", val_split=split)


def test_validating_on_the_train_runs_is_allowed(prepared):
    dm = make_datamodule(prepared.path, val_split="train", eval_full_runs=True)
    dm.setup("fit")
    assert dm.val_dataloader().dataset.run_ids == prepared.manifest["splits"]["train"]


def test_seed_null_draws_a_seed_and_keeps_it(prepared):
    dm = make_datamodule(prepared.path, seed=None)  # `seed=null` reaches it (was refused)
    assert isinstance(dm.hparams.seed, int) and dm.hparams.seed >= 0
    dm.setup("fit")
    assert dm.train_sampler.seed == dm.hparams.seed


def test_the_datamodule_seed_follows_the_runs_seed():
    cfg = OmegaConf.merge({"seed": 7}, {"datamodule": OmegaConf.load(CONFIG)})
    assert cfg.datamodule.seed == 7  # `twin train seed=7` draws other train windows


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ddp_shards_count_each_val_window_once(prepared, world):
    from training.datamodule import ShardedEvalWindows

    dm = make_datamodule(prepared.path)
    windows = dm.sequential_windows("val")
    shards = [ShardedEvalWindows(windows, rank, world) for rank in range(world)]
    assert len({len(shard) for shard in shards}) == 1  # equal batch counts on every process
    seen = [w for shard in shards for w in (shard[i] for i in range(len(shard)))]
    counted = [w for w in seen if w.mask.any()]
    # each window once (DistributedSampler would repeat some), the padding masked out
    assert sorted((int(w.run_index), int(w.t0)) for w in counted) == sorted(
        (int(windows[i].run_index), int(windows[i].t0)) for i in range(len(windows))
    )
    total = sum(int(w.mask.sum()) for w in seen)
    assert total == sum(int(windows[i].mask.sum()) for i in range(len(windows)))


def test_the_registered_example_takes_whole_runs_of_different_lengths(prepared):
    from training.train import example_input

    dm = make_datamodule(prepared.path, eval_full_runs=True, val_split="train")
    windows = dm.sequential_windows("train")
    lengths = sorted({windows[i].u.shape[0] for i in range(len(windows))})
    assert len(lengths) > 1  # the runs differ: torch.stack of them failed after training
    example = example_input(dm, len(windows))
    assert example["u"].shape[:2] == (len(windows), lengths[0])
