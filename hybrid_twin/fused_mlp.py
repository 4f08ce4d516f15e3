"""The residual network as one fused kernel forward and one backward, on CUDA (Triton).

Why: in a training window the network runs at every RK4 stage (800 times over 200 steps).
Through PyTorch each evaluation is three matrix products and their tanh and bias kernels,
and autograd keeps every hidden activation for the backward pass: at batch 131,072 a 64x64
network's activations filled 73 GiB of an H200 and the rollout moved them through memory twice
(benchmarks/gpu_training.md). Here a block of rows keeps its hidden layers in registers: the
forward writes only the output, and the backward recomputes the block's forward from its
inputs (a third more arithmetic, no stored activations) and writes the input gradient and
the block's share of the parameters' gradients, summed afterwards.

`mlp_tanh(z, layers, precision)` computes tanh(W3 tanh(W2 tanh(W1 z + b1) + b2) + b3), what
`ResidualNet` computes, as the custom operator `hybrid_twin::mlp_tanh` with its own autograd
formula, so eager autograd, `torch.compile` (an opaque node in the compiled step) and CUDA graph
capture all take it. `fusable(...)` says where it applies: float32 CUDA tensors, two hidden
layers, every width at most 64 (a block's tiles stay in registers), triton importable.
precision: how `tl.dot` multiplies float32: "ieee" (float32 arithmetic, the default),
"tf32x3" (three TF32 products, near float32) or "tf32" (one, ~3e-4 relative).

Opt-in (`model.residual.fused: true`): correct on an H200 and in Triton's CPU interpreter
(tests/hybrid_twin/test_fused_mlp.py), but its speed inside the compiled, graphed training step
is not measured yet (benchmarks/gpu_training.md, 2026-11-28).
"""

import importlib.util
import math

import torch
from torch import Tensor

MAX_WIDTH = 64
BLOCK_ROWS = 64  # rows per program: 64 x 64 hidden tiles keep 4 warps' registers busy
NUM_WARPS = 4
PRECISIONS = ("ieee", "tf32x3", "tf32")
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
# Forward kernels launched from Python so far (a CUDA graph's replays launch without Python):
# tests and benchmarks read it to tell that a path ran the fused kernels at all.
launches = 0


def _padded(width: int) -> int:
    """Power of two >= max(width, 16): the tile sizes `tl.dot` takes."""
    return max(16, 1 << (width - 1).bit_length())


def fusable(z: Tensor, widths: list[int]) -> bool:
    """Whether `mlp_tanh` runs this network (widths: input, hidden..., output) on z."""
    return (
        TRITON_AVAILABLE
        and z.is_cuda
        and z.dtype == torch.float32
        and len(widths) == 4
        and max(widths) <= MAX_WIDTH
    )


def _shape_args(z: Tensor, w1: Tensor, w2: Tensor, w3: Tensor) -> tuple[list[int], dict]:
    n_in, n_h1, n_h2, n_out = w1.shape[1], w1.shape[0], w2.shape[0], w3.shape[0]
    sizes = [z.shape[0], n_in, n_h1, n_h2, n_out]
    padded = {
        "P_IN": _padded(n_in),
        "P_H1": _padded(n_h1),
        "P_H2": _padded(n_h2),
        "P_OUT": _padded(n_out),
    }
    return sizes, padded


def _grid(n_rows: int) -> tuple[int]:
    return (max(1, -(-n_rows // BLOCK_ROWS)),)


@torch.library.custom_op("hybrid_twin::mlp_tanh", mutates_args=())
def _mlp_tanh(
    z: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
    precision: str,
) -> Tensor:  # fmt: skip
    from hybrid_twin._mlp_triton import mlp_forward_kernel

    global launches
    launches += 1
    sizes, padded = _shape_args(z, w1, w2, w3)
    y = z.new_empty(z.shape[0], w3.shape[0])
    mlp_forward_kernel[_grid(z.shape[0])](
        z, w1, b1, w2, b2, w3, b3, y, *sizes,
        BLOCK_ROWS=BLOCK_ROWS, PRECISION=precision, num_warps=NUM_WARPS, **padded,
    )  # fmt: skip
    return y


@_mlp_tanh.register_fake
def _(z, w1, b1, w2, b2, w3, b3, precision):
    return z.new_empty(z.shape[0], w3.shape[0])


def _parameter_blocks(w1: Tensor, w2: Tensor, w3: Tensor) -> list[tuple[int, int]]:
    """(padded, used) shape of each parameter's gradient in a row of the partial buffer, in
    the order w1, b1, w2, b2, w3, b3 (the backward kernel's layout)."""
    p_in, p_h1, p_h2, p_out = (
        _padded(n) for n in (w1.shape[1], w1.shape[0], w2.shape[0], w3.shape[0])
    )
    return [
        ((p_h1, p_in), tuple(w1.shape)), ((p_h1,), (w1.shape[0],)),
        ((p_h2, p_h1), tuple(w2.shape)), ((p_h2,), (w2.shape[0],)),
        ((p_out, p_h2), tuple(w3.shape)), ((p_out,), (w3.shape[0],)),
    ]  # fmt: skip


def _flat_size(w1: Tensor, w2: Tensor, w3: Tensor) -> int:
    return sum(math.prod(padded) for padded, _ in _parameter_blocks(w1, w2, w3))


@torch.library.custom_op("hybrid_twin::mlp_tanh_backward", mutates_args=())
def _mlp_tanh_backward(
    grad_y: Tensor, z: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor,
    b3: Tensor, precision: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """grad_z and every parameter's gradient, padded and flat (`_parameter_blocks`)."""
    from hybrid_twin._mlp_triton import mlp_backward_kernel

    sizes, padded = _shape_args(z, w1, w2, w3)
    grid = _grid(z.shape[0])
    partial = z.new_empty(grid[0], _flat_size(w1, w2, w3))
    grad_z = torch.empty_like(z)
    mlp_backward_kernel[grid](
        z, w1, b1, w2, b2, w3, b3, grad_y, grad_z, partial, *sizes,
        BLOCK_ROWS=BLOCK_ROWS, PRECISION=precision, num_warps=NUM_WARPS, **padded,
    )  # fmt: skip
    return grad_z, partial.sum(0)


@_mlp_tanh_backward.register_fake
def _(grad_y, z, w1, b1, w2, b2, w3, b3, precision):
    return torch.empty_like(z), z.new_empty(_flat_size(w1, w2, w3))


def _setup_context(ctx, inputs, output) -> None:
    *tensors, precision = inputs
    ctx.save_for_backward(*tensors)
    ctx.precision = precision


def _backward(ctx, grad_y: Tensor):
    z, w1, b1, w2, b2, w3, b3 = ctx.saved_tensors
    grad_z, flat = _mlp_tanh_backward(grad_y.contiguous(), *ctx.saved_tensors, ctx.precision)
    blocks = _parameter_blocks(w1, w2, w3)
    pieces = flat.split([math.prod(padded) for padded, _ in blocks])
    # the used corner of each padded block: grads of (used) shape, views of `flat`
    grads = [
        piece.view(padded)[tuple(slice(0, n) for n in used)]
        for piece, (padded, used) in zip(pieces, blocks, strict=True)
    ]
    return (grad_z, *grads, None)


_mlp_tanh.register_autograd(_backward, setup_context=_setup_context)


def mlp_tanh(z: Tensor, layers: list[torch.nn.Linear], precision: str = "ieee") -> Tensor:
    """tanh of the network `layers` (three Linear, tanh between) on z, fused; see the module doc
    and `fusable`."""
    if precision not in PRECISIONS:
        raise ValueError(f"mlp_tanh: precision must be one of {PRECISIONS}, got {precision!r}")
    first, second, last = layers
    return _mlp_tanh(
        z.contiguous(), first.weight, first.bias, second.weight, second.bias, last.weight,
        last.bias, precision,
    )  # fmt: skip
