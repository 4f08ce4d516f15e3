"""`twin evaluate`'s settings are refused naming the key before any forecast or simulation."""

import pytest

from hybrid_twin import ConfigError
from tests.training.shipped import stage_config
from training.evaluate import _init_steps, _training_runs, forecast_settings

TAGS = ["NIR.API_CONC", "PRESS.COMP_FORCE"]


def config(**changes):
    return stage_config("evaluate", **changes)


def test_the_defaults_pass_and_one_horizon_is_a_list_of_one():
    assert forecast_settings(config(), TAGS) == ([1, 10, 60], 10.0, 64)
    assert forecast_settings(config(horizons_min=10), TAGS)[0] == [10]
    assert forecast_settings(config(horizons_min=[0.5, 1]), TAGS)[0] == [0.5, 1]


@pytest.mark.parametrize("value", [["abc"], [], [0, 10], [-1], "abc", None, [[1]]])
def test_a_horizon_that_is_no_positive_number_is_refused(value):
    with pytest.raises(ConfigError, match=r"^horizons_min: expected"):
        forecast_settings(config(horizons_min=value), TAGS)


@pytest.mark.parametrize("value", [0, -1, 2.5, "abc", True])
def test_batch_size_is_a_whole_number_from_one(value):
    with pytest.raises(ConfigError, match=r"^batch_size: expected a (whole )?number"):
        forecast_settings(config(batch_size=value), TAGS)


def test_a_headline_tag_not_measured_is_refused_naming_the_valid_ones():
    with pytest.raises(ConfigError, match=r"^headline_tag: unknown measurement tag 'NIR\.API'; "
                                          r"valid: NIR\.API_CONC, PRESS\.COMP_FORCE$"):
        forecast_settings(config(headline_tag="NIR.API"), TAGS)


def test_stride_that_is_no_number_is_refused():
    with pytest.raises(ConfigError, match=r"^stride_min: expected a number"):
        forecast_settings(config(stride_min="abc"), TAGS)


@pytest.mark.parametrize("value", [0, "abc", 1.5])
def test_simulation_counts_are_whole_numbers_from_one(value):
    # refused before MLflow is searched or a run is loaded
    with pytest.raises(ConfigError, match=r"^last_n: expected a (whole )?number"):
        _training_runs(config(mode="simulation", last_n=value), "hybrid", "0" * 64)
    with pytest.raises(ConfigError, match=r"^init_steps: expected a (whole )?number"):
        _init_steps(config(mode="simulation", init_steps=value), [])
