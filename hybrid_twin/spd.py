"""Solves with small symmetric positive definite matrices, as the online twin needs them.

Place in the data flow: the EKF's gain (S^-1 with S = H P H^T + R, n_tags x n_tags) and the
monitor's Hotelling T^2 (the used tags' correlation sub-matrix) both solve with an n_tags x
n_tags SPD matrix once per step (hybrid_twin/estimation.py, hybrid_twin/monitoring.py).

Why two ways: eager and TorchScript call LAPACK (`cholesky_ex` + `cholesky_solve`): one op
each, and op count is what costs there. A compiled program (torch.export -> AOTInductor, the
`twin.aoti.pt2` file) cannot fuse a LAPACK call: each one runs through ATen from the C++
program (`cholesky_ex` has no C shim, so even through the proxy executor), with its copies
and checks. While compiling, the same Cholesky factorisation and substitutions are written
out row by row in elementwise ops over the (static, small) matrix size, which the compiler
fuses into the kernels around them: the compiled `update` went from 0.214 to 0.179 ms p50
(benchmarks/online_latency.md). Same algorithm, so the two agree to rounding
(tests/hybrid_twin/test_spd.py).
"""

import torch
from torch import Tensor


def spd_solve(A: Tensor, B: Tensor) -> Tensor:
    """X = A^-1 B for a batch of symmetric positive definite A.

    Args:
        A: (batch, m, m) symmetric positive definite (not checked: a non-PD A gives NaN or
            meaningless numbers, as LAPACK's `cholesky_ex` without its info does).
        B: (batch, m, k).

    Returns:
        X: (batch, m, k).
    """
    if not torch.jit.is_scripting():
        if torch.compiler.is_compiling():
            return unrolled_spd_solve(A, B)
    L, _ = torch.linalg.cholesky_ex(A)
    return torch.cholesky_solve(B, L)


def unrolled_spd_solve(A: Tensor, B: Tensor) -> Tensor:
    """`spd_solve` in elementwise ops, one loop iteration per row (m a Python int): Cholesky
    A = L L^T column by column, then L Y = B forward and L^T X = Y backward."""
    m = A.shape[-1]
    row = torch.arange(m, device=A.device)
    columns: list[Tensor] = []  # columns[j] = L[:, :, j], zero above row j
    for j in range(m):
        s = A[:, :, j]
        if j > 0:
            done = torch.stack(columns, dim=2)  # (batch, m, j)
            s = s - (done * done[:, j : j + 1, :]).sum(dim=2)
        column = s / s[:, j : j + 1].sqrt()
        columns.append(torch.where(row >= j, column, torch.zeros_like(column)))
    L = torch.stack(columns, dim=2)
    y: list[Tensor] = []  # rows of Y, (batch, k) each
    for i in range(m):
        acc = B[:, i]
        for k in range(i):
            acc = acc - L[:, i, k : k + 1] * y[k]
        y.append(acc / L[:, i, i : i + 1])
    x: list[Tensor] = [y[0]] * m  # rows of X, filled from the last
    for i in range(m - 1, -1, -1):
        acc = y[i]
        for k in range(i + 1, m):
            acc = acc - L[:, k, i : i + 1] * x[k]
        x[i] = acc / L[:, i, i : i + 1]
    return torch.stack(x, dim=1)
