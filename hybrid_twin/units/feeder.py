"""Loss-in-weight (gravimetric) feeder: hopper mass and delivered feed rate of one component.

First unit of the line. Its outlet stream carries only its own component; what it delivers
is what the feeder's load cell reports as mass flow.

    dM/dt = -F s(M) / 3600                      [kg/s]
    dF/dt = (f F_sp - F) / tau                  [kg/h per s]
    out_c = F s(M) e_c                          [kg/h]
    s(M)  = tanh(M / M_starve)

F is the feed rate the gravimetric controller drives toward the setpoint F_sp with a first-order
response (time constant tau); the feed factor f is the delivered/setpoint ratio it settles at
(1 for a perfectly calibrated feeder). s(M) starves the screw as the hopper empties, so the
hopper mass cannot become negative: at M = 0 its derivative is 0 (tanh rather than
1 - exp(-M/M_starve) keeps s bounded if a residual pushes M below 0). Refills are not modelled
(no input carries them); the state estimator resets the hopper mass instead.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hybrid_twin.errors import ConfigError
from hybrid_twin.specs import InputSpec, OutputSpec, ParamSpec, StateSpec
from hybrid_twin.units.base import AbstractUnit

FEEDER_PARAMS = (
    ParamSpec("feed_factor", "1", 1.0, (0.5, 1.5), True, "delivered / setpoint at steady state"),
    # Lower bound 2 s keeps dt/tau <= 2.5 at the 5 s data grid with one RK4 step (stable).
    ParamSpec("response_tau_s", "s", 5.0, (2.0, 300.0), True, "gravimetric control time constant"),
    ParamSpec(
        "starve_mass_kg", "kg", 0.05, (1e-4, 10.0), False, "hopper mass where the screw starves"
    ),
)


class LossInWeightFeeder(AbstractUnit):
    """Loss-in-weight feeder of one component.

    States: hopper_mass_kg (kg), feed_rate_kg_h (kg/h). Input: mass_flow_sp_kg_h (kg/h).
    Outputs: mass_flow_kg_h (delivered, kg/h), hopper_mass_kg (kg).

    Args:
        name: unit name.
        components: flowsheet component names.
        component: which component this feeder doses.
        nominal_flow_kg_h: typical setpoint, kg/h (input normalisation, steady state).
        flow_range_kg_h: valid setpoint range (low, high), kg/h.
        hopper_nominal_kg: typical hopper fill, kg (steady state and normalisation).
        params: parameter overrides (feed_factor, response_tau_s, starve_mass_kg).

    Raises:
        ConfigError: unknown component, non-positive nominal values, bad parameter overrides.
    """

    accepts_inflow = False  # refills are not a stream: no unit may feed a feeder

    def __init__(
        self,
        name: str,
        components: Sequence[str],
        component: str,
        nominal_flow_kg_h: float,
        flow_range_kg_h: Sequence[float] = (0.0, 100.0),
        hopper_nominal_kg: float = 10.0,
        params: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(name, components, FEEDER_PARAMS, params)
        low, high = (float(v) for v in flow_range_kg_h)
        if not (0.0 <= low <= nominal_flow_kg_h <= high and nominal_flow_kg_h > 0):
            raise ConfigError(
                f"{name}: nominal_flow_kg_h {nominal_flow_kg_h} kg/h must be > 0 and inside "
                f"flow_range_kg_h [{low}, {high}] kg/h"
            )
        if hopper_nominal_kg <= 0:
            raise ConfigError(f"{name}.hopper_nominal_kg: expected > 0 kg, got {hopper_nominal_kg}")
        self.component = component
        index = self._component_index(component, "component")
        onehot = torch.zeros(1, self.n_components)
        onehot[0, index] = 1.0
        self.register_buffer("onehot", onehot)
        self.hopper_nominal_kg = float(hopper_nominal_kg)
        self.state_specs = (
            StateSpec("hopper_mass_kg", "kg", "material in the hopper", hopper_nominal_kg),
            StateSpec(
                "feed_rate_kg_h", "kg/h", "feed rate the controller drives", nominal_flow_kg_h
            ),
        )
        self.input_specs = (
            InputSpec(
                "mass_flow_sp_kg_h", "kg/h", (low, high), float(nominal_flow_kg_h), "setpoint"
            ),
        )
        self.output_specs = (
            OutputSpec("mass_flow_kg_h", "kg/h", "delivered mass flow (load cell)"),
            OutputSpec("hopper_mass_kg", "kg", "hopper mass (load cell)"),
        )

    def _delivered(self, x: Tensor, theta: list[Tensor]) -> Tensor:
        hopper, rate = x.narrow(1, 0, 1), x.narrow(1, 1, 1)
        starve_mass = theta[2]
        return rate * torch.tanh(hopper / starve_mass)

    def derivative(
        self, x: Tensor, u: Tensor, inflow: Tensor, theta: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """See `AbstractUnit.derivative`; `inflow` is ignored (a feeder has no upstream)."""
        delivered = self._delivered(x, theta)
        feed_factor, tau = theta[0], theta[1]
        d_rate = (feed_factor * u - x.narrow(1, 1, 1)) / tau
        d_hopper = delivered * (-1.0 / 3600.0)
        return torch.cat([d_hopper, d_rate], dim=1), delivered * self.onehot

    def outputs(self, x: Tensor, theta: list[Tensor]) -> Tensor:
        """[mass_flow_kg_h, hopper_mass_kg], (batch, 2)."""
        return torch.cat([self._delivered(x, theta), x.narrow(1, 0, 1)], dim=1)

    def inventory(self, x: Tensor) -> Tensor:
        """Hopper mass in the feeder's component column, (batch, n_components), kg."""
        return x.narrow(1, 0, 1) * self.onehot

    def steady_state(self, u: Tensor, inflow: Tensor, theta: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Feed rate at f * F_sp with the hopper at its nominal fill."""
        hopper = torch.full_like(u, self.hopper_nominal_kg)
        x = torch.cat([hopper, theta[0] * u], dim=1)
        return x, self._delivered(x, theta) * self.onehot
