"""The fused residual network (hybrid_twin/fused_mlp.py, model.residual.fused) against the plain
layers: the same output and the same gradients of the input and of every parameter.

The kernels run compiled on a CUDA device and, on CPU, in Triton's interpreter
(TRITON_INTERPRET=1, in a subprocess: the variable is read when triton is imported), which
runs the same kernel code element by element: the padding, masking, recomputation and
partial-gradient layout are checked on every machine that has triton, GPU or not.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid_twin import ConfigError
from hybrid_twin.fused_mlp import mlp_tanh
from hybrid_twin.residual import ResidualConfig, ResidualNet

REPO = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter)"
)
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the compiled kernels); none here"
)

# (n_in, hidden, n_out, rows): the residual network of the built-in line (12 -> 64 -> 64 -> 9),
# rows not a multiple of the 64-row block; the Cascaded Tanks' 32-wide one; widths that pad
# (20 -> 32, 1 -> 16) on a single row.
SHAPES = [(12, (64, 64), 9, 150), (5, (32, 32), 3, 64), (17, (20, 64), 1, 1)]

COMPARE = """
import json, sys, torch
from hybrid_twin.fused_mlp import mlp_tanh
from hybrid_twin.residual import ResidualNet

def compare(n_in, hidden, n_out, rows, seed, compiled):
    generator = torch.Generator().manual_seed(seed)
    net = ResidualNet(n_in, n_out, hidden, zero_init=False, generator=generator)
    linears = [layer for layer in net.layers if isinstance(layer, torch.nn.Linear)]
    z = torch.randn(rows, n_in, generator=generator)
    weight = torch.randn(rows, n_out, generator=generator)  # a loss that weighs every output

    def fused(z):
        return mlp_tanh(torch.sin(z), linears)

    def results(network):
        net.zero_grad(set_to_none=True)
        leaf = z.clone().requires_grad_(True)
        y = network(leaf)
        (y * weight).sum().backward()
        return [y.detach(), leaf.grad] + [p.grad for p in net.parameters()]

    got = results(torch.compile(fused) if compiled else fused)
    expected = results(lambda z: net(torch.sin(z)))
    return [float((a - b).abs().max() / (b.abs().max() + 1e-30)) for a, b in zip(got, expected)]

cases = json.loads(sys.argv[1])
print(json.dumps([compare(*case) for case in cases]))
"""


def _interpreted(argument: object, script: str = COMPARE) -> object:
    """`script` run with the json of `argument` in a fresh interpreter under TRITON_INTERPRET=1;
    the json of its last printed line."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(argument)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_triton
def test_the_fused_kernels_give_the_plain_output_and_gradients_in_the_interpreter(seed):
    """Eagerly for every shape, and inside `torch.compile` (the fake kernels and the autograd
    formula as AOTAutograd sees them) for the built-in line's network. float32: the fused
    kernels sum in another order and write tanh as (1 - e^-2|x|) / (1 + e^-2|x|), a few float32
    roundings apart; measured <= 6e-7 of each result's largest value."""
    cases = [[*shape[:1], list(shape[1]), *shape[2:], seed, False] for shape in SHAPES]
    cases.append([12, [64, 64], 9, 150, seed, True])
    for case, differences in zip(cases, _interpreted(cases), strict=True):
        names = ["output", "d/dz", "dW1", "db1", "dW2", "db2", "dW3", "db3"]
        worst = max(differences)
        assert worst <= 1e-5, f"{case}: {dict(zip(names, differences, strict=True))}"


# The training fast path: a hybrid with a 64x64 residual, float32, RK4 steps through
# torch.compile; on the Cascaded Tanks flowsheet (3 -> 64 -> 64 -> 2), the smallest built-in
# one, because compiling the step (cold: minutes for the built-in line on 2 cores) is this
# test's cost. `fusable` admits CUDA tensors only; here the interpreter stands in for the
# device, so the script lets CPU tensors through.
COMPILED_STEP = """
import json, sys, torch
import hybrid_twin.residual as residual
from hybrid_twin import HybridVectorField, build_flowsheet, build_solver, fused_mlp
from hybrid_twin.flowsheets import cascaded_tanks_flowsheet_spec

residual.fusable = lambda z, widths: z.dtype == torch.float32 and len(widths) == 4 and max(
    widths) <= fused_mlp.MAX_WIDTH
seed, batch, steps = json.loads(sys.argv[1])
generator = torch.Generator().manual_seed(seed)
flowsheet = build_flowsheet(cascaded_tanks_flowsheet_spec())
config = {"kind": "hybrid", "residual": {"hidden": [64, 64], "zero_init": False}}
field = HybridVectorField(flowsheet, config, generator=generator)
nominal = flowsheet.nominal_inputs().float()
u = nominal * (1.0 + 0.05 * torch.randn(batch, steps, flowsheet.n_inputs, generator=generator))
with torch.no_grad():
    x0 = flowsheet.steady_state(u[:, 0], field.theta())

def gradients(solver, fused):
    field.net.fused = fused
    field.zero_grad(set_to_none=True)
    before = fused_mlp.launches
    states = solver(x0, u, 5.0).states
    (states / field.state_normaliser.std).pow(2).mean().backward()
    grads = [p.grad for p in field.parameters() if p.grad is not None]
    return grads, fused_mlp.launches - before

def difference(got, expected):
    return max(float((a - b).abs().max() / (b.abs().max() + 1e-30))
               for a, b in zip(got, expected, strict=True))

plain, _ = gradients(build_solver(field, {"name": "rk4"}), False)
compiled = build_solver(field, {"name": "rk4", "torch_compile": True})
fused, fused_launches = gradients(compiled, True)
unfused, unfused_launches = gradients(compiled, False)  # the same compiled step, setting off
print(json.dumps({
    "fused_launches": fused_launches, "fused_difference": difference(fused, plain),
    "unfused_launches": unfused_launches, "unfused_difference": difference(unfused, plain),
}))
"""


@needs_triton
def test_the_compiled_training_step_runs_the_fused_network_and_follows_its_setting(seed):
    """What the GPU fast path relies on: the RK4 step under torch.compile calls the fused
    network once per stage (4 per step), its gradients those of the plain eager solver, and
    turning `fused` off on the same compiled solver recompiles to the plain layers (a GPU
    benchmark once timed fused rows that had run the plain network, benchmarks/gpu_training.md).
    float32, 3 steps; measured ~2e-7 of each gradient's scale."""
    steps = 3
    result = _interpreted([seed, 70, steps], COMPILED_STEP)
    assert result["fused_launches"] == 4 * steps, result
    assert result["unfused_launches"] == 0, result
    assert result["fused_difference"] <= 1e-5, result
    assert result["unfused_difference"] <= 1e-5, result


def test_on_cpu_and_in_torchscript_the_network_runs_its_plain_layers(rng):
    net = ResidualNet(12, 9, (64, 64), zero_init=False, generator=rng)
    z = torch.randn(7, 12, generator=rng)
    assert not net._runs_fused(z)
    torch.testing.assert_close(torch.jit.script(net)(z), torch.tanh(net.layers(z)), rtol=0, atol=0)


def test_fused_settings_are_checked_and_named():
    with pytest.raises(ConfigError, match="model.residual.fused_precision: expected one of"):
        ResidualConfig(fused_precision="bf16")
    with pytest.raises(ConfigError, match="model.residual.fused: expected true or false"):
        ResidualConfig(fused="cuda")  # type: ignore[arg-type]
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="precision must be one of"):
        mlp_tanh(torch.zeros(2, 3), [net[0], net[2], net[2]], "fp16")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    ("precision", "tolerance"),
    # ieee: float32 products; tf32x3: three TF32 products, near float32; tf32: one, whose
    # 10-bit mantissa gives ~1e-3 of the scale.
    [("ieee", 1e-5), ("tf32x3", 1e-5), ("tf32", 5e-3)],
)
def test_on_cuda_the_fused_network_gives_the_plain_output_and_gradients(rng, precision, tolerance):
    net = ResidualNet(12, 9, (64, 64), zero_init=False, generator=rng, fused_precision=precision)
    net = net.cuda()
    z = torch.randn(70_001, 12, generator=rng).cuda()
    weight = torch.randn(70_001, 9, generator=rng).cuda()
    results = {}
    for fused in (True, False):
        net.fused = fused
        assert net._runs_fused(z) == fused
        net.zero_grad(set_to_none=True)
        leaf = z.clone().requires_grad_(True)
        y = net(leaf)
        (y * weight).sum().backward()
        results[fused] = [y.detach(), leaf.grad] + [p.grad for p in net.parameters()]
    for got, expected in zip(results[True], results[False], strict=True):
        difference = float((got - expected).abs().max() / expected.abs().max())
        assert difference <= tolerance
