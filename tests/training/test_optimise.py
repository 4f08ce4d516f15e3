"""`twin optimise`: gradient search through an untrained mechanistic twin (float64), checked
on the simulated plant.

The twin is built from the shipped configs with the tiny dataset's tag order, as in
test_scenario.py. Problems here are small (3 profiles of 8 min, a few iterations) to stay
fast; the shipped configuration's numbers are in docs/optimisation.md.
"""

import re

import pytest
import torch
import yaml

from hybrid_twin import ConfigError
from training.config_dir import SHIPPED_CONFIG_DIR
from training.dataset import PreparedDataset
from training.operating_point import (
    draw_profiles,
    flow_factors,
    optimise_settings,
    parse_problem,
    twin_objective,
)
from training.plant_check import plant_objective
from training.scenario_spec import parse_line
from training.scenario_twin import ScenarioTwin, twin_from_model
from training.twin_model import build_twin_model

SMALL = {
    "settings": {"BLEND.SPEED_SP": [200.0, 600.0], "throughput_kg_h": [24.0, 36.0]},
    "disturbances": {
        "feeder": "api",
        "n_profiles": 3,
        "seed": 0,
        "onset_min": [1.0, 2.0],
        "duration_min": [1.0, 2.0],
        "size": [-0.3, -0.1],
    },
    "horizon_min": 8,
    "objective": {"tag": "PRESS.TABLET_API", "target": 100.0, "from_min": 0.5},
    "optimiser": {"iterations": 6, "learning_rate": 0.5},
}


def _load(relative: str) -> dict:
    return yaml.safe_load((SHIPPED_CONFIG_DIR / relative).read_text())


@pytest.fixture(scope="module")
def line():
    return parse_line(_load("scenario.yaml")["line"])


@pytest.fixture(scope="module")
def twin(tiny_cdc_dataset) -> ScenarioTwin:
    torch.set_num_threads(1)
    dataset = PreparedDataset.open(tiny_cdc_dataset)
    model = (
        build_twin_model(
            _load("flowsheet/cdc_line.yaml"),
            _load("model/mechanistic.yaml"),
            _load("solver/rk4.yaml"),
            dataset.input_tags,
            dataset.measurement_tags,
            dataset.normalisation(torch.float64),
            dataset.dt_s,
        )
        .to(torch.float64)
        .eval()
    )
    units = {tag: spec["unit"] for tag, spec in dataset.manifest["tags"].items()}
    return twin_from_model(
        model, dataset.input_tags, dataset.measurement_tags, units, 6, "eager mechanistic defaults"
    )


def test_optimised_settings_reduce_api_variability_on_the_twin_and_on_the_plant(line, twin):
    problem = parse_problem(SMALL, line, twin)
    result = optimise_settings(twin, line, problem)
    # Longer residence time spreads a feeder dip over more tablets: on the twin's blender
    # (hold-up ~ F^0.5 speed^-0.5) and the plant's (F^0.6 speed^-0.7) both settings go down.
    assert result.best["BLEND.SPEED_SP"] < 300.0 and result.best["throughput_kg_h"] < 28.0
    for name, (low, high) in problem.bounds.items():
        assert low < result.best[name] < high, name
    assert result.objective_best < 0.9 * result.objective_start
    (plant_start, _), (plant_best, api) = plant_objective(
        [result.start, result.best],
        problem,
        line,
        _load("sim/cdc_default.yaml"),
        "BLEND.SPEED_SP",
        "PRESS.WEIGHT_SP",
        seed=0,
    )
    print(
        f"twin {result.objective_start:.3f} -> {result.objective_best:.3f}, plant "
        f"{plant_start:.3f} -> {plant_best:.3f} %LC^2 at {result.best}"
    )
    assert api.shape == (3, 8 * 60)
    # The check that matters: on the plant, which shares no code with the twin, with the
    # same disturbances and the same process noise at both settings.
    assert plant_best < 0.9 * plant_start


def test_objective_gradient_matches_central_differences(line, twin):
    problem = parse_problem({**SMALL, "horizon_min": 4}, line, twin)
    factors = torch.as_tensor(flow_factors(problem, line, twin.dt_s), dtype=torch.float64)
    values = torch.tensor([400.0, 30.0], dtype=torch.float64, requires_grad=True)
    objective, _ = twin_objective(twin, line, problem, values, factors)
    (gradient,) = torch.autograd.grad(objective, values)
    for j, step in enumerate((1e-3, 1e-4)):  # rpm, kg/h: relative steps of ~3e-6
        shift = torch.zeros(2, dtype=torch.float64)
        shift[j] = step
        with torch.no_grad():
            up = twin_objective(twin, line, problem, values + shift, factors)[0]
            down = twin_objective(twin, line, problem, values - shift, factors)[0]
        # central difference error ~ step^2 x third derivative; float64 rounding ~1e-16/step
        torch.testing.assert_close(gradient[j], (up - down) / (2 * step), rtol=1e-5, atol=0.0)
    assert gradient[0] > 0 and gradient[1] > 0  # faster, more: less hold-up, less filtering


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"settings": {"BLEND.SPED_SP": [200, 600]}}, r"optimise\.settings\.BLEND\.SPED_SP: not"),
        ({"settings": {"BLEND.SPEED_SP": [450, 600]}}, r"around the start value 400"),
        ({"horizon_min": 8.01}, r"optimise\.horizon_min: 8\.01 min is not a whole number"),
        ({"objective": {**SMALL["objective"], "tag": "NIR.API"}}, r"objective\.tag: 'NIR\.API'"),
        ({"disturbances": {**SMALL["disturbances"], "feeder": "apii"}}, r"unknown feeder 'apii'"),
        (
            {"settings": {"BLEND.SPEED_SP": [200]}},
            r"optimise\.settings\.BLEND\.SPEED_SP: expected \[low, high\], got \[200\]",
        ),
        (
            {"settings": {"BLEND.SPEED_SP": ["200 rpm", 600]}},
            r"optimise\.settings\.BLEND\.SPEED_SP: expected a number, got '200 rpm'",
        ),
        (
            {"horizon_min": "8 min"},
            r"optimise\.horizon_min: expected a number \(min\), got '8 min'",
        ),
        (
            {"optimiser": {**SMALL["optimiser"], "iterations": 2.5}},
            r"optimise\.optimiser\.iterations: expected a whole number >= 0, got 2\.5",
        ),
        (
            {"disturbances": {**SMALL["disturbances"], "n_profiles": 0}},
            r"optimise\.disturbances\.n_profiles: expected a whole number >= 1, got 0",
        ),
        (  # a negative row wrapped the twin's dip to the horizon's end; the plant's was over
            {"disturbances": {**SMALL["disturbances"], "onset_min": [-3, -2]}},
            r"optimise\.disturbances\.onset_min: expected minutes >= 0 .*got \[-3, -2\]",
        ),
        (
            {"disturbances": {**SMALL["disturbances"], "duration_min": [-1, 1]}},
            r"optimise\.disturbances\.duration_min: expected minutes > 0, got \[-1, 1\]",
        ),
        (  # both set the API feeder's setpoint: the reported settings were not what ran
            {"settings": {"throughput_kg_h": [20, 40], "FEED_API.MASSFLOW_SP": [2.5, 3.5]}},
            r"optimise\.settings: throughput_kg_h scales every feeder setpoint .* together with "
            r"FEED_API\.MASSFLOW_SP",
        ),
    ],
)
def test_bad_optimise_settings_name_the_key(line, twin, change, match):
    with pytest.raises(ConfigError, match=match):
        parse_problem({**SMALL, **change}, line, twin)


def test_a_null_range_leaves_a_decision_variable_out(line, twin):
    # Hydra merges `optimise.settings='{throughput_kg_h: null}'` into the defaults
    raw = {**SMALL, "settings": {**SMALL["settings"], "throughput_kg_h": None}}
    assert list(parse_problem(raw, line, twin).bounds) == ["BLEND.SPEED_SP"]
    with pytest.raises(ConfigError, match=r"optimise\.settings: name at least one"):
        parse_problem({**SMALL, "settings": {"BLEND.SPEED_SP": None}}, line, twin)


@pytest.mark.parametrize("size", [[0.5, 3.0], [-2.0, 3.0], [-2.0, 0.5], [-0.2, 1.0]])
def test_a_disturbance_size_outside_minus_one_to_one_is_refused_with_the_range(size):
    raw = {**SMALL["disturbances"], "size": size}
    expected = r"optimise\.disturbances\.size: .*in \(-1, 1\), got " + re.escape(str(size))
    with pytest.raises(ConfigError, match=expected):
        draw_profiles(raw, 5.0, 8 * 12, "optimise.disturbances")


@pytest.mark.parametrize("from_min", [8.0, 9.0])
def test_an_objective_from_the_horizon_on_is_refused_naming_both_keys(line, twin, from_min):
    raw = {**SMALL, "objective": {**SMALL["objective"], "from_min": from_min}}
    expected = rf"optimise\.objective\.from_min: {from_min:g} min is not before "
    expected += r"optimise\.horizon_min \(8 min\)"
    with pytest.raises(ConfigError, match=expected):
        parse_problem(raw, line, twin)


def test_plant_check_refuses_a_disturbance_that_adds_flow(line, twin):
    raw = {**SMALL, "disturbances": {**SMALL["disturbances"], "size": [0.1, 0.2]}}
    problem = parse_problem(raw, line, twin)
    with pytest.raises(ConfigError, match=r"disturbances\.size: the plant's blockage"):
        plant_objective(
            [problem.start],
            problem,
            line,
            _load("sim/cdc_default.yaml"),
            "BLEND.SPEED_SP",
            "PRESS.WEIGHT_SP",
            seed=0,
        )
