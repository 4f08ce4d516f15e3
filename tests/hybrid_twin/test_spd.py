"""spd_solve: LAPACK in eager and TorchScript, the written-out Cholesky when compiled; the two
solve the same systems to rounding, also when the matrix's scales differ by orders of magnitude
(the EKF's S mixes tags in % and in mg)."""

import pytest
import torch

from hybrid_twin.spd import spd_solve, unrolled_spd_solve


def random_spd(batch, m, rng, scale_decades=0.0):
    """(batch, m, m) SPD: a well-conditioned core D C D with D spanning scale_decades."""
    root = torch.randn(batch, m, m, generator=rng, dtype=torch.float64)
    core = root @ root.transpose(1, 2) / m + torch.eye(m, dtype=torch.float64)
    d = 10.0 ** (scale_decades * (torch.rand(batch, m, generator=rng, dtype=torch.float64) - 0.5))
    return d.unsqueeze(2) * core * d.unsqueeze(1)


@pytest.mark.parametrize("m", [1, 2, 8])
@pytest.mark.parametrize("scale_decades", [0.0, 8.0])
def test_unrolled_solve_matches_lapack_and_solves_the_system(m, scale_decades, rng):
    A = random_spd(5, m, rng, scale_decades)
    B = torch.randn(5, m, m + 1, generator=rng, dtype=torch.float64)
    X = unrolled_spd_solve(A, B)
    reference = torch.linalg.solve(A, B)
    # Diagonal scaling does not hurt Cholesky: compare in the scaled-out variables.
    d = A.diagonal(dim1=1, dim2=2).sqrt().unsqueeze(2)
    torch.testing.assert_close(X * d, reference * d, rtol=1e-12, atol=1e-12)
    # Backward stability: |A X - B| within a few eps of |A| |X| + |B|, element by element.
    bound = 64 * torch.finfo(torch.float64).eps * (A.abs() @ X.abs() + B.abs())
    assert bool(((A @ X - B).abs() <= bound).all())


def test_unrolled_solve_is_exact_on_a_known_factor():
    # A = L L^T with L = [[2, 0], [1, 3]]: A = [[4, 2], [2, 10]]; A^-1 = [[10, -2], [-2, 4]] / 36.
    A = torch.tensor([[[4.0, 2.0], [2.0, 10.0]]], dtype=torch.float64)
    X = unrolled_spd_solve(A, torch.eye(2, dtype=torch.float64).unsqueeze(0))
    expected = torch.tensor([[[10.0, -2.0], [-2.0, 4.0]]], dtype=torch.float64) / 36.0
    torch.testing.assert_close(X, expected, rtol=0, atol=1e-15)


class _Solve(torch.nn.Module):
    def forward(self, A, B):
        return spd_solve(A, B)


def test_exported_program_uses_the_written_out_solve_and_matches_eager(rng):
    A = random_spd(3, 8, rng, scale_decades=4.0)
    B = torch.randn(3, 8, 2, generator=rng, dtype=torch.float64)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(_Solve(), (A, B), dynamic_shapes=({0: batch}, {0: batch}))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "cholesky" in t], targets  # no LAPACK call to fuse around
    A2 = random_spd(5, 8, rng, scale_decades=4.0)  # another batch size than the traced one
    B2 = torch.randn(5, 8, 2, generator=rng, dtype=torch.float64)
    eager = spd_solve(A2, B2)
    d = A2.diagonal(dim1=1, dim2=2).sqrt().unsqueeze(2)
    torch.testing.assert_close(program.module()(A2, B2) * d, eager * d, rtol=1e-12, atol=1e-12)


def test_scripted_solve_is_lapack_like_eager(rng):
    A = random_spd(4, 8, rng)
    B = torch.randn(4, 8, 3, generator=rng, dtype=torch.float64)
    scripted = torch.jit.script(spd_solve)
    assert "cholesky_solve" in scripted.code and "unrolled" not in scripted.code
    assert torch.equal(scripted(A, B), spd_solve(A, B))
