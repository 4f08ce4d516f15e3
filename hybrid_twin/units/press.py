"""Rotary tablet press: feed frame residence, tablet weight control, API content and force.

Last unit of the line; its outlet stream is the tablets leaving the line.

    dm_1/dt = in / 3600 - k m_1, dm_j/dt = k (m_(j-1) - m_j),  k = n / tau_frame   feed frame [kg/s]
    dW/dt   = (W_sp - W) / tau_W                                                    weight [mg/s]
    API     = 100 W x_api / LC                       tablet API content [%LC]
    F_c     = F_ref (W / W_ref)^p                    main compression force [kN]
    turret  = out * 1e6 / (W * stations * 60)       turret speed [rpm]

The feed frame (n small tanks in series, mean residence tau_frame) adds the last delay and
mixing before compression; x_api is the API mass fraction of its last tank. The press's weight
control loop drives the fill depth so tablet weight W follows its setpoint with time constant
tau_W; at a fixed punch gap a heavier fill compacts harder, hence the power law for force.
LC is the label claim, the nominal API mass per tablet.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hybrid_twin.errors import ConfigError
from hybrid_twin.specs import InputSpec, OutputSpec, ParamSpec, StateSpec
from hybrid_twin.units.base import AbstractUnit, positive_int, tank_state_specs, tanks_in_series

PRESS_PARAMS = (
    ParamSpec(
        "frame_residence_s", "s", 20.0, (2.0, 600.0), True, "mean residence time of the feed frame"
    ),
    ParamSpec(
        "weight_tau_s", "s", 30.0, (2.0, 1800.0), True, "tablet weight control time constant"
    ),
    ParamSpec("label_claim_mg", "mg", 40.0, (1e-3, 2000.0), False, "nominal API mass per tablet"),
    ParamSpec("force_ref_kN", "kN", 15.0, (0.5, 80.0), True, "compression force at weight_ref_mg"),
    ParamSpec("weight_ref_mg", "mg", 400.0, (1.0, 5000.0), False, "reference tablet weight"),
    ParamSpec("force_weight_exp", "1", 3.0, (0.5, 10.0), True, "p in F_c ~ W^p"),
)


class TabletPress(AbstractUnit):
    """Tablet press with a tanks-in-series feed frame.

    States: frame<j>.<component>_kg for j = 1..n_frame_tanks (component-fastest), then
    tablet_weight_mg. Input: weight_sp_mg. Outputs: tablet_weight_mg, tablet_api_pct_lc,
    comp_force_kN, turret_speed_rpm, frame_holdup_kg.

    Args:
        name: unit name.
        components: flowsheet component names.
        api_component: the component whose content is reported in %LC.
        n_frame_tanks: tanks in series representing the feed frame.
        nominal_weight_mg: typical weight setpoint, mg.
        weight_range_mg: valid setpoint range (low, high), mg.
        stations: punch stations on the turret (turret speed output).
        nominal_holdup_kg: typical feed frame mass, kg (normalisation only).
        params: parameter overrides (see PRESS_PARAMS).

    Raises:
        ConfigError: unknown api_component, bad integers or ranges, bad overrides.
    """

    def __init__(
        self,
        name: str,
        components: Sequence[str],
        api_component: str = "api",
        n_frame_tanks: int = 1,
        nominal_weight_mg: float = 400.0,
        weight_range_mg: Sequence[float] = (50.0, 1000.0),
        stations: int = 24,
        nominal_holdup_kg: float = 0.15,
        params: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(name, components, PRESS_PARAMS, params)
        self.api_index = self._component_index(api_component, "api_component")
        self.n_frame_tanks = positive_int(n_frame_tanks, "n_frame_tanks", name)
        self.stations = float(positive_int(stations, "stations", name))
        low, high = (float(v) for v in weight_range_mg)
        if not (0.0 < low <= nominal_weight_mg <= high):
            raise ConfigError(
                f"{name}: nominal_weight_mg {nominal_weight_mg} outside [{low}, {high}] mg "
                "(low > 0)"
            )
        self.n_tank_states = self.n_frame_tanks * self.n_components
        self.state_specs = (
            *tank_state_specs(
                "frame", self.n_frame_tanks, self.components, nominal_holdup_kg / self.n_frame_tanks
            ),
            StateSpec("tablet_weight_mg", "mg", "mean tablet weight", nominal_weight_mg),
        )
        self.input_specs = (InputSpec("weight_sp_mg", "mg", (low, high), float(nominal_weight_mg)),)
        self.output_specs = (
            OutputSpec("tablet_weight_mg", "mg", "mean tablet weight"),
            OutputSpec("tablet_api_pct_lc", "%LC", "tablet API content, percent of label claim"),
            OutputSpec("comp_force_kN", "kN", "main compression force"),
            OutputSpec("turret_speed_rpm", "rpm", "turret speed that matches the throughput"),
            OutputSpec("frame_holdup_kg", "kg", "material in the feed frame"),
        )

    def _frame(self, x: Tensor) -> Tensor:
        return x.narrow(1, 0, self.n_tank_states).reshape(
            x.shape[0], self.n_frame_tanks, self.n_components
        )

    def derivative(
        self, x: Tensor, u: Tensor, inflow: Tensor, theta: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """See `AbstractUnit.derivative`."""
        weight = x.narrow(1, self.n_tank_states, 1)
        rate = self.n_frame_tanks / theta[0]
        d_mass, out_kg_s = tanks_in_series(self._frame(x), inflow * (1.0 / 3600.0), rate)
        d_weight = (u - weight) / theta[1]
        return torch.cat([d_mass.flatten(1), d_weight], dim=1), out_kg_s * 3600.0

    def outputs(self, x: Tensor, theta: list[Tensor]) -> Tensor:
        """[tablet_weight_mg, tablet_api_pct_lc, comp_force_kN, turret_speed_rpm,
        frame_holdup_kg], (batch, 5)."""
        frame = self._frame(x)
        weight = x.narrow(1, self.n_tank_states, 1)
        last = frame.select(1, -1)
        last_kg = last.sum(dim=1, keepdim=True)
        # The floor only acts on an empty feed frame (< 1e-12 kg): 0 %LC there instead of 0/0.
        api_fraction = last.narrow(1, self.api_index, 1) / last_kg.clamp_min(1e-12)
        api_lc = weight * api_fraction * 100.0 / theta[2]
        force = theta[3] * torch.pow(weight / theta[4], theta[5])
        out_kg_h = last_kg * (self.n_frame_tanks * 3600.0) / theta[0]
        turret = out_kg_h * (1e6 / (60.0 * self.stations)) / weight
        holdup = frame.flatten(1).sum(dim=1, keepdim=True)
        return torch.cat([weight, api_lc, force, turret, holdup], dim=1)

    def inventory(self, x: Tensor) -> Tensor:
        """Component masses in the feed frame, (batch, n_components), kg."""
        return self._frame(x).sum(dim=1)

    def steady_state(self, u: Tensor, inflow: Tensor, theta: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Each frame tank holds in * tau_frame / (3600 n); weight at its setpoint."""
        tank = inflow * theta[0] / (3600.0 * self.n_frame_tanks)
        tanks = tank.unsqueeze(1).expand(-1, self.n_frame_tanks, -1).flatten(1)
        return torch.cat([tanks, u], dim=1), inflow
