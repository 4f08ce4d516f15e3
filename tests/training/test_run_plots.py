"""Open-loop traces for a run's plots: whole runs batched, padding never changes a prediction."""

import dataclasses

import numpy as np
import pytest
import torch

from tests.training.shipped import shipped_config
from training.dataset import PreparedDataset
from training.run_plots import open_loop_traces
from training.twin_model import build_twin_model
from training.windows import cut_window

PAST = 6


@pytest.fixture(scope="module")
def dataset(tiny_cdc_dataset):
    return PreparedDataset.open(tiny_cdc_dataset)


def _model(dataset: PreparedDataset, model_config: dict):
    """The built-in line's twin of `model_config` on this dataset, RK4 at its dt."""
    return build_twin_model(
        shipped_config("flowsheet", "cdc_line"),
        model_config,
        {"name": "rk4", "n_substeps": 1},
        dataset.input_tags,
        dataset.measurement_tags,
        dataset.normalisation(),
        dataset.dt_s,
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize("kind", ["mechanistic", "hybrid"])
def test_each_trace_equals_its_run_simulated_alone(dataset, kind, monkeypatch):
    torch.set_num_threads(1)
    model_config = shipped_config("model", kind)
    if kind == "hybrid":  # a network with non-zero output, so its size is worth plotting
        model_config["residual"] = {**model_config["residual"], "zero_init": False}
    model = _model(dataset, model_config)
    runs = dataset.load_split("test")
    # Cut the first run short so the batch needs padding.
    short = dataclasses.replace(
        runs[0],
        time_s=runs[0].time_s[:40],
        u=runs[0].u[:40],
        y=runs[0].y[:40],
        mask=runs[0].mask[:40],
    )
    monkeypatch.setattr(dataset, "load_split", lambda split: [short, *runs[1:]])
    traces = open_loop_traces(model, dataset, "test", PAST)
    assert [t.run_id for t in traces] == [r.run_id for r in (short, *runs[1:])]
    stats = dataset.normalisation()
    for trace, run in zip(traces, (short, *runs[1:]), strict=True):
        window = cut_window(run, 0, PAST, run.n_rows - PAST, PAST)
        with torch.no_grad():
            alone = model(
                *(
                    t.unsqueeze(0)
                    for t in (window.past_u, window.past_y, window.past_mask, window.u)
                )
            )[0]
        expected = alone.numpy() * stats.y_std.numpy() + stats.y_mean.numpy()
        assert trace.predicted.shape == (run.n_rows - PAST, len(dataset.measurement_tags))
        np.testing.assert_allclose(trace.predicted, expected, rtol=1e-5, atol=1e-5)
        assert np.isnan(trace.measured).sum() == (~window.mask).sum().item()
        assert (trace.residual_size is None) == (kind == "mechanistic")


def test_a_run_too_short_to_simulate_is_named_not_dropped_silently(dataset, monkeypatch, caplog):
    model = _model(dataset, shipped_config("model", "mechanistic"))
    runs = dataset.load_split("test")
    stub = dataclasses.replace(
        runs[0],
        time_s=runs[0].time_s[: PAST + 1],
        u=runs[0].u[: PAST + 1],
        y=runs[0].y[: PAST + 1],
        mask=runs[0].mask[: PAST + 1],
    )
    monkeypatch.setattr(dataset, "load_split", lambda split: [stub, *runs[1:]])
    with caplog.at_level("WARNING", logger="training.run_plots"):
        traces = open_loop_traces(model, dataset, "test", PAST)
    assert [t.run_id for t in traces] == [r.run_id for r in runs[1:]]
    assert f"1 run segments too short to simulate after {PAST} past rows" in caplog.text
    assert f"{stub.run_id} ({PAST + 1} rows)" in caplog.text
