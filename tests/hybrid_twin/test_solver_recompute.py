"""RK4 with `recompute` (activation checkpointing per interval): same states, same gradients,
far fewer tensors kept for the backward pass."""

import torch

from hybrid_twin import build_solver


def _saved_bytes(run) -> int:
    """Bytes autograd saves for the backward pass while `run()` builds the graph."""
    saved = [0]

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return saved[0]


def test_recompute_gives_the_same_states_and_gradients_and_saves_less(
    cdc_flowsheet, random_hybrid, make_inputs, rng
):
    field = random_hybrid(cdc_flowsheet)
    u = make_inputs(cdc_flowsheet, 3, 12, rng)
    with torch.no_grad():
        x0 = cdc_flowsheet.steady_state(u[:, 0], field.theta())
    pin_index = torch.tensor([0])
    pin_values = u[:, :, :1] * 0.0 + 4.0  # a pinned hopper mass, as the twin pins load cells
    results, saved = [], []
    for recompute in (False, True):
        solver = build_solver(field, {"name": "rk4", "n_substeps": 2, "recompute": recompute})
        field.zero_grad(set_to_none=True)
        out = {}

        def run(solver=solver, out=out):
            out["states"] = solver(x0, u, 5.0, pin_index, pin_values).states

        saved.append(_saved_bytes(run))
        (out["states"] / field.state_normaliser.std).pow(2).mean().backward()
        grads = [p.grad.clone() for p in field.parameters() if p.grad is not None]
        results.append((out["states"].detach(), grads))
    (states, grads), (states_rc, grads_rc) = results
    assert len(grads) == len(grads_rc) > 0
    # The recomputation runs the very same operations: bit-identical.
    torch.testing.assert_close(states_rc, states, rtol=0.0, atol=0.0)
    for g_rc, g in zip(grads_rc, grads, strict=True):
        torch.testing.assert_close(g_rc, g, rtol=0.0, atol=0.0)
    # Kept: about one state per interval instead of every stage's activations.
    assert saved[1] < saved[0] / 10, saved


def test_recompute_is_ignored_without_gradients_and_when_scripted(
    cdc_flowsheet, random_hybrid, make_inputs, rng
):
    field = random_hybrid(cdc_flowsheet)
    u = make_inputs(cdc_flowsheet, 2, 5, rng)
    with torch.no_grad():
        x0 = cdc_flowsheet.steady_state(u[:, 0], field.theta())
        plain = build_solver(field, "rk4")(x0, u, 5.0).states
        recompute = build_solver(field, {"name": "rk4", "recompute": True})
        torch.testing.assert_close(recompute(x0, u, 5.0).states, plain, rtol=0.0, atol=0.0)
        scripted = torch.jit.script(recompute)
        torch.testing.assert_close(scripted(x0, u, 5.0).states, plain, rtol=0.0, atol=0.0)
