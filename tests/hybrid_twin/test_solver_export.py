"""The fixed-step solvers under `torch.export`: one program for any batch and any number of
intervals (a `while_loop`, not an unrolled Python loop), the same states as eager."""

import torch
from torch.export import Dim

from hybrid_twin import build_solver


class _Solve(torch.nn.Module):
    """solver(x0, u, dt, pin_index, pin_values).states with the pins as a buffer."""

    def __init__(self, solver, pin_index):
        super().__init__()
        self.solver = solver
        self.register_buffer("pin_index", pin_index)

    def forward(self, x0, u, pin_values):
        return self.solver(x0, u, 5.0, self.pin_index, pin_values).states


def test_exported_rk4_takes_any_batch_and_length_and_matches_eager(
    cdc_flowsheet, random_hybrid, make_inputs, rng
):
    field = random_hybrid(cdc_flowsheet)
    solver = build_solver(field, {"name": "rk4", "n_substeps": 2})
    module = _Solve(solver, torch.tensor([0])).eval()

    def case(batch, intervals):
        u = make_inputs(cdc_flowsheet, batch, intervals, rng)
        with torch.no_grad():
            x0 = cdc_flowsheet.steady_state(u[:, 0], field.theta())
        pins = 4.0 + 0.1 * torch.rand(batch, intervals, 1, generator=rng, dtype=u.dtype)
        return x0, u, pins

    batch, time = Dim("batch", min=1, max=1024), Dim("intervals", min=1, max=100_000)
    with torch.no_grad():  # an inference program, as the exported twin
        program = torch.export.export(
            module, case(2, 6),
            dynamic_shapes=({0: batch}, {0: batch, 1: time}, {0: batch, 1: time}), strict=False,
        )  # fmt: skip
    # The time loop stays a loop: the graph does not grow with the example's length.
    assert any("while_loop" in str(node.target) for node in program.graph.nodes)
    exported = program.module()
    for batch_size, intervals in ((1, 1), (3, 17), (2, 40)):
        args = case(batch_size, intervals)
        with torch.no_grad():
            expected = module(*args)
            got = exported(*args)
        assert got.shape == (batch_size, intervals + 1, cdc_flowsheet.n_states)
        # Same operations in the same order: bit-identical.
        torch.testing.assert_close(got, expected, rtol=0.0, atol=0.0)
        torch.testing.assert_close(got[:, 1:, 0], args[2][..., 0], rtol=0.0, atol=0.0)
