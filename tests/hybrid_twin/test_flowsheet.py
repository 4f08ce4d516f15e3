"""Flowsheet composition, the built-in line, registries and their config files, import hygiene."""

import ast
import copy
import inspect
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import tol

import hybrid_twin
from hybrid_twin import (
    FLOWSHEETS,
    KINDS,
    SOLVERS,
    UNITS,
    AbstractUnit,
    AbstractZOHSolver,
    ConfigError,
    ModelConfig,
    build_flowsheet,
    build_solver,
    cdc_line_flowsheet_spec,
)

# Property tests: few examples (2 shared cores), no deadline (first calls pay torch's warm-up);
# the function-scoped fixtures only set the dtype, so reusing them across examples is fine.
PROPERTY_SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

ROOT = Path(__file__).resolve().parents[2]
yaml = pytest.importorskip("yaml")


def test_the_cdc_line_has_the_documented_states_inputs_and_outputs(cdc_flowsheet):
    tanks = [
        f"blender.tank{i}.{c}_kg" for i in range(1, 6) for c in ("api", "excipient", "lubricant")
    ]
    feeders = [
        f"feeder_{f}.{s}"
        for f in ("api", "exc", "lub")
        for s in ("hopper_mass_kg", "feed_rate_kg_h")
    ]
    assert cdc_flowsheet.state_names == [
        *feeders,
        *tanks,
        "blender.speed_rpm",
        "press.frame1.api_kg",
        "press.frame1.excipient_kg",
        "press.frame1.lubricant_kg",
        "press.tablet_weight_mg",
    ]
    assert cdc_flowsheet.input_tags == [
        "FEED_API.MASSFLOW_SP",
        "FEED_EXC.MASSFLOW_SP",
        "FEED_LUB.MASSFLOW_SP",
        "BLEND.SPEED_SP",
        "PRESS.WEIGHT_SP",
    ]
    plant = yaml.safe_load((ROOT / "configs/plant/cdc_line.yaml").read_text())["tags"]
    spec = cdc_line_flowsheet_spec()
    assert {t for t, v in plant.items() if v["role"] == "input"} == set(spec["inputs"])
    assert {t for t, v in plant.items() if v["role"] == "measurement"} == set(spec["measurements"])
    assert {t for t, v in plant.items() if v["role"] == "disturbance"} == set(spec["disturbances"])


def test_steady_state_is_stationary_except_for_the_draining_hoppers(cdc_flowsheet):
    theta, u = cdc_flowsheet.theta(), cdc_flowsheet.nominal_inputs()
    x = cdc_flowsheet.steady_state(u, theta)
    dx = cdc_flowsheet.rhs(x, u, theta).detach()[0]
    hoppers = [
        i for i, name in enumerate(cdc_flowsheet.state_names) if name.endswith("hopper_mass_kg")
    ]
    expected = torch.zeros_like(dx)
    expected[hoppers] = -u[0, :3] / 3600.0  # each hopper loses its feed rate
    torch.testing.assert_close(dx, expected, rtol=0.0, atol=tol("algebra"))


@PROPERTY_SETTINGS
@given(data=st.data())
def test_the_line_conserves_mass_of_every_component(float64, data):
    line = build_flowsheet(cdc_line_flowsheet_spec())
    scales = torch.tensor([s.scale for s in line.state_specs])
    x = scales * torch.tensor(
        data.draw(st.lists(st.floats(0.0, 3.0), min_size=line.n_states, max_size=line.n_states))
    )
    u = torch.tensor([data.draw(st.floats(*s.bounds)) for s in line.input_specs])
    x, u, theta = x.unsqueeze(0), u.unsqueeze(0), line.theta().detach()
    with torch.no_grad():
        accumulation_kg_h = 3600.0 * line.inventory(line.rhs(x, u, theta)).sum(dim=1)
        leaving_kg_h = line.flows(x, u, theta)[:, line.sinks()].sum(dim=1)
    scale = 1.0 + float(line.flows(x, u, theta).abs().max())
    torch.testing.assert_close(
        accumulation_kg_h, -leaving_kg_h, rtol=0.0, atol=tol("algebra") * scale
    )


def test_every_unit_and_solver_class_is_registered():
    units = {
        c
        for _, c in inspect.getmembers(hybrid_twin.units, inspect.isclass)
        if issubclass(c, AbstractUnit)
    }
    assert units - {AbstractUnit} == set(UNITS.values())
    solvers = {
        c
        for _, c in inspect.getmembers(hybrid_twin.solvers, inspect.isclass)
        if issubclass(c, AbstractZOHSolver)
    }
    assert solvers - {AbstractZOHSolver} == set(SOLVERS.values())


def test_every_registry_key_has_its_config_file_and_it_builds(cdc_flowsheet):
    assert {p.stem for p in (ROOT / "configs/solver").glob("*.yaml")} == set(SOLVERS)
    for key in SOLVERS:
        config = yaml.safe_load((ROOT / f"configs/solver/{key}.yaml").read_text())
        assert config["name"] == key
        assert type(build_solver(cdc_flowsheet, config)) is SOLVERS[key]
    assert {p.stem for p in (ROOT / "configs/model").glob("*.yaml")} == set(KINDS)
    for kind in KINDS:
        assert (
            ModelConfig.from_mapping(
                yaml.safe_load((ROOT / f"configs/model/{kind}.yaml").read_text())
            ).kind
            == kind
        )
    assert {p.stem for p in (ROOT / "configs/flowsheet").glob("*.yaml")} == set(FLOWSHEETS)
    for key, make_spec in FLOWSHEETS.items():
        assert yaml.safe_load((ROOT / f"configs/flowsheet/{key}.yaml").read_text()) == make_spec()


def _broken(edit) -> dict:
    spec = copy.deepcopy(cdc_line_flowsheet_spec())
    edit(spec)
    return spec


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s["units"]["blender"].update(type="paddle_blender"),
            "flowsheet.units.blender: unknown unit type 'paddle_blender'; "
            "valid: liw_feeder, tablet_press, tanks_in_series_blender",
        ),
        (
            lambda s: s["units"]["blender"].update(n_tank=5),
            "flowsheet.units.blender: unknown tanks_in_series_blender key 'n_tank'",
        ),
        (
            lambda s: s["units"]["feeder_api"].pop("component"),
            r"flowsheet.units.feeder_api \(liw_feeder\): .*'component'",
        ),
        (lambda s: s.update(stream=[]), "unknown flowsheet key 'stream'"),
        (
            lambda s: s["streams"].append(["blender", "mill"]),
            "flowsheet.streams: unknown unit 'mill'",
        ),
        (
            lambda s: s["streams"].append(["press", "blender"]),
            r"units \['blender', 'press'\] form a cycle",
        ),
        (
            lambda s: s["streams"].append(["feeder_exc", "feeder_api"]),
            r"feeder_api \(LossInWeightFeeder\) takes no inflow",
        ),
        (lambda s: s["inputs"].pop("BLEND.SPEED_SP"), r"unmapped: \['blender.speed_sp_rpm'\]"),
        (
            lambda s: s["measurements"].update({"NIR.API_CONC": "blender.api_pct"}),
            "flowsheet.measurements.NIR.API_CONC: unknown quantity 'blender.api_pct'",
        ),
        (
            lambda s: s.update(calibrated=["PRESS.TURRET_SPEED"]),
            "'PRESS.TURRET_SPEED' is not one of the measurements",
        ),
    ],
)
def test_flowsheet_config_errors_name_the_place_and_the_valid_choices(float64, edit, message):
    with pytest.raises(ConfigError, match=message):
        build_flowsheet(_broken(edit))


def test_hybrid_twin_imports_only_torch_torchdiffeq_and_the_standard_library():
    allowed = {"torch", "torchdiffeq", "hybrid_twin", *sys.stdlib_module_names}
    for path in (ROOT / "hybrid_twin").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom) and node.level == 0
                    else []
                )
            )
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
