"""Continuous blender: N mixed tanks in series, hold-up depending on throughput and speed.

Sits between the feeders and the press; the NIR probe sees the composition of its last tank.

    H(F, w)  = H_ref (F / F_ref)^a (w_ref / w)^b         total hold-up at steady state [kg]
    Q(M, w)  = F_ref (M / H_ref)^(1/a) (w / w_ref)^(b/a) discharge of a blender holding M [kg/h]
    k_i      = N Q(N m_i, w) / (3600 N m_i)              outflow rate of tank i [1/s]
                                                         (1/k_i smoothly floored at 2 s / a)
    dm_1/dt  = in / 3600 - k_1 m_1,  dm_i/dt = k_(i-1) m_(i-1) - k_i m_i   per component [kg/s]
    dw/dt    = (w_sp - w) / tau_drive                    impeller speed [rpm/s]

m_i is the mass tank i holds (all components) and Q the inverse of the hold-up law: each tank
discharges according to its own hold-up, not the feed (a cascade of hold-up laws). When feeding
stops, the blender goes on discharging what it holds (the discharge is continuous at the
stop), slower as it empties; when feeding starts, it discharges little until its hold-up has
built up. (k from the feed F instead, N F / (3600 H(F, w)), has the same steady states but
stops the discharge within a second of a feed stop, with the hold-up left in the blender.)

Why per tank, and the floor: a tank discharging q(m) = k(m) m relaxes its mass at the rate
dq/dm = k / a. With each tank's rate a function of its own mass, the Jacobian of the tank
masses is lower triangular, its eigenvalues are -k_i / a, real, and the floor 1/k >= 2 s / a
keeps h dq/dm <= 2.5 < 2.785 for one RK4 step of h = 5 s (the project's default solver) at
every point of the parameter box, and each tank's step is a stable scalar map driven by the
tank before it. (One rate for all tanks from the total hold-up M splits the tanks' Jordan block
into complex eigenvalues, about -k (1/a - 1) / N and k (e^(2 pi i j / N) - 1): one RK4 step per
5 s was unstable, or found a spurious periodic orbit, in 214 of 576 corners of the box.) The
floor is the 2 s residence floor of the other units for a = 1 and acts only where a / k, the
tank's hold-up time constant, is below 2 s: there it sets the steady state (`steady_tank_kg`)
instead of H(F, w) / N, as the residence floor does (the default blender: 1/k = 14.4 s > 4 s).
That is why a >= 0.2 (floor <= 10 s a tank): as a goes to 0 the discharge becomes a weir's
threshold, which no fixed step resolves, and the floor would hold most blenders' hold-up up.
N m_i and w pass through a smooth floor (softplus, width `holdup_floor_kg` / `speed_floor_rpm`,
exact above ~20 widths) so the law stays finite when the blender is empty or the impeller
stops. At constant feed F and w each tank holds H(F, w)/N and a tracer (replacing bulk) leaves
with the Erlang (gamma) residence time distribution E(t) = t^(N-1) e^(-k t) k^N / (N-1)!,
mean N/k = H/F. The real blender's hold-up is more nonlinear (dead zones, speed thresholds);
that is what the hybrid residual is there to learn.
"""

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hybrid_twin.errors import ConfigError
from hybrid_twin.specs import InputSpec, OutputSpec, ParamSpec, StateSpec
from hybrid_twin.units.base import (
    AbstractUnit,
    positive_int,
    tank_state_specs,
    tanks_in_series,
)

# Version of the discharge law, kept in the weights: 2 = each tank's hold-up drives it.
DISCHARGE_LAW = 2

BLENDER_PARAMS = (
    ParamSpec(
        "holdup_ref_kg", "kg", 0.6, (0.1, 20.0), True, "hold-up at reference throughput and speed"
    ),
    ParamSpec("throughput_ref_kg_h", "kg/h", 30.0, (0.1, 1000.0), False, "reference throughput"),
    ParamSpec("speed_ref_rpm", "rpm", 400.0, (1.0, 5000.0), False, "reference impeller speed"),
    # a <= 1: hold-up grows no faster than throughput (mean residence time falls with F).
    # a >= 0.2: each tank discharges as (hold-up)^(1/a), whose stiffness 1/a the floor of
    # `_floored_rate` (2 s / a) pays for; below 0.2 that floor (> 10 s a tank) would set the
    # steady state of most blenders. Measured hold-up rises about in proportion to the feed.
    ParamSpec("holdup_flow_exp", "1", 0.5, (0.2, 1.0), True, "a in H ~ F^a"),
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
        flow_floor_kg_h: width of the smooth throughput floor of `rate_1_s`, kg/h.
        speed_floor_rpm: width of the smooth speed floor, rpm.
        holdup_floor_kg: width of the smooth hold-up floor of the discharge law, kg.
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
        holdup_floor_kg: float = 1e-3,
        params: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(name, components, BLENDER_PARAMS, params)
        self.n_tanks = positive_int(n_tanks, "n_tanks", name)
        low, high = (float(v) for v in speed_range_rpm)
        if not (low <= nominal_speed_rpm <= high and nominal_speed_rpm > 0):
            raise ConfigError(
                f"{name}: nominal_speed_rpm {nominal_speed_rpm} outside ({low}, {high}] rpm"
            )
        if flow_floor_kg_h <= 0 or speed_floor_rpm <= 0 or holdup_floor_kg <= 0:
            raise ConfigError(
                f"{name}: flow_floor_kg_h, speed_floor_rpm and holdup_floor_kg must be > 0"
            )
        self.flow_beta = 1.0 / float(flow_floor_kg_h)
        self.speed_beta = 1.0 / float(speed_floor_rpm)
        self.holdup_beta = 1.0 / float(holdup_floor_kg)
        self.flow_epsilon = 1e-6 * float(flow_floor_kg_h)
        self.speed_epsilon = 1e-6 * float(speed_floor_rpm)
        self.holdup_epsilon = 1e-6 * float(holdup_floor_kg)
        self.n_tank_states = self.n_tanks * self.n_components
        # Marks weights saved since the discharge follows the hold-up (see the module's
        # docstring); older ones were fitted to the feed-driven law (`_load_from_state_dict`).
        self.register_buffer("discharge_law", torch.tensor(DISCHARGE_LAW))
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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        # Weights fitted while the discharge followed the feed lack the marker: loaded under
        # the hold-up law, they would make another blender without a word.
        saved = state_dict.get(prefix + "discharge_law")
        if saved is None:
            raise ConfigError(
                f"{self.unit_name}: these weights were saved when the "
                "blender's discharge followed its feed (k = N F / (3600 H(F, w))); it now "
                "follows each tank's hold-up, and they do not carry over: train the run again"
            )
        if int(saved) != DISCHARGE_LAW:
            raise ConfigError(
                f"{self.unit_name}: these weights were saved under the "
                f"blender's discharge law {int(saved)}; this code has law {DISCHARGE_LAW}"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip

    def _floored_rate(self, log_rate: Tensor, theta: list[Tensor]) -> Tensor:
        """k from log k with the hold-up mode's floor: 1/k >= floor / a, smooth, exact 2 s above.

        A tank discharging q(m) = k(m) m with k ~ m^(1/a - 1) relaxes its mass at the rate
        dq/dm = k / a (its hold-up time constant is a / k, a times its residence time). The
        floor keeps that rate <= 1 / (2 s), so that one RK4 step of 5 s (h dq/dm <= 2.5 < 2.785)
        is stable for every a; a = 1 (the hold-up proportional to the throughput) gives the 2 s
        residence floor of the other units. log k is clamped so that exp stays finite in float32
        (an empty tank with a small a): exp(60) s is a residence no run reaches.
        """
        return 1.0 / self._floored_residence(log_rate, theta)[2]

    def _floored_residence(self, log_rate: Tensor, theta: list[Tensor]
                           ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """(1/k, its floor 2 s / a, 1/k floored) from log k; see `_floored_rate`."""
        floor_s = 2.0 / theta[3]
        residence = torch.exp(-log_rate.clamp(-60.0, 60.0))
        return residence, floor_s, floor_s + F.softplus(residence - floor_s, beta=10.0)

    def _holdup_log_rate(self, tank_kg: Tensor, log_rate_ref: Tensor, theta: list[Tensor]
                         ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(N m through the hold-up floor, log k of the discharge law before the residence
        floor) for tanks holding `tank_kg`; log_rate_ref from `_log_rate_ref`."""
        holdup = F.softplus(tank_kg * float(self.n_tanks), beta=self.holdup_beta)
        holdup = holdup + self.holdup_epsilon
        return holdup, log_rate_ref + (1.0 / theta[3] - 1.0) * torch.log(holdup / theta[0])

    def _log_rate_ref(self, speed_rpm: Tensor, theta: list[Tensor]) -> Tensor:
        """log of N F_ref / (3600 H_ref) (w / w_ref)^(b/a), (batch, 1)."""
        speed = F.softplus(speed_rpm, beta=self.speed_beta) + self.speed_epsilon
        return torch.log(
            theta[1] * (self.n_tanks / 3600.0) / theta[0]
        ) + theta[4] / theta[3] * torch.log(speed / theta[2])

    def rate_1_s(self, throughput_kg_h: Tensor, speed_rpm: Tensor, theta: list[Tensor]) -> Tensor:
        """Per-tank outflow rate at steady state where the floor is inactive, k = N F / (3600
        H(F, w)), (batch, 1), 1/s.

        Written as k = N F_ref / (3600 H_ref) (F / F_ref)^(1 - a) (w / w_ref)^b, which stays
        finite as F or w go to 0 (a <= 1, b >= 0); the floors keep F and w strictly positive
        even where float32's softplus underflows (a millionth of their width). 1/k has the
        hold-up mode's smooth floor 2 s / a (`_floored_rate`); where that floor acts, the
        steady state of the discharge law is `steady_tank_kg`, not H(F, w) / N.
        """
        holdup_ref, flow_ref, speed_ref = theta[0], theta[1], theta[2]
        flow = F.softplus(throughput_kg_h, beta=self.flow_beta) + self.flow_epsilon
        speed = F.softplus(speed_rpm, beta=self.speed_beta) + self.speed_epsilon
        log_rate = (
            torch.log(flow_ref * (self.n_tanks / 3600.0) / holdup_ref)
            + (1.0 - theta[3]) * torch.log(flow / flow_ref)
            + theta[4] * torch.log(speed / speed_ref)
        )
        return self._floored_rate(log_rate, theta)

    def discharge_rate_1_s(
        self, tank_kg: Tensor, speed_rpm: Tensor, theta: list[Tensor]
    ) -> Tensor:
        """Outflow rate of tanks holding `tank_kg` each (any shape broadcasting with the speed's
        (batch, 1)), 1/s: k = N Q(N m, w) / (3600 N m), the hold-up law at the hold-up N m.

        k = N F_ref / (3600 H_ref) (N m / H_ref)^(1/a - 1) (w / w_ref)^(b/a): at m = H(F, w) / N
        it is `rate_1_s(F, w)`. N m passes through the smooth hold-up floor (softplus, width
        `holdup_floor_kg`); 1/k has the floor of `_floored_rate`.
        """
        _, log_rate = self._holdup_log_rate(tank_kg, self._log_rate_ref(speed_rpm, theta), theta)
        return self._floored_rate(log_rate, theta)

    def steady_tank_kg(
        self, throughput_kg_h: Tensor, speed_rpm: Tensor, theta: list[Tensor]
    ) -> Tensor:
        """Mass m of each tank at steady state: k(m) m = F / 3600, (batch, 1), kg.

        Starts at F / (3600 k) with k = `rate_1_s(F, w)` (exact, H(F, w) / N, where the floor
        is inactive) and takes Newton steps in log m, d log(m k) / d log m = 1 + (1/a - 1) s,
        s the slope of the floors (residence and hold-up): steps that remove what the floors
        add where they are inactive and converge inside their knees. F <= 0 gives 0.
        """
        flow = throughput_kg_h * (1.0 / 3600.0)
        # where nothing is fed, a stand-in feed keeps the steps finite; the result is then 0
        fed = flow > 0.0
        flow = torch.where(fed, flow, torch.ones_like(flow))
        tank = flow / self.rate_1_s(flow * 3600.0, speed_rpm, theta)
        log_rate_ref = self._log_rate_ref(speed_rpm, theta)
        for _ in range(6):
            holdup, log_rate = self._holdup_log_rate(tank, log_rate_ref, theta)
            residence, floor_s, floored = self._floored_residence(log_rate, theta)
            # d log(1/k) / d log m: the residence floor's slope times the hold-up floor's
            scaled = tank * float(self.n_tanks)
            slope = residence * torch.sigmoid(10.0 * (residence - floor_s)) / floored
            slope = slope * scaled * torch.sigmoid(self.holdup_beta * scaled) / holdup
            step = torch.log(tank / (flow * floored)) / (1.0 + (1.0 / theta[3] - 1.0) * slope)
            tank = tank * torch.exp(-step)
        return torch.where(fed, tank, torch.zeros_like(tank))

    def mean_residence_time_s(
        self, throughput_kg_h: Tensor, speed_rpm: Tensor, theta: list[Tensor]
    ) -> Tensor:
        """Mean residence time at steady state, N / k(m) = N m / F (= H(F, w) / F above the
        floor), s. Written as N / k: at no feed (an empty blender) N m / F is 0 / 0, N / k the
        limit at the hold-up floor, large and finite."""
        tank = self.steady_tank_kg(throughput_kg_h, speed_rpm, theta)
        return self.n_tanks / self.discharge_rate_1_s(tank, speed_rpm, theta)

    def _tanks(self, x: Tensor) -> Tensor:
        return x.narrow(1, 0, self.n_tank_states).unflatten(1, (self.n_tanks, self.n_components))

    def derivative(
        self, x: Tensor, u: Tensor, inflow: Tensor, theta: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """See `AbstractUnit.derivative`."""
        speed = x.narrow(1, self.n_tank_states, 1)
        tanks = self._tanks(x)
        rate = self.discharge_rate_1_s(tanks.sum(dim=2), speed, theta)  # (batch, n_tanks)
        d_mass, out_kg_s = tanks_in_series(tanks, inflow * (1.0 / 3600.0), rate)
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
        """Each tank holds in / (3600 k(m)) of each component, m = `steady_tank_kg` (H(F, w) / N
        above the floor): the derivative vanishes here to rounding. Speed at its setpoint. A
        blender fed nothing is empty."""
        flow = inflow.sum(dim=1, keepdim=True)
        tank_kg = self.steady_tank_kg(flow, u, theta)
        rate = self.discharge_rate_1_s(tank_kg, u, theta)
        tank = inflow / (3600.0 * rate)
        tanks = tank.unsqueeze(1).expand(-1, self.n_tanks, -1).flatten(1)
        return torch.cat([tanks, u], dim=1), inflow
