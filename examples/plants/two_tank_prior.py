"""A mechanistic prior written by a plant's own engineer: two tanks, Torricelli's law.

The worked example of docs/plants.md. It is not part of the unit library: a flowsheet names it
with `_target_: two_tank_prior.TwoTankPrior` (its folder on PYTHONPATH), and `build_flowsheet`
imports it, checks its shapes at the nominal point, and treats it as any library unit. It
must compile with TorchScript, like every unit (the exported twin carries it).

    dh1/dt = q u - a1 sqrt(h1)          dh2/dt = a1 sqrt(h1) - a2 sqrt(h2)          y = h2
"""

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hybrid_twin import AbstractUnit, InputSpec, OutputSpec, ParamSpec, StateSpec

PARAMS = (
    ParamSpec("q_pump", "1/s", 0.05, (1e-4, 1.0), True, "level rise per pump volt"),
    ParamSpec("a1_drain", "V^0.5/s", 0.05, (1e-4, 1.0), True, "upper tank drain"),
    ParamSpec("a2_drain", "V^0.5/s", 0.05, (1e-4, 1.0), True, "lower tank drain"),
)


class TwoTankPrior(AbstractUnit):
    """Upper tank h1 drains into lower tank h2; the sensor reads h2 (V).

    Args:
        name, components: given by the flowsheet.
        nominal_pump_v: typical pump voltage, V.
        params: overrides of q_pump, a1_drain, a2_drain.
    """

    accepts_inflow = False

    def __init__(
        self,
        name: str,
        components: Sequence[str],
        nominal_pump_v: float = 3.0,
        params: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(name, components, PARAMS, params)
        self.state_specs = (
            StateSpec("h1_v", "V", "upper level", 5.0),
            StateSpec("level_v", "V", "lower level", 5.0),
        )
        self.input_specs = (InputSpec("pump_v", "V", (0.0, 10.0), nominal_pump_v),)
        self.output_specs = (OutputSpec("level_v", "V", "lower level sensor"),)

    def derivative(
        self, x: Tensor, u: Tensor, inflow: Tensor, theta: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        drain1 = theta[1] * torch.sqrt(x[:, 0:1].clamp_min(0.0) + 1e-6)
        drain2 = theta[2] * torch.sqrt(x[:, 1:2].clamp_min(0.0) + 1e-6)
        dx = torch.cat([theta[0] * u - drain1, drain1 - drain2], dim=1)
        return dx, torch.zeros_like(inflow)

    def outputs(self, x: Tensor, theta: list[Tensor]) -> Tensor:
        return x[:, 1:2]

    def inventory(self, x: Tensor) -> Tensor:
        return torch.zeros(x.shape[0], self.n_components, dtype=x.dtype, device=x.device)

    def steady_state(self, u: Tensor, inflow: Tensor, theta: list[Tensor]) -> tuple[Tensor, Tensor]:
        h1 = (theta[0] * u.clamp_min(0.0) / theta[1]).pow(2)
        h2 = (theta[0] * u.clamp_min(0.0) / theta[2]).pow(2)
        return torch.cat([h1, h2], dim=1), torch.zeros_like(inflow)
