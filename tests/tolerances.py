"""Tolerances keyed by purpose and dtype (STYLE.md). A looser value carries its reason."""

import torch

TOLERANCES = {
    "algebra": {torch.float64: 1e-12, torch.float32: 1e-5},
    "solver_vs_torchdiffeq": {torch.float64: 1e-9, torch.float32: 1e-5},
    "scripted_vs_eager": {torch.float64: 1e-6, torch.float32: 1e-5},
    # Finite differences in float64 with h ~ 1e-6 leave about 1e-7 relative truncation error.
    "finite_difference": {torch.float64: 1e-5},
}


def tol(purpose: str, dtype: torch.dtype = torch.float64) -> float:
    return TOLERANCES[purpose][dtype]
