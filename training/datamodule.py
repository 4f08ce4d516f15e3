"""The prepared dataset as a LightningDataModule: what `twin train` hands to the Trainer.

It opens and verifies the dataset (dataset.PreparedDataset), loads the splits a stage needs,
and serves windows.Window batches: random windows of the train runs (RandomWindowSampler,
seeded per epoch) and deterministic windows of the val and test runs (SequentialWindows).
A model reads its sizes, tag order and normalisation statistics from here before training,
so it can be built, and its predictions denormalised, in the manifest's units and order.
"""

import logging
import math
import secrets
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from hybrid_twin import ConfigError
from hybrid_twin.errors import config_bool
from training.dataset import DatasetError, Normalisation, PreparedDataset, RunTensors
from training.windows import RandomWindowSampler, SequentialWindows, TrajectoryWindows, Window

log = logging.getLogger(__name__)
# The evaluation splits each Lightning stage needs ("predict" needs none).
_EVAL_SPLITS_OF_STAGE = {
    "fit": ("val",),
    "validate": ("val",),
    "test": ("test",),
    None: ("val", "test"),
}
# Splits model selection (val/loss, the `monitor` sweeps minimise) may see: the test runs are
# held out of training and model selection (docs/evaluation.md).
VAL_SPLITS = ("val", "train")


class ShardedEvalWindows(Dataset):
    """One DDP process's share of the eval windows: rows rank, rank + world, ... of `windows`,
    padded to the same length on every process (DDP wants equal batch counts) with a window
    whose mask is all False, which adds nothing to the masked sums validation pools. Lightning's
    DistributedSampler pads by repeating windows instead, counting them twice."""

    def __init__(self, windows: Dataset, rank: int, world: int) -> None:
        self.windows, self.rank, self.world = windows, rank, world

    def __len__(self) -> int:
        return math.ceil(len(self.windows) / self.world)

    def __getitem__(self, index: int) -> Window:
        row = self.rank + index * self.world
        if row < len(self.windows):
            return self.windows[row]
        padding = self.windows[0]
        return padding._replace(mask=torch.zeros_like(padding.mask))


def _require(name: str, value: object, minimum: int, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        none = " or null" if allow_none else ""
        raise ValueError(f"CDCDataModule: {name} must be an int >= {minimum}{none}, got {value!r}")


class CDCDataModule(LightningDataModule):
    """Training windows of a prepared CDC-line dataset (docs/data_contracts.md, section 3).

    Batches are `windows.Window` tuples: u (batch, T, n_inputs), y and mask
    (batch, T, n_measurements), past_u / past_y / past_mask with P rows, time_s (batch, T),
    t0 and run_index (batch,). u and y are normalised with the train statistics
    (`normalisation`); data tensors use torch's default dtype at `setup` time.

    Args:
        path: prepared dataset folder (holding manifest.json).
        window_steps: T, grid rows predicted per window (T * dt_s seconds).
        past_steps: P, grid rows before each window for the initial-state estimate.
        batch_size: windows per batch.
        windows_per_epoch: random train windows drawn per epoch.
        num_workers: DataLoader worker processes (0 loads in the main process).
        seed: seed of the train window draws; epoch e uses (seed, e). None draws one (logged
            and kept in the hyperparameters).
        eval_window_steps: length of the non-overlapping val/test windows; None = T.
        eval_full_runs: if True each val/test run is one window from row P to its end
            (batch size 1, since runs differ in length); eval_window_steps is then unused.
        val_split: the split Lightning validates on (val/loss, val/rmse): "val" by default;
            "train" simulates the training runs themselves (with eval_full_runs, each from
            row P to its end), for a plant with one estimation record and no run to spare.
        train_full_runs: if True each train window is a whole run from row P to its end
            (drawn windows_per_epoch times per epoch, one run per batch since runs differ in
            length; window_steps and batch_size then apply to no train window): simulation
            error over whole records, what `initial_state: learned` trains with.

    Raises:
        ValueError: a size below its minimum (checked here, before any file is read).
        ConfigError: a val_split other than val or train.
    """

    def __init__(
        self,
        path: str | Path,
        window_steps: int = 120,
        past_steps: int = 24,
        batch_size: int = 32,
        windows_per_epoch: int = 4096,
        num_workers: int = 0,
        seed: int = 0,
        eval_window_steps: int | None = None,
        eval_full_runs: bool = False,
        val_split: str = "val",
        train_full_runs: bool = False,
    ):
        super().__init__()
        for name, value, minimum in (
            ("window_steps", window_steps, 1),
            ("past_steps", past_steps, 1),
            ("batch_size", batch_size, 1),
            ("windows_per_epoch", windows_per_epoch, 1),
            ("num_workers", num_workers, 0),
        ):
            _require(name, value, minimum)
        _require("seed", seed, 0, allow_none=True)
        if seed is None:  # `seed=null`: unseeded, but the draw is recorded (hparams, MLflow)
            seed = secrets.randbelow(2**32)  # a seed `seed=` also takes
            log.info("datamodule.seed is null: train windows drawn with seed %d", seed)
        _require("eval_window_steps", eval_window_steps, 1, allow_none=True)
        for name, value in (("eval_full_runs", eval_full_runs),
                            ("train_full_runs", train_full_runs)):  # fmt: skip
            config_bool(value, f"datamodule.{name}")
        if val_split not in VAL_SPLITS:
            raise ConfigError(
                f"datamodule.val_split: expected one of {list(VAL_SPLITS)}, got {val_split!r} "
                f"(test runs are held out of training and model selection)"
            )
        path = str(path)  # a plain string in the saved hyperparameters and MLflow params
        self.save_hyperparameters()
        self._dataset: PreparedDataset | None = None
        self._runs: dict[str, list[RunTensors]] = {}
        self.train_windows: TrajectoryWindows | SequentialWindows | None = None
        self.train_sampler: RandomWindowSampler | None = None
        self.eval_windows: dict[str, SequentialWindows] = {}

    # -- what a model needs before training --------------------------------------------------

    @property
    def dataset(self) -> PreparedDataset:
        """The prepared dataset, opened (and every file's SHA-256 checked) on first use."""
        if self._dataset is None:
            self._dataset = PreparedDataset.open(self.hparams.path)
        return self._dataset

    @property
    def input_tags(self) -> list[str]:
        """Columns of u: the manifest's inputs, then its disturbances."""
        return self.dataset.input_tags

    @property
    def measurement_tags(self) -> list[str]:
        """Columns of y and mask: the manifest's measurements."""
        return self.dataset.measurement_tags

    @property
    def n_inputs(self) -> int:
        return len(self.input_tags)

    @property
    def n_measurements(self) -> int:
        return len(self.measurement_tags)

    @property
    def dt_s(self) -> float:
        """Grid step of every run, seconds."""
        return self.dataset.dt_s

    @property
    def manifest_sha256(self) -> str:
        """SHA-256 of manifest.json: the dataset's identity for MLflow tags."""
        return self.dataset.manifest_sha256

    @property
    def normalisation(self) -> Normalisation:
        """Train statistics, (n_inputs,) and (n_measurements,) tensors: x = x_norm * std + mean."""
        return self.dataset.normalisation()

    # -- Lightning hooks ---------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Load the splits of `stage`: fit -> train + val, validate -> val, test -> test.

        Raises:
            DatasetError: the dataset breaks its contract, or a split has no run long enough
                for one window (the message names the split and each run).
        """
        if stage in ("fit", None) and self.train_windows is None:
            self.train_windows = self._train_windows()
            self.train_sampler = RandomWindowSampler(
                len(self.train_windows), self.hparams.windows_per_epoch, self.hparams.seed
            )
        for split in _EVAL_SPLITS_OF_STAGE.get(stage, ()):
            self.sequential_windows(self.hparams.val_split if split == "val" else split)

    def train_dataloader(self) -> DataLoader:
        if self.train_windows is None:
            self.setup("fit")
        return DataLoader(
            self.train_windows,
            batch_size=1 if self.hparams.train_full_runs else self.hparams.batch_size,
            sampler=self.train_sampler,
            **self._worker_options(),
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.hparams.val_split)

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    # -- evaluation views --------------------------------------------------------------------

    def sequential_windows(self, split: str) -> SequentialWindows:
        """The deterministic evaluation windows of any split (val, test, fault), cached.

        Raises:
            DatasetError: unknown split, or no run of it is long enough for one window.
        """
        if split not in self.eval_windows:
            steps = (
                None
                if self.hparams.eval_full_runs
                else (self.hparams.eval_window_steps or self.hparams.window_steps)
            )
            try:
                windows = SequentialWindows(self._load(split), steps, self.hparams.past_steps)
            except DatasetError as exc:
                raise DatasetError(f"split {split!r} of {self.hparams.path}: {exc}") from exc
            self._report(split, windows.skipped)
            uncovered = sum(windows.uncovered_rows.values())
            if uncovered:
                log.info(
                    "%s: %d trailing rows shorter than one window are not evaluated: %s",
                    split,
                    uncovered,
                    windows.uncovered_rows,
                )
            self.eval_windows[split] = windows
        return self.eval_windows[split]

    def eval_dataloader(self, split: str) -> DataLoader:
        """Sequential, unshuffled batches of `sequential_windows(split)`; under DDP this
        process's share (`ShardedEvalWindows`), each window counted by one process once."""
        batch_size = 1 if self.hparams.eval_full_runs else self.hparams.batch_size
        windows = self.sequential_windows(split)
        world = self.trainer.world_size if self.trainer is not None else 1
        if world == 1:
            return DataLoader(windows, batch_size=batch_size, shuffle=False,
                              **self._worker_options())  # fmt: skip
        shard = ShardedEvalWindows(windows, self.trainer.global_rank, world)
        # Already a DistributedSampler (over this process's shard alone), so Lightning keeps
        # it rather than inject its own, which pads by repeating windows.
        sampler = DistributedSampler(shard, num_replicas=1, rank=0, shuffle=False)
        return DataLoader(shard, batch_size=batch_size, sampler=sampler,
                          **self._worker_options())  # fmt: skip

    # -- internals ---------------------------------------------------------------------------

    def _load(self, split: str) -> list[RunTensors]:
        if split not in self._runs:
            runs = self.dataset.load_split(split, torch.get_default_dtype())
            trimmed = {run.run_id: run.first_row for run in runs if run.first_row}
            if trimmed:
                log.info(
                    "%s: leading rows dropped until every input holds a value: %s", split, trimmed
                )
            self._runs[split] = runs
        return self._runs[split]

    def _train_windows(self) -> TrajectoryWindows | SequentialWindows:
        runs, past = self._load("train"), self.hparams.past_steps
        try:
            if self.hparams.train_full_runs:
                windows = SequentialWindows(runs, None, past)
            else:
                windows = TrajectoryWindows(runs, self.hparams.window_steps, past)
        except DatasetError as exc:
            raise DatasetError(f"split 'train' of {self.hparams.path}: {exc}") from exc
        self._report("train", windows.skipped)
        return windows

    @staticmethod
    def _report(split: str, skipped: list) -> None:
        if skipped:
            log.warning(
                "%s: %d run segments too short for one window are skipped: %s",
                split,
                len(skipped),
                "; ".join(f"{s.run_id}: {s.reason}" for s in skipped),
            )

    def _worker_options(self) -> dict:
        workers = self.hparams.num_workers
        return {"num_workers": workers, "persistent_workers": workers > 0}
