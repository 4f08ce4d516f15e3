"""Whole-record simulation RMSE (`twin evaluate mode=simulation`): what is scored and how."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hybrid_twin import ConfigError, cascaded_tanks_flowsheet_spec
from training.dataset import PreparedDataset
from training.simulation_eval import median_run, simulate_runs, simulation_markdown, summarise
from training.twin_model import build_twin_model

HEAD_CSV = Path(__file__).resolve().parents[1] / "data" / "cascaded_tanks_head.csv"


@pytest.fixture(scope="module")
def dataset(tiny_tanks_dataset) -> PreparedDataset:
    return PreparedDataset.open(tiny_tanks_dataset)


def _mechanistic(dataset: PreparedDataset):
    return build_twin_model(
        cascaded_tanks_flowsheet_spec(),
        {"kind": "mechanistic"},
        {"name": "rk4", "n_substeps": 1},
        dataset.input_tags,
        dataset.measurement_tags,
        dataset.normalisation(),
        dataset.dt_s,
    )


def test_simulation_scores_every_row_after_the_first_n_against_the_record(dataset):
    model = _mechanistic(dataset)
    table, traces = simulate_runs({"mechanistic": [("r1", "0", model)]}, dataset, "test", 5)
    (row,) = table.itertuples()
    assert (row.segment, row.tag, row.n_init, row.n) == ("validation", "TANK2.LEVEL", 5, 115)
    # The same free run by hand: initial state from rows 0..4, inputs from row 5 on.
    (run,) = dataset.load_split("test")
    stats = dataset.normalisation()
    with torch.no_grad():
        y_hat = model(run.u[None, :5], run.y[None, :5], run.mask[None, :5], run.u[None, 5:])
    predicted = (y_hat[0, :, 0] * stats.y_std[0] + stats.y_mean[0]).numpy()
    measured = np.loadtxt(HEAD_CSV, delimiter=",", skiprows=1, usecols=(3,))[5:]  # yVal[5:]
    assert row.rmse == pytest.approx(np.sqrt(np.mean((predicted - measured) ** 2)), rel=1e-5)
    assert traces["mechanistic"]["r1"][0].measured.shape == (115, 1)


def test_summary_gives_mean_and_sample_spread_over_seeds_and_picks_the_median_run():
    table = pd.DataFrame(
        {
            "kind": ["hybrid"] * 3,
            "run_id": ["a", "b", "c"],
            "seed": ["0", "1", "2"],
            "segment": ["validation"] * 3,
            "tag": ["TANK2.LEVEL"] * 3,
            "unit": ["V"] * 3,
            "n_init": [5] * 3,
            "rmse": [0.3, 0.5, 0.4],
            "n": [1019] * 3,
        }
    )
    (summary,) = summarise(table).itertuples()
    assert summary.mean == pytest.approx(0.4)
    assert summary.std == pytest.approx(0.1)  # sample std, ddof 1
    assert (summary.min, summary.max, summary.n_runs) == (0.3, 0.5, 3)
    assert median_run(table, "hybrid") == "c"
    assert "| hybrid | validation | TANK2.LEVEL | 5 | 0.400 ± 0.100 V |" in simulation_markdown(
        summarise(table)
    )


def test_the_median_run_weighs_tags_in_different_units_alike():
    # The level (V) spreads 3x over the runs, the speed (rpm) 10 %: relative to each tag's
    # mean, b is the middle run. A plain mean of the RMSEs follows the rpm tag (a).
    rmse = {"a": (0.2, 20.0), "b": (0.4, 21.0), "c": (0.6, 19.0)}
    table = pd.DataFrame(
        [
            {"kind": "hybrid", "run_id": run, "segment": "validation", "tag": tag, "rmse": value}
            for run, values in rmse.items()
            for tag, value in zip(("LEVEL", "SPEED"), values, strict=True)
        ]
    )
    assert median_run(table, "hybrid") == "b"


def test_data_normalisation_scales_network_inputs_by_the_data_and_keeps_hybrid_mechanistic(
    dataset,
):
    spec = cascaded_tanks_flowsheet_spec()
    args = ({"name": "rk4", "n_substeps": 1}, dataset.input_tags, dataset.measurement_tags)
    stats = dataset.normalisation()
    hybrid = build_twin_model(
        spec, {"kind": "hybrid", "state_normalisation": "data"}, *args, stats, dataset.dt_s
    )
    states, inputs = hybrid.field.state_normaliser, hybrid.field.input_normaliser
    # The lower level is the measured tag: its statistics; the upper has none: its scale.
    torch.testing.assert_close(states.std, torch.tensor([5.0, float(stats.y_std[0])]))
    torch.testing.assert_close(states.mean[1], stats.y_mean[0])
    torch.testing.assert_close(inputs.std, stats.u_std)
    (run,) = dataset.load_split("test")
    window = (run.u[None, :5], run.y[None, :5], run.mask[None, :5], run.u[None, 5:])
    with torch.no_grad():  # zero-initialised residual: the untrained hybrid is its prior
        torch.testing.assert_close(hybrid(*window), _mechanistic(dataset)(*window))
    with pytest.raises(ConfigError, match="model.state_normalisation: unknown choice 'dta'"):
        build_twin_model(spec, {"kind": "hybrid", "state_normalisation": "dta"}, *args, stats, 4.0)
