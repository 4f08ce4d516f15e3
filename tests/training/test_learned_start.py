"""`initial_state: learned`: records that all begin from one unknown state (the Cascaded Tanks
rig) start from a learned state at their first row, trained on whole records.

Real data: the first 120 rows of both Cascaded Tanks records (`tiny_tanks_dataset`).
"""

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hybrid_twin import ConfigError
from tests.tolerances import tol
from training.build import build_training
from training.config_dir import SHIPPED_CONFIG_DIR

pytestmark = pytest.mark.usefixtures("one_thread")
PAST = 4
LEARNED = ["initial_state=learned", "datamodule.train_full_runs=true"]  # as the experiment
WINDOWED = ["initial_state=burn_in", "datamodule.train_full_runs=false"]


def _build(dataset, *overrides: str) -> tuple:
    """What `twin train experiment=cascaded_tanks` builds before training (training/build.py)."""
    with initialize_config_dir(str(SHIPPED_CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=cascaded_tanks",
                f"datamodule.path={dataset}",
                f"datamodule.past_steps={PAST}",
                "datamodule.windows_per_epoch=3",
                "solver.torch_compile=cuda",  # eager steps on CPU: no compile per test
                *overrides,
            ],
        )
    return build_training(cfg, OmegaConf.to_container(cfg, resolve=True))


def _whole_run(datamodule):
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def test_a_learned_start_with_windows_inside_runs_is_a_config_error(tiny_tanks_dataset):
    with pytest.raises(ConfigError, match="windows must be whole runs.*train_full_runs=true"):
        _build(tiny_tanks_dataset, *LEARNED, "datamodule.train_full_runs=false")
    with pytest.raises(ConfigError, match="datamodule.eval_full_runs=true"):
        _build(tiny_tanks_dataset, *LEARNED, "datamodule.eval_full_runs=false")


def test_whole_run_train_windows_start_after_the_past_rows_and_run_to_the_end(
    tiny_tanks_dataset,
):
    datamodule, _, _ = _build(tiny_tanks_dataset, *LEARNED)
    batches = list(datamodule.train_dataloader())
    assert len(batches) == 3  # windows_per_epoch draws of the one estimation record
    for batch in batches:
        assert batch.u.shape[:2] == (1, 120 - PAST)
        assert batch.past_u.shape[:2] == (1, PAST)
        assert int(batch.t0) == PAST


def test_the_start_is_the_learned_state_integrated_through_the_past_rows(
    tiny_tanks_dataset, float64
):
    datamodule, model, _ = _build(tiny_tanks_dataset, *LEARNED, "model=mechanistic")
    model = model.double()
    batch = _whole_run(datamodule)
    past_u, past_y = batch.past_u.double(), batch.past_y.double()
    no_sample = torch.zeros_like(batch.past_mask)  # nothing reset from the measurement
    with torch.no_grad():
        model.start_offset.copy_(torch.tensor([0.7, -0.4]))
        x = model.initial_state(past_u, past_y, no_sample)
        normaliser = model.field.state_normaliser
        start = normaliser.mean + normaliser.std * torch.tensor([0.7, -0.4])
        # The same start through the solver, one past interval at a time.
        state = start.unsqueeze(0)
        inputs = model.model_inputs(past_u)
        for k in range(PAST):
            state = model.solver(state, inputs[:, k : k + 1], model.dt_s).states[:, -1]
    torch.testing.assert_close(x, state, rtol=1e-12, atol=1e-12)
    # The lower level is measured: with samples in the past rows it starts at the last one.
    x_reset = model.initial_state(past_u, past_y, batch.past_mask)
    level = past_y[0, -1, 0] * model.y_std[0] + model.y_mean[0]
    torch.testing.assert_close(x_reset[0, 1], level)
    torch.testing.assert_close(x_reset[0, 0], x[0, 0])


def test_loss_gradient_with_respect_to_the_learned_start_matches_finite_differences(
    tiny_tanks_dataset, float64
):
    datamodule, model, _ = _build(tiny_tanks_dataset, *LEARNED, "model=hybrid")
    model = model.double()
    batch = _whole_run(datamodule)
    args = (batch.past_u.double(), batch.past_y.double(), batch.past_mask, batch.u.double())
    y = batch.y.double()

    def loss() -> torch.Tensor:
        return (model(*args) - y).pow(2).mean()

    loss().backward()
    grad = model.start_offset.grad.clone()
    assert grad[0].abs() > 0  # the unmeasured upper level drives the whole record
    h = 1e-6
    for i in range(2):
        with torch.no_grad():
            model.start_offset[i] += h
            up = loss()
            model.start_offset[i] -= 2 * h
            down = loss()
            model.start_offset[i] += h
        torch.testing.assert_close(grad[i], (up - down) / (2 * h), rtol=1e-5, atol=1e-10)


def test_scripted_learned_start_twin_predicts_what_the_eager_one_does(tiny_tanks_dataset):
    datamodule, model, _ = _build(tiny_tanks_dataset, *LEARNED, "model=hybrid")
    batch = _whole_run(datamodule)
    with torch.no_grad():
        model.start_offset.copy_(torch.tensor([0.5, 0.2]))
    scripted = torch.jit.script(model)
    args = (batch.past_u, batch.past_y, batch.past_mask, batch.u)
    eps = tol("scripted_vs_eager", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(*args), model(*args), rtol=eps, atol=eps)
    assert torch.equal(scripted.state_dict()["start_offset"], model.start_offset.detach())


def test_only_a_learned_start_adds_a_saved_parameter(tiny_tanks_dataset):
    _, learned, _ = _build(tiny_tanks_dataset, *LEARNED)
    _, burn_in, _ = _build(tiny_tanks_dataset, *WINDOWED)
    assert "start_offset" in dict(learned.named_parameters())
    assert "start_offset" not in burn_in.state_dict()  # earlier twins' state dicts still load
    assert set(learned.state_dict()) - set(burn_in.state_dict()) == {"start_offset"}
