"""`torch_compile`: each step (fixed-step solvers) or vector-field evaluation (Dopri5) through
torch.compile gives the plain solver's states and gradients, one graph serves every batch size
> 1, `cuda` leaves CPU calls plain, and programs that cannot run it (TorchScript,
torch.export) or a backend that fails fall back to the plain path.

Each first compile of a graph takes seconds to a minute on a cold inductor cache; the tests
share one field structure, dtype and batch layout so that they share their graphs.
"""

import pytest
import torch
from tolerances import tol

from hybrid_twin import ConfigError, build_solver
from hybrid_twin import solvers as solvers_module

# Dynamo reads `.grad` of the non-leaf inputs while it traces (x, theta); torch warns about that,
# and pyproject.toml turns warnings into errors, which dynamo would report as a failed compile.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning"
)

# torch.compile fuses and reorders float64 arithmetic; over 8 intervals the states and gradients
# of the compiled path differ from the plain one by ~1e-15 of their scale (measured), so the
# "algebra" tolerance (1e-12 in float64) holds with a wide margin.
CASES = [
    pytest.param({"name": "rk4"}, id="rk4"),
    pytest.param({"name": "rk4", "n_substeps": 2, "recompute": True}, id="rk4-recompute"),
    pytest.param({"name": "euler", "n_substeps": 2}, id="euler"),
    pytest.param({"name": "dopri5"}, id="dopri5"),
]


@pytest.fixture
def hybrid_case(cdc_flowsheet, random_hybrid, make_inputs, rng):
    """A small hybrid of the built-in line, 3 trajectories of 8 input steps, a pinned hopper."""
    field = random_hybrid(cdc_flowsheet)
    u = make_inputs(cdc_flowsheet, 3, 8, rng)
    with torch.no_grad():
        x0 = cdc_flowsheet.steady_state(u[:, 0], field.theta())
    pin_index = torch.tensor([0])
    pin_values = 4.0 + 0.1 * torch.rand(3, 8, 1, generator=rng)
    return field, x0, u, pin_index, pin_values


def _states_and_gradients(solver, field, x0, u, pin_index, pin_values):
    field.zero_grad(set_to_none=True)
    states = solver(x0, u, 5.0, pin_index, pin_values).states
    (states / field.state_normaliser.std).pow(2).mean().backward()
    grads = {name: p.grad.clone() for name, p in field.named_parameters() if p.grad is not None}
    return states.detach(), grads


def _assert_close_to_scale(got, expected, what):
    scale = expected.abs().max().clamp_min(1e-300)
    error = ((got - expected).abs().max() / scale).item()
    assert error <= tol("algebra"), f"{what}: relative difference {error:.2e}"


@pytest.fixture
def compiled_calls(monkeypatch):
    """Counts the calls that reach a compiled step or vector field (the batch size of each)."""
    calls = []
    for name in ("_compiled_vector_field", "_compiled_fixed_step"):
        compiled = getattr(solvers_module, name)()

        def counting(*args, compiled=compiled):
            calls.append(args[1].shape[0])
            return compiled(*args)

        monkeypatch.setattr(solvers_module, name, lambda *_, counting=counting: counting)
    return calls


@pytest.mark.parametrize("config", CASES)
def test_compiled_vector_field_gives_the_plain_states_and_gradients(
    hybrid_case, compiled_calls, config
):
    field = hybrid_case[0]
    plain = _states_and_gradients(build_solver(field, config), field, *hybrid_case[1:])
    assert not compiled_calls
    compiled_solver = build_solver(field, {**config, "torch_compile": True})
    compiled = _states_and_gradients(compiled_solver, field, *hybrid_case[1:])
    assert len(compiled_calls) >= 8 and compiled_solver.torch_compile  # every step
    _assert_close_to_scale(compiled[0], plain[0], "states")
    assert compiled[1].keys() == plain[1].keys() and len(plain[1]) > 0
    for name, grad in plain[1].items():
        _assert_close_to_scale(compiled[1][name], grad, f"d loss / d {name}")


def test_the_built_in_line_traces_into_one_graph(hybrid_case):
    field, x0, u = hybrid_case[:3]
    explained = torch._dynamo.explain(solvers_module._vector_field_rhs)(
        field, x0, u[:, 0], field.theta()
    )
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    solver = build_solver(field, {"name": "rk4", "torch_compile": True})
    explained = torch._dynamo.explain(solvers_module._fixed_step)(
        solver, x0, u[:, 0], field.theta(), 5.0
    )
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_cuda_only_compiling_leaves_cpu_calls_plain(hybrid_case, compiled_calls):
    field = hybrid_case[0]
    plain = _states_and_gradients(build_solver(field, "rk4"), field, *hybrid_case[1:])
    solver = build_solver(field, {"name": "rk4", "torch_compile": "cuda"})
    got = _states_and_gradients(solver, field, *hybrid_case[1:])
    assert compiled_calls == []
    torch.testing.assert_close(got[0], plain[0], rtol=0.0, atol=0.0)
    for name, grad in plain[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("value", ["yes", 1, "CUDA", None])
def test_an_unknown_torch_compile_setting_is_a_config_error(hybrid_case, value):
    with pytest.raises(ConfigError, match=r"solver.torch_compile: expected true, false or 'cuda'"):
        build_solver(hybrid_case[0], {"name": "rk4", "torch_compile": value})


def test_one_compiled_graph_serves_every_batch_size_above_one(
    cdc_flowsheet, hybrid_case, make_inputs, rng
):
    from torch._dynamo.utils import counters

    field = hybrid_case[0]
    solver = build_solver(field, {"name": "rk4", "torch_compile": True})
    plain = build_solver(field, "rk4")
    graphs = []
    for batch in (3, 5, 2):
        u = make_inputs(cdc_flowsheet, batch, 4, rng)
        with torch.no_grad():
            x0 = cdc_flowsheet.steady_state(u[:, 0], field.theta())
            expected = plain(x0, u, 5.0).states
            got = solver(x0, u, 5.0).states
        _assert_close_to_scale(got, expected, f"states at batch {batch}")
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[2] == graphs[0], graphs


def test_scripted_and_exported_solvers_ignore_torch_compile(hybrid_case):
    field, x0, u, pin_index, pin_values = hybrid_case
    solver = build_solver(field, {"name": "rk4", "torch_compile": True})
    with torch.no_grad():
        expected = build_solver(field, "rk4")(x0, u, 5.0).states
        scripted = torch.jit.script(solver)(x0, u, 5.0).states
        program = torch.export.export(solver, (x0, u, 5.0), strict=False)
        exported = program.module()(x0, u, 5.0).states
    # The plain vector field's operations in the same order: bit-identical.
    torch.testing.assert_close(scripted, expected, rtol=0.0, atol=0.0)
    torch.testing.assert_close(exported, expected, rtol=0.0, atol=0.0)


def test_a_backend_that_fails_warns_once_and_the_solver_goes_on_without(hybrid_case, monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    calls = []

    def failing(*args):
        calls.append(args)
        raise TorchDynamoException("no working C++ compiler\nmore lines")

    monkeypatch.setattr(solvers_module, "_compiled_vector_field", lambda *_: failing)
    monkeypatch.setattr(solvers_module, "_compiled_fixed_step", lambda *_: failing)
    field, x0, u, pin_index, pin_values = hybrid_case
    solver = build_solver(field, {"name": "rk4", "torch_compile": True})
    with torch.no_grad():
        expected = build_solver(field, "rk4")(x0, u, 5.0).states
        with pytest.warns(RuntimeWarning, match=r"torch_compile: .*no working C\+\+ compiler\)"):
            got = solver(x0, u, 5.0).states
    torch.testing.assert_close(got, expected, rtol=0.0, atol=0.0)
    assert len(calls) == 1 and solver.torch_compile is False
