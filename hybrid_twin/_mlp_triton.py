"""Triton kernels of `hybrid_twin.fused_mlp`: a tanh network of two hidden layers, forward and
backward, each one kernel over a block of rows.

Needs triton (part of PyTorch's CUDA builds on Linux); imported only when a kernel runs.
Every width is padded to a power of two >= 16 (what `tl.dot` takes) by masked loads that
read zeros: a padded hidden unit computes tanh(0) = 0 and a padded output is never stored,
so the padding changes nothing. The backward pass recomputes the forward from the block's
inputs instead of reading saved activations, and writes each block's share of the weight and
bias gradients to its own row of a partial buffer that the caller sums (deterministic, no
atomics).
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # exp form: libdevice's tanh is not in Triton's CPU interpreter, which the tests run;
    # the error is a few units in the last place of 1 (absolute)
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0.0, -y, y)


@triton.jit
def _tile(ptr, rows, cols, n_rows, n_cols):
    """(len(rows), len(cols)) tile of the row-major (n_rows, n_cols) matrix, zeros outside."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _vector(ptr, cols, n):
    return tl.load(ptr + cols, mask=cols < n, other=0.0)


@triton.jit
def _forward(z, w1, b1, w2, b2, w3, b3, PRECISION: tl.constexpr):
    """Hidden activations and output of one block; the weights are (out, in) tiles."""
    h1 = _tanh(tl.dot(z, tl.trans(w1), input_precision=PRECISION) + b1[None, :])
    h2 = _tanh(tl.dot(h1, tl.trans(w2), input_precision=PRECISION) + b2[None, :])
    y = _tanh(tl.dot(h2, tl.trans(w3), input_precision=PRECISION) + b3[None, :])
    return h1, h2, y


@triton.jit
def mlp_forward_kernel(
    z_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, y_ptr,
    n_rows, n_in, n_h1, n_h2, n_out,
    BLOCK_ROWS: tl.constexpr, P_IN: tl.constexpr, P_H1: tl.constexpr, P_H2: tl.constexpr,
    P_OUT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c_in, c_h1 = tl.arange(0, P_IN), tl.arange(0, P_H1)
    c_h2, c_out = tl.arange(0, P_H2), tl.arange(0, P_OUT)
    _, _, y = _forward(
        _tile(z_ptr, rows, c_in, n_rows, n_in),
        _tile(w1_ptr, c_h1, c_in, n_h1, n_in), _vector(b1_ptr, c_h1, n_h1),
        _tile(w2_ptr, c_h2, c_h1, n_h2, n_h1), _vector(b2_ptr, c_h2, n_h2),
        _tile(w3_ptr, c_out, c_h2, n_out, n_h2), _vector(b3_ptr, c_out, n_out),
        PRECISION,
    )  # fmt: skip
    mask = (rows[:, None] < n_rows) & (c_out[None, :] < n_out)
    tl.store(y_ptr + rows[:, None] * n_out + c_out[None, :], y, mask=mask)


@triton.jit
def mlp_backward_kernel(
    z_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, grad_y_ptr, grad_z_ptr, partial_ptr,
    n_rows, n_in, n_h1, n_h2, n_out,
    BLOCK_ROWS: tl.constexpr, P_IN: tl.constexpr, P_H1: tl.constexpr, P_H2: tl.constexpr,
    P_OUT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """grad_z for the block's rows; the block's weight and bias gradients, padded, into its
    row of partial: w1 (P_H1, P_IN), b1, w2 (P_H2, P_H1), b2, w3 (P_OUT, P_H2), b3."""
    block = tl.program_id(0)
    rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c_in, c_h1 = tl.arange(0, P_IN), tl.arange(0, P_H1)
    c_h2, c_out = tl.arange(0, P_H2), tl.arange(0, P_OUT)
    z = _tile(z_ptr, rows, c_in, n_rows, n_in)
    w1 = _tile(w1_ptr, c_h1, c_in, n_h1, n_in)
    w2 = _tile(w2_ptr, c_h2, c_h1, n_h2, n_h1)
    w3 = _tile(w3_ptr, c_out, c_h2, n_out, n_h2)
    h1, h2, y = _forward(
        z, w1, _vector(b1_ptr, c_h1, n_h1), w2, _vector(b2_ptr, c_h2, n_h2),
        w3, _vector(b3_ptr, c_out, n_out), PRECISION,
    )  # fmt: skip
    # Rows past n_rows read grad 0, so they add nothing to the parameters' gradients.
    g3 = _tile(grad_y_ptr, rows, c_out, n_rows, n_out) * (1.0 - y * y)
    g2 = tl.dot(g3, w3, input_precision=PRECISION) * (1.0 - h2 * h2)
    g1 = tl.dot(g2, w2, input_precision=PRECISION) * (1.0 - h1 * h1)
    grad_z = tl.dot(g1, w1, input_precision=PRECISION)
    mask = (rows[:, None] < n_rows) & (c_in[None, :] < n_in)
    tl.store(grad_z_ptr + rows[:, None] * n_in + c_in[None, :], grad_z, mask=mask)

    out = partial_ptr + block * (P_H1 * P_IN + P_H1 + P_H2 * P_H1 + P_H2 + P_OUT * P_H2 + P_OUT)
    dw1 = tl.dot(tl.trans(g1), z, input_precision=PRECISION)
    tl.store(out + c_h1[:, None] * P_IN + c_in[None, :], dw1)
    out += P_H1 * P_IN
    tl.store(out + c_h1, tl.sum(g1, axis=0))
    out += P_H1
    dw2 = tl.dot(tl.trans(g2), h1, input_precision=PRECISION)
    tl.store(out + c_h2[:, None] * P_H1 + c_h1[None, :], dw2)
    out += P_H2 * P_H1
    tl.store(out + c_h2, tl.sum(g2, axis=0))
    out += P_H2
    dw3 = tl.dot(tl.trans(g3), h2, input_precision=PRECISION)
    tl.store(out + c_out[:, None] * P_H2 + c_h2[None, :], dw3)
    out += P_OUT * P_H2
    tl.store(out + c_out, tl.sum(g3, axis=0))
