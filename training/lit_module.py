"""TwinLitModule: the Lightning side of training a TwinModel (losses, stages, metrics).

Data flow: `CDCDataModule` batches (windows.Window) -> `TwinModel.simulate` -> masked MSE on
normalised measurements + a penalty on the residual network's output size -> AdamW. Per
epoch it logs train/loss, val/loss (the masked MSE pooled over every sampled val entry) and
the val RMSE of each tag in the tag's unit. It reads no files and knows no config format:
train.py builds it from plain values.

Two-stage schedule (hybrid only): for the first `theta_only_epochs` epochs the network
parameters phi are frozen and only the physical parameters theta (unit parameters and the
NIR calibration) learn; then theta and phi learn together.

Learning-rate schedule (`lr_schedule`): `none` keeps the optimiser's lr; `cosine` anneals it
once per epoch over `trainer.max_epochs`, from the configured lr down to COSINE_LR_FLOOR of it
on the last epoch.

On a CUDA device (one process) training steps run through CUDA graphs (`cuda_graphs`,
training/cuda_graphs.py): the same `loss_terms`, captured once per batch shape and replayed;
validation, CPU and DDP steps run eagerly.
"""

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from hybrid_twin import ConfigError, ZOHSolution, check_status
from hybrid_twin.errors import config_bool
from training.cuda_graphs import CapturedLoss, cuda_graphs_usable
from training.twin_model import TwinModel
from training.windows import Window


def masked_mse(y_hat: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Mean of (y_hat - y)^2 over the entries where mask is True; 0 if there are none.

    Args:
        y_hat, y: (batch, T, n_y) normalised; y may hold anything where mask is False
            (even NaN: masked entries are selected away, not multiplied by 0).
        mask: (batch, T, n_y) bool.

    Returns:
        A scalar; with an all-False mask it is 0 and its gradient is 0.
    """
    error = torch.where(mask, y_hat - y, torch.zeros_like(y_hat))
    count = mask.sum().clamp_min(1)
    return error.pow(2).sum() / count


def loss_terms(
    model: TwinModel,
    residual_penalty: float,
    past_u: Tensor,
    past_y: Tensor,
    past_mask: Tensor,
    u: Tensor,
    y: Tensor,
    mask: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The loss of one batch of windows, with no host synchronisation (CUDA-graph safe).

    Returns:
        (total loss, masked MSE, residual size) scalars, y_hat (batch, T, n_y) normalised and
        the solver status (batch,) as floats (0 = success).
    """
    y_hat, states, inputs, status = model.simulate(past_u, past_y, past_mask, u)
    fit = masked_mse(y_hat, y, mask)
    size = model.residual_size(states, inputs)
    return fit + residual_penalty * size, fit, size, y_hat, status.to(y_hat.dtype)


LR_SCHEDULES = ("none", "cosine")
COSINE_LR_FLOOR = 0.01  # the cosine schedule's last-epoch lr, as a fraction of optimizer.lr
LR_SCHEDULE_KEY = "lr_schedule"  # in checkpoints: {"name", "epochs"} the run was trained with


class CosineLrFactor:
    """The cosine schedule's lr / optimizer.lr in epoch e (0-based) of a run of `epochs`:

        floor + (1 - floor) * (1 + cos(pi * e / (epochs - 1))) / 2

    The first epoch trains at the full lr, the last at `floor` of it (so the weights a run ends
    with come from its smallest steps); one epoch trains at the full lr. A class rather than a
    closure so that LambdaLR's state_dict (and a checkpoint) can hold it.
    """

    def __init__(self, epochs: int, floor: float = COSINE_LR_FLOOR) -> None:
        self.epochs = int(epochs)
        self.floor = float(floor)

    def __call__(self, epoch: int) -> float:
        if self.epochs <= 1:
            return 1.0
        progress = min(epoch, self.epochs - 1) / (self.epochs - 1)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LossTerms(nn.Module):
    """`loss_terms` of a model as a module: what `CapturedLoss` captures."""

    def __init__(self, model: TwinModel, residual_penalty: float) -> None:
        super().__init__()
        self.model = model
        self.residual_penalty = residual_penalty

    def forward(self, *batch: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return loss_terms(self.model, self.residual_penalty, *batch)


class TwinLitModule(LightningModule):
    """Trains a TwinModel of any kind on CDCDataModule windows.

    Args:
        model: the twin (its field's kind decides which parameters exist).
        optimizer: builds the optimizer from parameters, e.g. a Hydra `_partial_` AdamW.
        measurement_tags: names of the y columns, for per-tag metric names.
        residual_penalty: weight of mean |g_nn|^2 (normalised network output) in the loss.
        theta_only_epochs: hybrid only: epochs that train theta alone before theta + phi.
        cuda_graphs: run training steps on a CUDA device through CUDA graphs (same loss and
            gradients, without the kernel-launch bound); ignored on CPU and under DDP.
        lr_schedule: `none` (the optimiser's lr throughout) or `cosine` (annealed per epoch
            over trainer.max_epochs to COSINE_LR_FLOOR x lr, see CosineLrFactor).

    Raises:
        ConfigError: a negative penalty or stage length, a two-stage schedule on a kind
            without both theta and phi (mechanistic, black_box), or an unknown lr_schedule.
    """

    def __init__(
        self,
        model: TwinModel,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        measurement_tags: Sequence[str],
        residual_penalty: float = 0.0,
        theta_only_epochs: int = 0,
        cuda_graphs: bool = True,
        lr_schedule: str = "none",
    ) -> None:
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"lit.lr_schedule: expected one of {list(LR_SCHEDULES)}, got {lr_schedule!r}"
            )
        if residual_penalty < 0 or theta_only_epochs < 0:
            raise ConfigError(
                f"lit: residual_penalty and theta_only_epochs must be >= 0, got "
                f"{residual_penalty} and {theta_only_epochs}"
            )
        if theta_only_epochs > 0 and model.field.kind != "hybrid":
            raise ConfigError(
                f"lit.theta_only_epochs: the two-stage schedule needs kind 'hybrid' "
                f"(theta and phi), got {model.field.kind!r}"
            )
        self.model = model
        self.optimizer_factory = optimizer
        self.measurement_tags = list(measurement_tags)
        self.residual_penalty = float(residual_penalty)
        self.theta_only_epochs = int(theta_only_epochs)
        self.cuda_graphs = config_bool(cuda_graphs, "lit.cuda_graphs")
        self.lr_schedule = lr_schedule
        # Not a submodule: the model's parameters must not appear twice in the state dict.
        self._captured: CapturedLoss | None = None
        if model.field.kind == "black_box":
            # The black box's dynamics ignore theta; it only places the initial steady state
            # and the readout h(x), which stay at their configured values (docs/training.md).
            for parameter in model.field.flowsheet.parameters():
                parameter.requires_grad_(False)
        self.register_buffer("_val_sq_error", torch.zeros(len(self.measurement_tags)))
        self.register_buffer("_val_count", torch.zeros(len(self.measurement_tags)))
        # val/loss's numerator, normalised; not persistent, so older checkpoints still load.
        self.register_buffer("_val_sq_error_normalised", torch.zeros(()), persistent=False)

    def phi_parameters(self) -> list[nn.Parameter]:
        """The networks' parameters: residual and readout correction (none: mechanistic)."""
        field = self.model.field
        return [
            p for net in (field.net, field.readout_net) if net is not None for p in net.parameters()
        ]

    def theta_parameters(self) -> list[nn.Parameter]:
        """Unit parameters and observation calibration: everything that is not phi."""
        phi = {id(p) for p in self.phi_parameters()}
        return [p for p in self.model.parameters() if id(p) not in phi]

    def set_stage(self, epoch: int) -> None:
        """Freeze phi while epoch < theta_only_epochs, unfreeze it afterwards."""
        train_phi = epoch >= self.theta_only_epochs
        for parameter in self.phi_parameters():
            parameter.requires_grad_(train_phi)

    def forward(self, past_u: Tensor, past_y: Tensor, past_mask: Tensor, u: Tensor) -> Tensor:
        """Normalised predictions, (batch, T, n_y); see `TwinModel.forward`."""
        return self.model(past_u, past_y, past_mask, u)

    def losses(self, batch: Window) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Loss terms of one batch.

        Args:
            batch: a Window batch as CDCDataModule serves it.

        Returns:
            (total loss, masked MSE, residual size) scalars and y_hat (batch, T, n_y),
            normalised.

        Raises:
            SolverError: a trajectory became NaN/inf (names the rows).
            FloatingPointError: the loss is not finite (names the tags predicted as NaN/inf),
                raised before a NaN gradient can corrupt the parameters.
        """
        tensors = (batch.past_u, batch.past_y, batch.past_mask, batch.u, batch.y, batch.mask)
        if self.cuda_graphs and self._single_step_process() and cuda_graphs_usable(batch.u):
            if self._captured is None:
                self._captured = CapturedLoss(lambda: LossTerms(self.model, self.residual_penalty))
            loss, fit, size, y_hat, status = self._captured(*tensors)
        else:
            loss, fit, size, y_hat, status = loss_terms(self.model, self.residual_penalty, *tensors)
        check_status_of(status, y_hat)
        if not bool(torch.isfinite(loss)):
            bad = ~torch.isfinite(y_hat).flatten(0, 1).all(dim=0)
            tags = [t for t, b in zip(self.measurement_tags, bad.tolist(), strict=True) if b]
            largest = y_hat.abs().max().item()
            cause = (f"non-finite predictions of {tags}" if tags else
                     f"every prediction is finite (largest |prediction| {largest:.3g}, "
                     "normalised): its squared error overflowed; the model diverges (an "
                     "unstable prior, or a learning rate too high)")  # fmt: skip
            raise FloatingPointError(
                f"training window: the loss is not finite (fit {fit.item()}, residual size "
                f"{size.item()}); {cause}"
            )
        return loss, fit, size, y_hat

    def _single_step_process(self) -> bool:
        """One process, one backward per optimiser step. DDP's gradient hooks and gradient
        accumulation stay eager: a replay writes its gradients into the same memory each
        time, which accumulation across backward passes would read back."""
        if self._trainer is None:
            return True
        return self.trainer.world_size == 1 and self.trainer.accumulate_grad_batches == 1

    def on_train_epoch_start(self) -> None:
        self.set_stage(self.current_epoch)
        if self.lr_schedule != "none":  # so a run's metrics show the lr each epoch trained at
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.log("train/lr", lr, on_step=False, on_epoch=True, sync_dist=True)

    def training_step(self, batch: Window, batch_idx: int) -> Tensor:
        loss, fit, size, _ = self.losses(batch)
        size_b = batch.u.shape[0]
        self.log(
            "train/loss",
            loss,
            on_step=False,
            on_epoch=True,
            batch_size=size_b,
            prog_bar=True,
            sync_dist=True,
        )
        self.log("train/mse", fit, on_step=False, on_epoch=True, batch_size=size_b, sync_dist=True)
        self.log(
            "train/residual_size",
            size,
            on_step=False,
            on_epoch=True,
            batch_size=size_b,
            sync_dist=True,
        )
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sq_error.zero_()
        self._val_count.zero_()
        self._val_sq_error_normalised.zero_()

    def validation_step(self, batch: Window, batch_idx: int) -> Tensor:
        loss, _, _, y_hat = self.losses(batch)
        error = torch.where(batch.mask, y_hat - batch.y, 0.0).detach()
        self._val_sq_error_normalised += error.pow(2).sum()
        self._val_sq_error += (error * self.model.y_std).pow(2).sum(dim=(0, 1))
        self._val_count += batch.mask.sum(dim=(0, 1))
        return loss

    def on_validation_epoch_end(self) -> None:
        """val/loss, the masked MSE (normalised) pooled over every sampled entry of the epoch,
        and val/rmse/<tag> in the tag's unit, summed over DDP processes before dividing: a
        mean of per-batch values would depend on how the windows fall into batches."""
        reduce = self.trainer.strategy.reduce
        sq_error = reduce(self._val_sq_error.clone(), reduce_op="sum")
        count = reduce(self._val_count.clone(), reduce_op="sum")
        sq_error_normalised = reduce(self._val_sq_error_normalised.clone(), reduce_op="sum")
        # As masked_mse: nothing sampled gives 0. Already summed over processes; sync_dist
        # only averages equal values.
        loss = sq_error_normalised / count.sum().clamp_min(1)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        for i, tag in enumerate(self.measurement_tags):
            if count[i] > 0:  # a tag never sampled in val has no RMSE, not a 0 one
                # Already summed over processes; sync_dist only averages equal values.
                self.log(f"val/rmse/{tag}", torch.sqrt(sq_error[i] / count[i]), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        """The optimiser, and with `lr_schedule` cosine its per-epoch LambdaLR.

        Raises:
            ConfigError: cosine with no finite trainer.max_epochs to anneal over.
        """
        # Frozen theta (black box) stays out; phi is in even if a stage freezes it later.
        optimizer = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        if self.lr_schedule == "none":
            return optimizer  # exactly what training did before schedules existed
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, CosineLrFactor(self._schedule_epochs())
        )
        # Stepped after each training epoch: epoch e trains at factor(e), whatever its batches.
        schedule = {"scheduler": scheduler, "interval": "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def _schedule_epochs(self) -> int | None:
        """The epochs the lr schedule spans (trainer.max_epochs); None for `none`.

        Raises:
            ConfigError: a schedule with trainer.max_epochs unset or -1 (endless training).
        """
        if self.lr_schedule == "none":
            return None
        epochs = self.trainer.max_epochs
        if epochs is None or epochs < 1:
            raise ConfigError(
                f"lit.lr_schedule={self.lr_schedule} anneals over trainer.max_epochs, which "
                f"must be a positive number of epochs, got {epochs}"
            )
        return int(epochs)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        epochs = self._schedule_epochs()
        checkpoint[LR_SCHEDULE_KEY] = {"name": self.lr_schedule, "epochs": epochs}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to resume with another lr schedule than the checkpoint's (`twin train`
        checks it before the run opens, `check_resumed_schedule`; this is the fit's own
        guard)."""
        if self._trainer is None:  # weights loaded outside a fit: no schedule goes on
            return
        check_resumed_schedule(checkpoint, self.lr_schedule, self.trainer.max_epochs)


def check_resumed_schedule(checkpoint: dict, lr_schedule: str, max_epochs: int | None) -> None:
    """A resumed run must go on with the checkpoint's lr schedule.

    Why: the restored scheduler continues the checkpoint's epoch count, so another schedule
    or, for cosine, another trainer.max_epochs would put the lr on a different curve from
    the next epoch on (a jump, not the annealing the run started). Checkpoints written
    before schedules existed trained with `none`.

    Raises:
        ConfigError: the schedule or (cosine) its number of epochs differs; names both.
    """
    saved = checkpoint.get(LR_SCHEDULE_KEY, {"name": "none", "epochs": None})
    epochs = None if lr_schedule == "none" or max_epochs is None else int(max_epochs)
    now = {"name": lr_schedule, "epochs": epochs}
    if saved != now:
        raise ConfigError(
            f"lit.lr_schedule: the checkpoint trained with schedule {saved['name']!r} over "
            f"{saved['epochs']} epochs (trainer.max_epochs), this run asks for "
            f"{now['name']!r} over {now['epochs']}; a resumed run keeps its lr schedule "
            f"(to train a cosine run longer, start a new run)"
        )


def check_status_of(status: Tensor, states: Tensor) -> None:
    """Raise SolverError when any trajectory's status is not success (after the step: it
    synchronises with the device)."""
    if bool((status != 0).any()):
        status = status.long()
        check_status(ZOHSolution(states, status, torch.zeros_like(status)), "training window")
