"""Continuous blender: N mixed tanks in series, hold-up depending on throughput and speed.

Sits between the feeders and the press; the NIR probe sees the composition of its last tank.

    H(F, w)  = H_ref (F / F_ref)^a (w_ref / w)^b         total hold-up at steady state [kg]
    k        = N F / (3600 H(F, w))                      per-tank outflow rate [1/s]
                                                         (1/k smoothly floored at 2 s)
    dm_1/dt  = in / 3600 - k m_1,  dm_i/dt = k (m_(i-1) - m_i)     per component [kg/s]
    dw/dt    = (w_sp - w) / tau_drive                    impeller speed [rpm/s]

F is the blender's throughput (summed inflow, kg/h) and w the impeller speed (rpm); both pass
through a smooth floor (softplus, width `flow_floor_kg_h` / `speed_floor_rpm`, exact above
~20 widths) so the law stays finite when feeding or the impeller stops; a <= 1 keeps k finite
as F goes to 0. At constant F and w
each tank holds H/N and a tracer leaves with the Erlang (gamma) residence time distribution
E(t) = t^(N-1) e^(-k t) k^N / (N-1)!, mean N/k = H/F. The real blender's hold-up is more
nonlinear (dead zones, speed thresholds); that is what the hybrid residual is there to learn.
"""

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hybrid_twin.errors import ConfigError
from hybrid_twin.specs import InputSpec, OutputSpec, ParamSpec, StateSpec
from hybrid_twin.units.base import (
    AbstractUnit,
    floored_residence_s,
    positive_int,
    tank_state_specs,
    tanks_in_series,
)

BLENDER_PARAMS = (
    ParamSpec(
        "holdup_ref_kg", "kg", 0.6, (0.1, 20.0), True, "hold-up at reference throughput and speed"
    ),
    ParamSpec("throughput_ref_kg_h", "kg/h", 30.0, (0.1, 1000.0), False, "reference throughput"),
    ParamSpec("speed_ref_rpm", "rpm", 400.0, (1.0, 5000.0), False, "reference impeller speed"),
    # a <= 1: hold-up grows no faster than throughput (mean residence time falls with F).
    ParamSpec("holdup_flow_exp", "1", 0.5, (0.0, 1.0), True, "a in H ~ F^a"),
    ParamSpec("holdup_speed_exp", "1", 0.5, (0.0, 2.0), True, "b in H ~ w^-b"),
    ParamSpec("drive_tau_s", "s", 3.0, (2.0, 120.0), True, "impeller speed response time constant"),
)


class TanksInSeriesBlender(AbstractUnit):
    """Tanks-in-series continuous blender.

    States: tank<i>.<component>_kg for i = 1..n_tanks (component-fastest), then speed_rpm.
    Input: speed_sp_rpm. Outputs: speed_rpm, holdup_kg, <component>_conc_pct_ww (outlet
    composition, %w/w) for each component.

    Args:
        name: unit name.
        components: flowsheet component names.
        n_tanks: number of tanks N (sets the RTD's shape; variance = mean^2 / N).
        nominal_speed_rpm: typical impeller speed setpoint, rpm.
        speed_range_rpm: valid setpoint range (low, high), rpm.
        flow_floor_kg_h: width of the smooth throughput floor, kg/h.
        speed_floor_rpm: width of the smooth speed floor, rpm.
        params: parameter overrides (see BLENDER_PARAMS).

    Raises:
        ConfigError: n_tanks not a positive integer, bad floors or ranges, bad overrides.
    """

    def __init__(
        self,
        name: str,
        components: Sequence[str],
        n_tanks: int = 5,
        nominal_speed_rpm: float = 400.0,
        speed_range_rpm: Sequence[float] = (0.0, 1500.0),
        flow_floor_kg_h: float = 0.1,
        speed_floor_rpm: float = 5.0,
        params: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(name, components, BLENDER_PARAMS, params)
        self.n_tanks = positive_int(n_tanks, "n_tanks", name)
        low, high = (float(v) for v in speed_range_rpm)
        if not (low <= nominal_speed_rpm <= high and nominal_speed_rpm > 0):
            raise ConfigError(
                f"{name}: nominal_speed_rpm {nominal_speed_rpm} outside ({low}, {high}] rpm"
            )
        if flow_floor_kg_h <= 0 or speed_floor_rpm <= 0:
            raise ConfigError(f"{name}: flow_floor_kg_h and speed_floor_rpm must be > 0")
        self.flow_beta = 1.0 / float(flow_floor_kg_h)
        self.speed_beta = 1.0 / float(speed_floor_rpm)
        self.flow_epsilon = 1e-6 * float(flow_floor_kg_h)
        self.speed_epsilon = 1e-6 * float(speed_floor_rpm)
        self.n_tank_states = self.n_tanks * self.n_components
        tank_kg = self.param_value("holdup_ref_kg")
        self.state_specs = (
            *tank_state_specs("tank", self.n_tanks, self.components, tank_kg / self.n_tanks),
            StateSpec("speed_rpm", "rpm", "impeller speed", nominal_speed_rpm),
        )
        self.input_specs = (
            InputSpec("speed_sp_rpm", "rpm", (low, high), float(nominal_speed_rpm)),
        )
        self.output_specs = (
            OutputSpec("speed_rpm", "rpm", "impeller speed (tachometer)"),
            OutputSpec("holdup_kg", "kg", "total mass in the blender"),
            *(
                OutputSpec(f"{c}_conc_pct_ww", "%w/w", f"{c} mass fraction at the outlet")
                for c in components
            ),
        )

    def rate_1_s(self, throughput_kg_h: Tensor, speed_rpm: Tensor, theta: list[Tensor]) -> Tensor:
        """Per-tank outflow rate k = N F / (3600 H(F, w)), (batch, 1), 1/s.

        Written as k = N F_ref / (3600 H_ref) (F / F_ref)^(1 - a) (w / w_ref)^b, which stays
        finite as F or w go to 0 (a <= 1, b >= 0); the floors keep F and w strictly positive
        even where float32's softplus underflows (a millionth of their width). 1/k has the
        line's smooth 2 s floor (`floored_residence_s`): the bounds of H_ref, a and b alone
        allow k of several 1/s at a high throughput and speed, where a 5 s RK4 step diverges.
        """
        holdup_ref, flow_ref, speed_ref = theta[0], theta[1], theta[2]
        flow = F.softplus(throughput_kg_h, beta=self.flow_beta) + self.flow_epsilon
        speed = F.softplus(speed_rpm, beta=self.speed_beta) + self.speed_epsilon
        rate = torch.pow(flow / flow_ref, 1.0 - theta[3]) * torch.pow(speed / speed_ref, theta[4])
        rate = rate * flow_ref * (self.n_tanks / 3600.0) / holdup_ref
        return 1.0 / floored_residence_s(1.0 / rate)

    def mean_residence_time_s(
        self, throughput_kg_h: Tensor, speed_rpm: Tensor, theta: list[Tensor]
    ) -> Tensor:
        """Mean residence time N / k = H(F, w) / F, (batch, 1), s."""
        return self.n_tanks / self.rate_1_s(throughput_kg_h, speed_rpm, theta)

    def _tanks(self, x: Tensor) -> Tensor:
        return x.narrow(1, 0, self.n_tank_states).unflatten(1, (self.n_tanks, self.n_components))

    def derivative(
        self, x: Tensor, u: Tensor, inflow: Tensor, theta: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """See `AbstractUnit.derivative`."""
        speed = x.narrow(1, self.n_tank_states, 1)
        rate = self.rate_1_s(inflow.sum(dim=1, keepdim=True), speed, theta)
        d_mass, out_kg_s = tanks_in_series(self._tanks(x), inflow * (1.0 / 3600.0), rate)
        d_speed = (u - speed) / theta[5]
        return torch.cat([d_mass.flatten(1), d_speed], dim=1), out_kg_s * 3600.0

    def outputs(self, x: Tensor, theta: list[Tensor]) -> Tensor:
        """[speed_rpm, holdup_kg, <c>_conc_pct_ww...], (batch, 2 + n_components)."""
        tanks = self._tanks(x)
        last = tanks.select(1, -1)
        # The floor only acts on an empty last tank (< 1e-12 kg): 0 %w/w there instead of 0/0.
        conc = last * 100.0 / last.sum(dim=1, keepdim=True).clamp_min(1e-12)
        holdup = tanks.flatten(1).sum(dim=1, keepdim=True)
        return torch.cat([x.narrow(1, self.n_tank_states, 1), holdup, conc], dim=1)

    def inventory(self, x: Tensor) -> Tensor:
        """Component masses summed over the tanks, (batch, n_components), kg."""
        return self._tanks(x).sum(dim=1)

    def steady_state(self, u: Tensor, inflow: Tensor, theta: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Each tank holds in / (3600 k) of each component; speed at its setpoint."""
        rate = self.rate_1_s(inflow.sum(dim=1, keepdim=True), u, theta)
        tank = inflow / (3600.0 * rate)
        tanks = tank.unsqueeze(1).expand(-1, self.n_tanks, -1).flatten(1)
        return torch.cat([tanks, u], dim=1), inflow
