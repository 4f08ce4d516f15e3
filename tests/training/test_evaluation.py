"""Open-loop evaluation arithmetic: forecast origins, horizons, RMSE in tag units."""

import math

import pytest
import torch

from training.dataset import DatasetError, Normalisation, RunTensors
from training.evaluation import forecast, forecast_origins, horizon_errors


def _run(run_id: str, n_rows: int, n_y: int = 2) -> RunTensors:
    rows = torch.arange(n_rows, dtype=torch.float32)
    return RunTensors(
        run_id=run_id,
        file=f"runs/{run_id}.parquet",
        first_row=0,
        time_s=rows.to(torch.float64) * 5.0,
        u=rows.unsqueeze(1),  # u = row number: windows can be traced to their rows
        y=rows.unsqueeze(1).repeat(1, n_y),
        mask=torch.ones(n_rows, n_y, dtype=torch.bool),
    )


def test_origins_start_at_p_every_stride_while_the_longest_horizon_fits():
    origins = forecast_origins(
        [_run("A", 30), _run("B", 12)], past_steps=4, horizon_steps=10, stride_steps=7
    )
    # A: t0 = 4, 11, 18 (18 + 11 rows = 29 <= 30; 25 would need 36); B: none (4 + 11 > 12)
    assert origins.windows.u[:, 0, 0].tolist() == [4.0, 11.0, 18.0]
    assert origins.windows.past_u[:, -1, 0].tolist() == [3.0, 10.0, 17.0]
    assert origins.windows.u.shape == (3, 11, 1)
    assert origins.run_ids == ["A", "A", "A"]
    assert origins.skipped == {"B": 12}


def test_no_run_long_enough_names_each_run_and_its_rows():
    with pytest.raises(DatasetError, match=r"A \(10 rows\), B \(12 rows\)"):
        forecast_origins([_run("A", 10), _run("B", 12)], 4, 10, 1)
    with pytest.raises(ValueError, match="stride_steps must be >= 1"):
        forecast_origins([_run("A", 10)], 4, 2, 0)


def _stats(y_std: list[float]) -> Normalisation:
    n = len(y_std)
    return Normalisation(torch.zeros(1), torch.ones(1), torch.zeros(n), torch.tensor(y_std))


def test_rmse_pools_lead_times_one_to_h_in_tag_units_per_group():
    origins = forecast_origins([_run("A", 20), _run("B", 20)], 2, 4, 100)  # one origin each
    windows = origins.windows
    # normalised error of row k: k * 0.1 on tag 0 (std 2 -> 0.2 k in tag units), 1.0 on tag 1
    offset = torch.stack([torch.arange(5) * 0.1, torch.ones(5)], dim=1)
    predicted = windows.y + offset
    mask = windows.mask.clone()
    mask[1, 2, 0] = False  # B misses lead 2 on tag 0
    windows = windows._replace(mask=mask)
    errors = horizon_errors(predicted, windows, _stats([2.0, 3.0]), [1, 4], torch.tensor([0, 1]), 2)
    rmse = errors.rmse()
    # group A, tag 0: h=1 -> lead 1 only: 0.2; h=4 -> leads 1..4: sqrt(mean(0.04 k^2))
    assert rmse[0, 0, 0].item() == pytest.approx(0.2)
    assert rmse[0, 0, 1].item() == pytest.approx(math.sqrt(0.04 * (1 + 4 + 9 + 16) / 4))
    assert rmse[1, 0, 1].item() == pytest.approx(math.sqrt(0.04 * (1 + 9 + 16) / 3))
    assert errors.count[:, 0, 1].tolist() == [4, 3]
    assert rmse[:, 1].flatten().tolist() == pytest.approx([3.0] * 4)  # lead 0 left out


def test_a_diverged_window_is_left_out_of_the_pool_not_made_its_nan():
    windows = forecast_origins([_run("A", 20)], 2, 4, 3).windows  # 5 origins, leads 0..4
    predicted = windows.y + 1.0  # error 1 everywhere (std 1)
    predicted[2, 3:] = math.nan  # the third window diverges at lead 3
    n = windows.y.shape[0]
    errors = horizon_errors(predicted, windows, _stats([1.0, 1.0]), [4], torch.zeros(n).long(), 1)
    assert errors.rmse().flatten().tolist() == pytest.approx([1.0, 1.0])  # was NaN
    assert errors.count.flatten().tolist() == [4 * n - 2, 4 * n - 2]  # n counts what is pooled


def test_a_tag_never_sampled_has_nan_rmse_and_zero_count():
    origins = forecast_origins([_run("A", 20)], 2, 4, 100)
    windows = origins.windows._replace(mask=torch.zeros_like(origins.windows.mask))
    errors = horizon_errors(windows.y, windows, _stats([1.0, 1.0]), [4], torch.tensor([0]), 1)
    assert errors.count.sum().item() == 0
    assert torch.isnan(errors.rmse()).all()


def test_horizon_beyond_the_window_is_refused():
    origins = forecast_origins([_run("A", 20)], 2, 4, 100)
    with pytest.raises(ValueError, match=r"horizon of 5 steps outside the windows' 1..4"):
        horizon_errors(
            origins.windows.y, origins.windows, _stats([1.0, 1.0]), [5], torch.tensor([0]), 1
        )


class _Shift(torch.nn.Module):
    """Predicts the measured y plus 1 (normalised): a model with a known error."""

    def forward(self, past_u, past_y, past_mask, u):
        return u.repeat(1, 1, 2) + 1.0


def test_forecast_batches_and_concatenates_in_order():
    origins = forecast_origins([_run("A", 40)], 2, 4, 3)
    predicted = forecast(_Shift(), origins.windows, batch_size=4)
    assert torch.equal(predicted, origins.windows.y + 1.0)
    errors = horizon_errors(
        predicted,
        origins.windows,
        _stats([2.0, 0.5]),
        [4],
        torch.zeros(len(origins.run_ids), dtype=torch.long),
        1,
    )
    assert errors.rmse().flatten().tolist() == pytest.approx([2.0, 0.5])
