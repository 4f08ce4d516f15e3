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
        "press.recipe_dose_mg",
    ]
    feeder_sp = ["FEED_API.MASSFLOW_SP", "FEED_EXC.MASSFLOW_SP", "FEED_LUB.MASSFLOW_SP"]
    assert cdc_flowsheet.input_names[3:] == [
        "blender.speed_sp_rpm",
        "press.weight_sp_mg",
        "press.api_sp_kg_h",
        "press.excipient_sp_kg_h",
        "press.lubricant_sp_kg_h",
    ]
    # Each feeder setpoint tag feeds its feeder and the press's recipe (one column, two inputs).
    assert cdc_flowsheet.input_tags == [*feeder_sp, "BLEND.SPEED_SP", "PRESS.WEIGHT_SP", *feeder_sp]
    assert (cdc_flowsheet.n_states, cdc_flowsheet.n_inputs, cdc_flowsheet.n_outputs) == (27, 8, 16)
    assert cdc_flowsheet.n_params == 22
    assert sum(spec.learnable for spec in cdc_flowsheet.param_specs) == 14
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


def test_the_line_at_steady_state_reads_100_pct_of_any_recipe_dose(cdc_flowsheet, rng):
    """Held setpoints: the frame blend has the recipe's API fraction and W = W_sp, so 100 %LC.

    Feed factors are 1 and the nominal hoppers far from starving (tanh = 1 in float64), so the
    feeders deliver exactly their setpoints.
    """
    line, batch = cdc_flowsheet, 8
    columns = {  # one data column per tag, picked for each unit input as training does
        "FEED_API.MASSFLOW_SP": 0.1 + 9.0 * torch.rand(batch, generator=rng),
        "FEED_EXC.MASSFLOW_SP": 10.0 + 50.0 * torch.rand(batch, generator=rng),
        "FEED_LUB.MASSFLOW_SP": torch.rand(batch, generator=rng),
        "BLEND.SPEED_SP": torch.full((batch,), 400.0),
        "PRESS.WEIGHT_SP": 200.0 + 600.0 * torch.rand(batch, generator=rng),
    }
    u = torch.stack([columns[tag] for tag in line.input_tags], dim=1)
    theta = line.theta().detach()
    y = line.outputs(line.steady_state(u, theta), theta)
    api_lc = y[:, line.output_names.index("press.tablet_api_pct_lc")]
    torch.testing.assert_close(
        api_lc, torch.full_like(api_lc, 100.0), rtol=tol("algebra"), atol=0.0
    )


def test_a_fixed_label_claim_line_reads_against_40_mg(float64, cdc_fixed_label_claim_spec):
    """The pre-recipe line: 26 states, 5 inputs, and a 5.5 % API recipe reads 55 %LC."""
    line = build_flowsheet(cdc_fixed_label_claim_spec)
    assert (line.n_states, line.n_inputs, line.n_params) == (26, 5, 21)
    assert line.input_tags == list(cdc_fixed_label_claim_spec["inputs"])
    u = torch.tensor([[1.65, 28.05, 0.3, 400.0, 400.0]])  # 5.5 % API, 400 mg
    theta = line.theta().detach()
    y = line.outputs(line.steady_state(u, theta), theta)
    api_lc = y[0, line.output_names.index("press.tablet_api_pct_lc")]
    torch.testing.assert_close(api_lc, torch.tensor(55.0), rtol=tol("algebra"), atol=0.0)


@pytest.mark.parametrize("label_claim", ["fixed", "recipe"])
def test_scripted_line_equals_eager_in_both_label_claim_modes(
    float64, cdc_fixed_label_claim_spec, make_inputs, rng, label_claim
):
    spec = cdc_fixed_label_claim_spec if label_claim == "fixed" else cdc_line_flowsheet_spec()
    line = build_flowsheet(spec)
    scripted = torch.jit.script(line)
    u = make_inputs(line, 3, 1, rng)[:, 0]
    theta = line.theta().detach()
    x = line.steady_state(u, theta).detach() * (
        0.8 + 0.4 * torch.rand(3, line.n_states, generator=rng)
    )
    with torch.no_grad():
        for got, want in (
            (scripted.rhs(x, u, theta), line.rhs(x, u, theta)),
            (scripted.outputs(x, theta), line.outputs(x, theta)),
            (scripted.steady_state(u, theta), line.steady_state(u, theta)),
        ):
            torch.testing.assert_close(got, want, rtol=0.0, atol=tol("scripted_vs_eager"))


def test_one_tag_may_feed_several_unit_inputs(float64):
    spec = {
        "components": ["api", "excipient"],
        "units": {
            "feeder": {"type": "liw_feeder", "component": "api", "nominal_flow_kg_h": 2.0},
            "press": {
                "type": "tablet_press",
                "label_claim": "recipe",
                "nominal_feed_sp_kg_h": {"api": 2.0, "excipient": 18.0},
            },
        },
        "streams": [["feeder", "press"]],
        "inputs": {
            "API_SP": ["feeder.mass_flow_sp_kg_h", "press.api_sp_kg_h"],
            "EXC_SP": ["press.excipient_sp_kg_h"],
            "WEIGHT_SP": "press.weight_sp_mg",
        },
    }
    line = build_flowsheet(spec)
    assert line.input_names == [
        "feeder.mass_flow_sp_kg_h",
        "press.weight_sp_mg",
        "press.api_sp_kg_h",
        "press.excipient_sp_kg_h",
    ]
    assert line.input_tags == ["API_SP", "WEIGHT_SP", "API_SP", "EXC_SP"]
    # What training does: one data column per tag, picked for each unit input by its tag.
    columns = ["WEIGHT_SP", "EXC_SP", "API_SP"]
    data = torch.tensor([[400.0, 18.0, 2.0]])
    u = data[:, [columns.index(tag) for tag in line.input_tags]]
    assert u.tolist() == [[2.0, 400.0, 2.0, 18.0]]
    x = line.steady_state(u, line.theta().detach())
    assert float(x[0, line.state_names.index("press.recipe_dose_mg")]) == pytest.approx(40.0)


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
        if issubclass(c, AbstractZOHSolver) and not c.__name__.startswith("Abstract")
    }
    assert solvers == set(SOLVERS.values())  # every concrete solver


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
            "valid: cascaded_tanks, linear_state_space, liw_feeder, tablet_press, "
            "tanks_in_series_blender; "
            "or name a class of your own with _target_",
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
            lambda s: s.update(
                streams=[
                    ["feeder_exc", "feeder_api"] if st == ["feeder_exc", "blender"] else st
                    for st in s["streams"]
                ]
            ),
            r"feeder_api \(LossInWeightFeeder\) takes no inflow",
        ),
        (lambda s: s["inputs"].pop("BLEND.SPEED_SP"), r"unmapped: \['blender.speed_sp_rpm'\]"),
        (
            lambda s: s["inputs"].update({"FEED_LUB.MASSFLOW_SP": "feeder_lub.mass_flow_sp_kg_h"}),
            r"every unit input needs exactly one tag; unmapped: \['press.lubricant_sp_kg_h'\]",
        ),
        (
            lambda s: s["inputs"].update({"PRESS.API_SP": "press.api_sp_kg_h"}),
            r"flowsheet.inputs: unit input 'press.api_sp_kg_h' is mapped more than once "
            r"\(by \['FEED_API.MASSFLOW_SP', 'PRESS.API_SP'\]\); every unit input needs "
            "exactly one tag",
        ),
        (
            lambda s: s["inputs"].update(
                {"BLEND.SPEED_SP": ["blender.speed_sp_rpm", "blender.speed_sp_rpm"]}
            ),
            r"unit input 'blender.speed_sp_rpm' is mapped more than once "
            r"\(by \['BLEND.SPEED_SP', 'BLEND.SPEED_SP'\]\)",
        ),
        (
            lambda s: s["inputs"]["FEED_API.MASSFLOW_SP"].append("press.api_sp"),
            "flowsheet.inputs.FEED_API.MASSFLOW_SP: unknown quantity 'press.api_sp'; valid: ",
        ),
        (
            lambda s: s["inputs"].update({"BLEND.SPEED_SP": []}),
            r"flowsheet.inputs.BLEND.SPEED_SP: expected 'unit.input' or a non-empty list of "
            r"them, got \[\]",
        ),
        (
            lambda s: s["units"]["press"]["nominal_feed_sp_kg_h"].update(api=2.0),
            r"flowsheet.inputs.FEED_API.MASSFLOW_SP: one tag is one signal, but it feeds "
            r"feeder_api.mass_flow_sp_kg_h \(nominal 3.0 kg/h\) and press.api_sp_kg_h "
            r"\(nominal 2.0 kg/h\)",
        ),
        (
            lambda s: s["inputs"].update(
                {"PRESS.WEIGHT_SP": ["press.weight_sp_mg", "press.lubricant_sp_kg_h"]}
            ),
            r"unit input 'press.lubricant_sp_kg_h' is mapped more than once",
        ),
        (
            lambda s: s["measurements"].update({"NIR.API_CONC": "blender.api_pct"}),
            "flowsheet.measurements.NIR.API_CONC: unknown quantity 'blender.api_pct'",
        ),
        (
            lambda s: s.update(calibrated=["PRESS.TURRET_SPEED"]),
            "'PRESS.TURRET_SPEED' is not one of the measurements",
        ),
        (  # each of two downstream units would get the whole outflow: mass from nothing
            lambda s: s["streams"].append(["feeder_exc", "press"]),
            r"flowsheet.streams: feeder_exc feeds blender and press; a unit's outflow goes to "
            r"one unit",
        ),
        (  # consumers merge the sections: the speed setpoint would overwrite the speed state
            lambda s: s["disturbances"].update({"BLEND.SPEED_SP": "blender.speed_rpm"}),
            r"flowsheet.disturbances.BLEND.SPEED_SP: the tag is in flowsheet.inputs too",
        ),
        (
            lambda s: s.update(calibrated=["NIR.API_CONC", "NIR.API_CONC"]),
            r"flowsheet.calibrated: 'NIR.API_CONC' is listed twice",
        ),
        (
            lambda s: s.pop("inputs"),
            r"flowsheet.inputs: every unit input needs exactly one tag; unmapped: ",
        ),
        (
            lambda s: s["units"]["blender"].update(params={"holdup_ref_kg": {"bounds": [0.2]}}),
            r"blender.holdup_ref_kg.bounds: expected \[low, high\], got \[0.2\]",
        ),
        (
            lambda s: s["units"]["blender"].update(params={"holdup_ref_kg": "0,6"}),
            r"blender.holdup_ref_kg.value: expected a number, got '0,6'",
        ),
        (
            lambda s: s["units"]["blender"].update(params=["holdup_ref_kg"]),
            r"blender: params: expected a mapping",
        ),
    ],
)
def test_flowsheet_config_errors_name_the_place_and_the_valid_choices(float64, edit, message):
    with pytest.raises(ConfigError, match=message):
        build_flowsheet(_broken(edit))


def test_hybrid_twin_imports_only_torch_torchdiffeq_and_the_standard_library():
    allowed = {"torch", "torchdiffeq", "hybrid_twin", *sys.stdlib_module_names}
    # Triton, PyTorch's own GPU kernel compiler (a dependency of its CUDA builds), in the fused
    # network's kernels alone; fused_mlp.py imports that module only when a kernel runs.
    also_allowed = {"_mlp_triton.py": {"triton"}}
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
                top = name.split(".")[0]
                assert top in allowed | also_allowed.get(path.name, set()), (
                    f"{path.name} imports {name}"
                )
