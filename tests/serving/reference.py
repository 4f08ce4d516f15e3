"""The service's answers recomputed with the twin file alone, one line at a time (batch 1).

What a session returns for a row must equal `update` of the plain TorchScript twin over the
same rows, gaps bridged the documented way (inputs held, nothing measured).
"""

import math
from datetime import datetime

import torch


def tensors(rows: list[dict], metadata: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, T, n_u) inputs and (1, T, n_y) measurements (NaN = not sampled) of service rows."""
    u = [[r["inputs"][t] for t in metadata["input_tags"]] for r in rows]
    y = [[math.nan if r["measurements"].get(t) is None else r["measurements"][t]
          for t in metadata["measurement_tags"]] for r in rows]  # fmt: skip
    return torch.tensor([u], dtype=torch.float64), torch.tensor([y], dtype=torch.float64)


def replay(twin, metadata: dict, past: list[dict], rows: list[dict]) -> list[tuple]:
    """initial_state on `past`, then one `update` per row (gaps bridged); the update outputs
    of each row, in order."""
    dt = float(metadata["dt_s"])
    past_u, past_y = tensors(past, metadata)
    outputs = []
    with torch.no_grad():
        state = tuple(twin.initial_state(past_u, past_y))
        last = datetime.fromisoformat(past[-1]["timestamp"])
        for row in rows:
            now = datetime.fromisoformat(row["timestamp"])
            steps = round((now - last).total_seconds() / dt)
            u, y = tensors([row], metadata)
            nothing = torch.zeros_like(y[:, 0], dtype=torch.bool)
            for _ in range(steps - 1):
                state = tuple(twin.update(*state, state[2], y[:, 0] * math.nan, nothing)[:5])
            out = twin.update(*state, u[:, 0], y[:, 0], torch.isfinite(y[:, 0]))
            state = tuple(out[:5])
            outputs.append(out)
            last = now
    return outputs
