"""TwinModel and TwinLitModule: loss, initial state, stages, tag mapping, a few real steps."""

import functools
import math

import pytest
import torch

from hybrid_twin import ConfigError, fused_mlp
from tests.tolerances import tol
from tests.training.shipped import shipped_config
from training.datamodule import CDCDataModule
from training.lit_module import TwinLitModule, masked_mse
from training.twin_model import build_twin_model

WINDOW, PAST = 12, 6


pytestmark = pytest.mark.usefixtures("one_thread")


def _datamodule(path) -> CDCDataModule:
    dm = CDCDataModule(
        path,
        window_steps=WINDOW,
        past_steps=PAST,
        batch_size=4,
        windows_per_epoch=8,
        num_workers=0,
        seed=0,
    )
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def datamodule(tiny_cdc_dataset) -> CDCDataModule:
    return _datamodule(tiny_cdc_dataset)


@pytest.fixture(scope="module")
def batch(datamodule):
    return next(iter(datamodule.train_dataloader()))


def _model(datamodule, kind: str = "hybrid", seed: int = 0, solver=None, **model_overrides):
    model_config = {**shipped_config("model", kind), **model_overrides}
    return build_twin_model(
        shipped_config("flowsheet", "cdc_line"),
        model_config,
        solver or {"name": "rk4", "n_substeps": 1},
        datamodule.input_tags,
        datamodule.measurement_tags,
        datamodule.normalisation,
        datamodule.dt_s,
        generator=torch.Generator().manual_seed(seed),
    )


def _lit(model, lr: float = 1e-2, **options) -> TwinLitModule:
    optimizer = functools.partial(torch.optim.AdamW, lr=lr)
    return TwinLitModule(model, optimizer, ["tag"] * model.y_std.shape[0], **options)


def test_masked_loss_is_the_mean_over_sampled_entries_only():
    y_hat = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    y = torch.tensor([[[0.0, float("nan")], [1.0, 1e6]]])
    mask = torch.tensor([[[True, False], [True, False]]])
    # (1 - 0)^2 and (3 - 1)^2 over 2 sampled entries; the NaN and 1e6 are not sampled.
    assert masked_mse(y_hat, y, mask).item() == pytest.approx((1.0 + 4.0) / 2)


def test_masked_loss_with_nothing_sampled_is_zero_with_zero_gradient():
    y_hat = torch.ones(2, 3, 4, requires_grad=True)
    loss = masked_mse(y_hat, torch.full((2, 3, 4), float("nan")), torch.zeros(2, 3, 4, dtype=bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(y_hat.grad) == 0


def test_fresh_hybrid_predicts_exactly_what_the_mechanistic_model_predicts(datamodule, batch):
    hybrid, mechanistic = _model(datamodule, "hybrid"), _model(datamodule, "mechanistic")
    with torch.no_grad():
        args = (batch.past_u, batch.past_y, batch.past_mask, batch.u)
        torch.testing.assert_close(hybrid(*args), mechanistic(*args), rtol=0.0, atol=0.0)


def test_predictions_have_the_window_shape_and_are_finite(datamodule, batch):
    with torch.no_grad():
        y_hat = _model(datamodule, "black_box")(
            batch.past_u, batch.past_y, batch.past_mask, batch.u
        )
    assert y_hat.shape == (4, WINDOW, len(datamodule.measurement_tags))
    assert bool(torch.isfinite(y_hat).all())


def test_burn_in_from_constant_past_inputs_stays_at_the_steady_state(datamodule, batch, float64):
    model = _model(datamodule, "mechanistic").double()
    past_u = batch.past_u.double()[:, :1].expand(-1, PAST, -1).contiguous()
    past_y, past_mask = batch.past_y.double(), torch.zeros_like(batch.past_mask)
    x = model.initial_state(past_u, past_y, past_mask)
    steady = model.field.flowsheet.steady_state(
        model.model_inputs(past_u)[:, 0], model.field.theta()
    )
    reset = model.reset_from_u[:, 0]  # hopper masses come from the hopper load cells
    keep = [i for i in range(x.shape[1]) if i not in reset.tolist()]
    torch.testing.assert_close(x[:, keep], steady[:, keep], rtol=1e-9, atol=1e-9)
    hopper = (past_u[:, -1] * model.u_std + model.u_mean).index_select(1, model.reset_from_u[:, 1])
    torch.testing.assert_close(x.index_select(1, reset), hopper)


def test_states_a_measurement_reads_start_at_its_last_sample(datamodule, batch):
    model = _model(datamodule, "mechanistic")
    state, column = model.reset_from_y[0].tolist()  # BLEND.SPEED reads blender.speed_rpm
    past_mask = torch.zeros_like(batch.past_mask)
    past_mask[:, 2, column] = True  # only row 2 sampled: later rows must not count
    past_y = batch.past_y.clone()
    past_y[:, 2, column] = 0.25
    x = model.initial_state(batch.past_u, past_y, past_mask)
    expected = 0.25 * model.y_std[column] + model.y_mean[column]
    torch.testing.assert_close(x[:, state], expected.expand(x.shape[0]))


def test_hopper_states_follow_their_load_cell_through_the_window(datamodule, batch):
    # Refills are no model input: the hopper state must jump with its load cell (a
    # measured disturbance in u) or a long forecast starves the feeder.
    model = _model(datamodule, "mechanistic")
    state, column = model.reset_from_u[0].tolist()  # FEED_API.HOPPER_MASS
    u = batch.u.clone()
    u[:, 5:, column] += 2.0  # a refill between rows 4 and 5 (normalised units)
    with torch.no_grad():
        states = model.simulate(batch.past_u, batch.past_y, batch.past_mask, u)[1]
    measured = u[:, 1:, column] * model.u_std[column] + model.u_mean[column]
    torch.testing.assert_close(states[:, 1:, state], measured)


def test_readout_correction_scales_only_its_tag_within_the_bound(datamodule, batch):
    hybrid = _model(datamodule, "hybrid")
    mechanistic = _model(datamodule, "mechanistic")
    column = datamodule.measurement_tags.index("PRESS.COMP_FORCE")
    assert hybrid.readout_columns.tolist() == [column]
    with torch.no_grad():
        for parameter in hybrid.field.readout_net.parameters():
            parameter.uniform_(-2.0, 2.0, generator=torch.Generator().manual_seed(1))
        physical = [m.y_std * m(*batch[3:6], batch.u) + m.y_mean for m in (hybrid, mechanistic)]
    ratio = physical[0] / physical[1]
    others = [i for i in range(ratio.shape[-1]) if i != column]
    torch.testing.assert_close(ratio[..., others], torch.ones_like(ratio[..., others]))
    bound = math.exp(hybrid.field.readout_log_bound)
    assert bool((ratio[..., column] < bound).all() and (ratio[..., column] > 1 / bound).all())
    assert bool((ratio[..., column] - 1).abs().max() > 1e-3)


def test_a_readout_tag_the_dataset_does_not_measure_is_named(datamodule):
    with pytest.raises(ConfigError, match="model.readout: tag 'PRESS.HARDNESS' is not among"):
        _model(datamodule, "hybrid", readout=["PRESS.HARDNESS"])


def test_stage_one_trains_theta_only_and_stage_two_theta_and_phi(datamodule, batch):
    lit = _lit(
        _model(
            datamodule,
            "hybrid",
            residual={**shipped_config("model", "hybrid")["residual"], "zero_init": False},
        ),
        theta_only_epochs=1,
        residual_penalty=1e-3,
    )
    for epoch, phi_learns in ((0, False), (1, True)):
        lit.zero_grad(set_to_none=True)
        lit.set_stage(epoch)
        lit.losses(batch)[0].backward()
        theta_grads = [p.grad for p in lit.theta_parameters() if p.requires_grad]
        assert theta_grads and any(g is not None and bool(g.abs().sum() > 0) for g in theta_grads)
        phi_grads = [p.grad for p in lit.phi_parameters()]
        if phi_learns:
            assert all(g is not None for g in phi_grads)
            # the readout network is zero-initialised: only its last layer has a gradient yet
            for net in (lit.model.field.net, lit.model.field.readout_net):
                assert any(bool(p.grad.abs().sum() > 0) for p in net.parameters())
        else:
            assert all(g is None for g in phi_grads)


def test_two_stage_schedule_needs_the_hybrid_kind(datamodule):
    with pytest.raises(ConfigError, match="needs kind 'hybrid'.*'mechanistic'"):
        _lit(_model(datamodule, "mechanistic"), theta_only_epochs=2)


def test_black_box_freezes_theta_and_trains_its_network(datamodule):
    lit = _lit(_model(datamodule, "black_box"))
    assert not any(p.requires_grad for p in lit.model.field.flowsheet.parameters())
    optimised = {
        id(p) for group in lit.configure_optimizers().param_groups for p in group["params"]
    }
    assert {id(p) for p in lit.phi_parameters()} <= optimised
    assert not optimised & {id(p) for p in lit.model.field.flowsheet.parameters()}


@pytest.mark.parametrize("kind", ["hybrid", "mechanistic", "black_box"])
def test_a_few_training_steps_reduce_the_loss_on_a_fixed_batch(datamodule, batch, kind):
    # lr 1e-3: Adam moves every weight of the zero-initialised last layer by ~lr at once.
    lit = _lit(_model(datamodule, kind), lr=1e-3)
    optimizer = lit.configure_optimizers()
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = lit.losses(batch)[0]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_val_loss_is_the_masked_mse_pooled_over_every_sampled_entry(datamodule):
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    full, sparse = list(datamodule.val_dataloader())[:2]
    # Few samples in the second batch: a mean of per-batch MSEs would weigh them as much as
    # every sample of the first.
    sparse = sparse._replace(mask=sparse.mask & (torch.arange(WINDOW) < 2)[None, :, None])
    model = _model(datamodule, "mechanistic")
    lit = TwinLitModule(model, torch.optim.AdamW, datamodule.measurement_tags)
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    logged = trainer.validate(lit, DataLoader([full, sparse], batch_size=None), verbose=False)[0]
    squared, count, batch_mse = 0.0, 0, []
    with torch.no_grad():
        for b in (full, sparse):
            y_hat = model(b.past_u, b.past_y, b.past_mask, b.u)
            squared = squared + torch.where(b.mask, y_hat - b.y, 0.0).pow(2).sum(dim=(0, 1))
            count = count + b.mask.sum(dim=(0, 1))
            batch_mse.append(float(masked_mse(y_hat, b.y, b.mask)))
    pooled = float(squared.sum() / count.sum())
    assert abs(sum(batch_mse) / 2 - pooled) > 0.1 * pooled  # the batches do differ
    assert logged["val/loss"] == pytest.approx(pooled, rel=1e-5)
    rmse = torch.sqrt(squared * model.y_std.detach() ** 2 / count)
    for tag, expected, n in zip(datamodule.measurement_tags, rmse, count, strict=True):
        if n == 0:  # not sampled in these windows: no RMSE
            assert f"val/rmse/{tag}" not in logged
        else:
            assert logged[f"val/rmse/{tag}"] == pytest.approx(float(expected), rel=1e-5), tag


def test_scripted_twin_predicts_what_the_eager_twin_predicts(datamodule, batch):
    model = _model(
        datamodule,
        "hybrid",
        residual={**shipped_config("model", "hybrid")["residual"], "zero_init": False},
    )
    scripted = torch.jit.script(model)
    with torch.no_grad():
        args = (batch.past_u, batch.past_y, batch.past_mask, batch.u)
        eps = tol("scripted_vs_eager", torch.float32)
        torch.testing.assert_close(scripted(*args), model(*args), rtol=eps, atol=eps)


def test_a_flowsheet_input_missing_from_the_dataset_is_named(datamodule):
    inputs = [t for t in datamodule.input_tags if t != "BLEND.SPEED_SP"]
    u_mean, u_std, y_mean, y_std = datamodule.normalisation
    keep = [datamodule.input_tags.index(t) for t in inputs]
    with pytest.raises(ConfigError, match="'BLEND.SPEED_SP' is not among the dataset's u"):
        build_twin_model(
            shipped_config("flowsheet", "cdc_line"),
            shipped_config("model", "mechanistic"),
            {"name": "rk4"},
            inputs,
            datamodule.measurement_tags,
            (u_mean[keep], u_std[keep], y_mean, y_std),
            datamodule.dt_s,
        )


def test_a_dataset_tag_the_flowsheet_does_not_map_is_named(datamodule):
    measurements = [*datamodule.measurement_tags, "DRYER.MOISTURE"]
    with pytest.raises(ConfigError, match="dataset tag 'DRYER.MOISTURE'"):
        build_twin_model(
            shipped_config("flowsheet", "cdc_line"),
            shipped_config("model", "mechanistic"),
            {"name": "rk4"},
            datamodule.input_tags,
            measurements,
            datamodule.normalisation,
            datamodule.dt_s,
        )


def test_a_learned_state_driven_below_zero_still_reads_out_finite(datamodule, batch):
    model = _model(datamodule, "black_box")
    with torch.no_grad():
        model.field.net.layers[-1].bias.fill_(-10.0)  # g = -1: every state falls at full speed
        y_hat, states, _, _ = model.simulate(batch.past_u, batch.past_y, batch.past_mask, batch.u)
    weight = model.field.flowsheet.state_names.index("press.tablet_weight_mg")
    assert states[..., weight].min() < 0
    assert bool(torch.isfinite(y_hat).all())


def test_a_non_finite_loss_stops_training_before_the_update(datamodule, batch):
    lit = _lit(_model(datamodule, "mechanistic"))
    poisoned = batch._replace(y=torch.where(batch.mask, float("inf"), batch.y))
    with pytest.raises(FloatingPointError, match="loss is not finite"):
        lit.losses(poisoned)
    # finite predictions whose squared error overflows float32: said so, not "of []"
    far = batch._replace(y=torch.where(batch.mask, 1e30, batch.y))
    with pytest.raises(FloatingPointError, match=r"every prediction is finite \(largest "
                                                 r"\|prediction\| .*squared error overflowed"):
        lit.losses(far)


# CUDA-graph training steps (training/cuda_graphs.py). The GPU tests need a CUDA device: they
# are skipped on CPU-only machines (CI) and were run on a lent H100/H200 (benchmarks/
# gpu_training.md records the run).
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs); none here"
)


def _on(batch, device: str):
    return type(batch)(*(t.to(device) for t in batch))


def _random_hybrid(datamodule, solver=None, **residual_changes):
    residual = {**shipped_config("model", "hybrid")["residual"], "zero_init": False}
    return _model(datamodule, "hybrid", solver=solver, residual={**residual, **residual_changes})


def _step_results(lit, batch) -> dict:
    lit.zero_grad(set_to_none=True)
    loss, fit, size, y_hat = lit.losses(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in lit.model.named_parameters() if p.grad is not None}
    return {
        "loss": loss.detach(),
        "fit": fit.detach(),
        "size": size.detach(),
        "y_hat": y_hat.detach(),
        "grads": grads,
    }


def _assert_same_step(graphed: dict, eager: dict) -> None:
    # The replay runs the kernels the eager step runs; float32 reductions may be ordered
    # differently by the capture's library calls, hence 1e-5 and not 0.
    assert graphed["grads"].keys() == eager["grads"].keys()
    for key in ("loss", "fit", "size", "y_hat"):
        torch.testing.assert_close(graphed[key], eager[key], rtol=1e-5, atol=1e-6, msg=key)
    for name, grad in eager["grads"].items():
        scale = float(grad.abs().max()) + 1e-12
        torch.testing.assert_close(
            graphed["grads"][name] / scale, grad / scale, rtol=1e-4, atol=1e-5, msg=name
        )


def test_on_cpu_training_steps_stay_eager(datamodule, batch):
    lit = _lit(_model(datamodule, "mechanistic"), cuda_graphs=True)
    lit.losses(batch)[0].backward()
    assert lit._captured is None


def test_a_capture_refuses_cpu_tensors_naming_the_argument(datamodule, batch):
    from training.cuda_graphs import CapturedLoss
    from training.lit_module import LossTerms

    captured = CapturedLoss(lambda: LossTerms(_model(datamodule, "mechanistic"), 0.0))
    with pytest.raises(ValueError, match="argument 0 is on cpu; CUDA graphs need CUDA tensors"):
        captured(*batch)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["hybrid", "mechanistic", "black_box"])
def test_cuda_graph_steps_give_the_eager_loss_and_gradients(datamodule, kind):
    model = (_random_hybrid(datamodule) if kind == "hybrid" else _model(datamodule, kind)).cuda()
    eager, graphed = _lit(model, cuda_graphs=False), _lit(model, cuda_graphs=True)
    batches = [*datamodule.train_dataloader(), *datamodule.train_dataloader()][:3]
    for batch in batches:  # the first call captures, the others replay on new data
        batch = _on(batch, "cuda")
        _assert_same_step(_step_results(graphed, batch), _step_results(eager, batch))
    assert graphed._captured.n_captures == 1


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fused", [False, True], ids=["plain-network", "fused-network"])
@pytest.mark.parametrize("kind", ["hybrid", "black_box"])
def test_the_fast_path_gives_the_reference_loss_and_gradients(datamodule, kind, fused):
    """`twin train trainer=gpu`: RK4 steps compiled (solver.torch_compile: cuda, the default)
    and replayed through CUDA graphs, with the plain network layers (the default) or the fused
    network kernels (model.residual.fused), against the reference: the plain steps and layers,
    eagerly."""
    from torch._dynamo.utils import counters

    fast_solver = {"name": "rk4", "n_substeps": 1, "torch_compile": "cuda"}
    if kind == "hybrid":  # the same seed: the same parameters
        reference_model, fast_model = (
            _random_hybrid(datamodule, fused=False),
            _random_hybrid(datamodule, fast_solver, fused=fused),
        )
    else:
        residual = shipped_config("model", kind)["residual"]
        reference_model, fast_model = (
            _model(datamodule, kind, residual={**residual, "fused": False}),
            _model(datamodule, kind, solver=fast_solver, residual={**residual, "fused": fused}),
        )
    assert fast_model.field.net.fused == fused and not reference_model.field.net.fused
    reference = _lit(reference_model.cuda(), cuda_graphs=False)
    fast = _lit(fast_model.cuda(), cuda_graphs=True)
    graphs_before = counters["stats"]["unique_graphs"]
    launches_before = fused_mlp.launches
    batches = [*datamodule.train_dataloader(), *datamodule.train_dataloader()][:3]
    for batch in batches:
        batch = _on(batch, "cuda")
        got, expected = _step_results(fast, batch), _step_results(reference, batch)
        # Inductor fuses and reorders the float32 arithmetic of a step: differences of some
        # float32 roundings per step, accumulated over the window (stated: 1e-4 of the scale).
        assert got["grads"].keys() == expected["grads"].keys()
        for key in ("loss", "fit", "y_hat"):
            scale = float(expected[key].abs().max()) + 1e-12
            difference = float((got[key] - expected[key]).abs().max()) / scale
            assert difference <= 1e-4, f"{key}: relative difference {difference:.2e}"
        for name, grad in expected["grads"].items():
            scale = float(grad.abs().max()) + 1e-12
            difference = float((got["grads"][name] - grad).abs().max()) / scale
            assert difference <= 1e-4, f"d loss / d {name}: relative difference {difference:.2e}"
    assert fast._captured.n_captures == 1
    assert counters["stats"]["unique_graphs"] > graphs_before  # the steps were compiled
    assert (fused_mlp.launches > launches_before) == fused  # the fused kernels ran, or not


@pytest.mark.gpu
@needs_cuda
def test_a_stage_change_recaptures_with_the_new_trainable_parameters(datamodule, batch):
    model = _random_hybrid(datamodule).cuda()
    eager = _lit(model, cuda_graphs=False, theta_only_epochs=1)
    graphed = _lit(model, cuda_graphs=True, theta_only_epochs=1)
    batch = _on(batch, "cuda")
    for epoch in (0, 1):
        graphed.set_stage(epoch)
        result = _step_results(graphed, batch)
        _assert_same_step(result, _step_results(eager, batch))
        phi_names = {n for n, p in model.named_parameters() if "net" in n}
        assert bool(phi_names & result["grads"].keys()) == (epoch == 1)
    assert graphed._captured.n_captures == 2


@pytest.mark.gpu
@needs_cuda
def test_lightning_trains_the_same_parameters_with_and_without_cuda_graphs(tiny_cdc_dataset):
    from lightning.pytorch import Trainer, seed_everything

    trained = {}
    for cuda_graphs in (False, True):
        seed_everything(0)
        dm = _datamodule(tiny_cdc_dataset)
        lit = _lit(_random_hybrid(dm), lr=1e-3, cuda_graphs=cuda_graphs)
        trainer = Trainer(
            accelerator="gpu",
            devices=1,
            max_epochs=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
            gradient_clip_val=1.0,
        )
        trainer.fit(lit, datamodule=dm)
        assert (lit._captured is not None) == cuda_graphs
        trained[cuda_graphs] = {n: p.detach().cpu() for n, p in lit.model.named_parameters()}
    for name, value in trained[False].items():
        torch.testing.assert_close(trained[True][name], value, rtol=1e-4, atol=1e-5, msg=name)
