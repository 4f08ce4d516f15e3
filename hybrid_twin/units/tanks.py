"""Two gravity-drained tanks in cascade (Torricelli's law): the Cascaded Tanks benchmark's prior.

A pump (input voltage u) fills an upper tank, which drains through a small opening into a
lower tank, which drains into a reservoir; a level sensor reads the lower tank in volts.
States are levels in volts of that sensor, so no length calibration is needed:

    dx1/dt = -k1 sqrt(x1) + k4 u                          [V/s]
    dx2/dt =  k2 sqrt(x1) - k3 sqrt(x2 - o)               [V/s]
    y      =  min(x2, y_sat)                              [V]

x1 is the upper level (V-equivalent, >= 0), x2 the lower level as the sensor reads it, o the
sensor reading of an empty lower tank (offset). The sensor saturates at y_sat (10 V on the
benchmark rig); that is a property of the instrument, so the prior carries it. What the prior
misses (an outflow law not exactly square-root, and overflow unless modelled) is left to a
residual.

Overflow (`overflow=True`, after the grey-box model of Rogers, Holmes, Cross and Worden 2017):
a full tank holds no more; the inflow it cannot hold spills, a fraction k5 of the upper tank's
spill into the lower tank, the rest and the lower tank's spill out of the rig:

    n1 = k4 u - k1 sqrt(x1)                 s1 = max(n1, 0) ramp(x1 - h1) + c max(x1 - r1, 0)
    n2 = k2 sqrt(x1) + k5 s1 - k3 sqrt(x2 - o)   s2 = max(n2, 0) ramp(x2 - h2) + c max(x2 - r2, 0)
    dx1/dt = n1 - s1,  dx2/dt = n2 - s2

ramp(d) = max(d / w + 1/2, 0) with w = `overflow_width_v`: the spill ramps in over the last
w volts below the rim r = h + w/2, where it takes all of the net inflow and the level stops;
above, it takes more. A tank holds nothing above its rim, whatever comes in: the excess
spills at c = 0.25 /s, so that a level carried past (a solver step, a learned initial state,
a residual) falls back even while the tank drains. (Without c, a level above the rim with
no net inflow drained by Torricelli alone, to an equilibrium above the rim.) A hard
switch (w -> 0) would make the field discontinuous, which a fixed-step solver and a gradient
both handle badly; the ramp's slope is n / w, so one RK4 step of dt stays stable while
dt n / w < 2.78 (and dt c = 1 at the benchmark's 4 s). h1 (in the upper level's
V-equivalent: no sensor reads it), h2 and k5 are learnable.

A sensor gain is not a parameter: scaling both levels by a maps k1, k2, k3 to k / sqrt(a) and
k4 to k4 / a, so a gain would not be identifiable.

The drain goes to a reservoir outside the model: the unit sends no stream downstream.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hybrid_twin.errors import ConfigError
from hybrid_twin.specs import InputSpec, OutputSpec, ParamSpec, StateSpec
from hybrid_twin.units.base import AbstractUnit

TANKS_PARAMS = (
    ParamSpec("k1_upper_outflow", "V^0.5/s", 0.05, (1e-4, 1.0), True, "upper tank drain"),
    ParamSpec("k2_transfer", "V^0.5/s", 0.05, (1e-4, 1.0), True, "upper drain reaching the lower"),
    ParamSpec("k3_lower_outflow", "V^0.5/s", 0.05, (1e-4, 1.0), True, "lower tank drain"),
    ParamSpec("k4_pump_gain", "1/s", 0.05, (1e-4, 1.0), True, "pump flow per input volt"),
    ParamSpec("sensor_offset_v", "V", 0.0, (-5.0, 5.0), True, "reading of an empty lower tank"),
)
OVERFLOW_PARAMS = (
    ParamSpec("upper_overflow_v", "V", 10.0, (1.0, 40.0), True, "upper level where it spills"),
    ParamSpec("lower_overflow_v", "V", 10.0, (1.0, 20.0), True, "lower level where it spills"),
    ParamSpec("k5_spill_to_lower", "1", 0.5, (0.0, 1.0), True, "upper spill reaching the lower"),
)
RIM_SPILL_PER_S = 0.25  # c: the rate the water above a rim spills at, 1/s (module docstring)


class CascadedTanks(AbstractUnit):
    """Upper tank draining into a lower tank, Torricelli outflows, saturating level sensor.

    States: upper_level_v (V), lower_level_v (V, as the sensor reads it). Input: pump_v (V).
    Output: lower_level_v (V), the sensor reading min(x2, saturation_v).

    Args:
        name: unit name.
        components: flowsheet component names (the unit exchanges no stream; any one name).
        nominal_pump_v: typical pump voltage, V (input normalisation, steady state).
        pump_range_v: valid pump voltage range (low, high), V.
        level_scale_v: typical level, V (state scale).
        saturation_v: the sensor's highest reading, V; None: no saturation.
        overflow: model the tanks' overflow (module docstring) with three more parameters.
        overflow_width_v: w, the level band over which the spill ramps in, V.
        params: parameter overrides (k1_upper_outflow, k2_transfer, k3_lower_outflow,
            k4_pump_gain, sensor_offset_v; with overflow upper_overflow_v, lower_overflow_v,
            k5_spill_to_lower).

    Raises:
        ConfigError: a nominal pump voltage outside its range, a non-positive scale,
            saturation or overflow width, bad parameter overrides.
    """

    accepts_inflow = False  # the pump is the only feed

    def __init__(
        self,
        name: str,
        components: Sequence[str],
        nominal_pump_v: float = 3.0,
        pump_range_v: Sequence[float] = (0.0, 10.0),
        level_scale_v: float = 5.0,
        saturation_v: float | None = 10.0,
        overflow: bool = False,
        overflow_width_v: float = 0.5,
        params: Mapping[str, object] | None = None,
    ) -> None:
        specs = TANKS_PARAMS + OVERFLOW_PARAMS if overflow else TANKS_PARAMS
        super().__init__(name, components, specs, params)
        if not overflow_width_v > 0:
            raise ConfigError(f"{name}.overflow_width_v: expected > 0 V, got {overflow_width_v}")
        self.overflow = bool(overflow)
        self.overflow_width_v = float(overflow_width_v)
        self.rim_spill_per_s = RIM_SPILL_PER_S  # scripted code reads attributes, not globals
        low, high = (float(v) for v in pump_range_v)
        if not low <= nominal_pump_v <= high:
            raise ConfigError(
                f"{name}.nominal_pump_v: {nominal_pump_v} V is outside pump_range_v "
                f"[{low}, {high}] V"
            )
        if not level_scale_v > 0:
            raise ConfigError(f"{name}.level_scale_v: expected > 0 V, got {level_scale_v}")
        if saturation_v is not None and not saturation_v > 0:
            raise ConfigError(f"{name}.saturation_v: expected > 0 V or null, got {saturation_v}")
        self.saturation_v = float("inf") if saturation_v is None else float(saturation_v)
        self.state_specs = (
            StateSpec("upper_level_v", "V", "upper tank level, sensor volts", level_scale_v),
            StateSpec(
                "lower_level_v", "V", "lower tank level as the sensor reads it", level_scale_v
            ),
        )
        self.input_specs = (
            InputSpec("pump_v", "V", (low, high), float(nominal_pump_v), "pump voltage"),
        )
        self.output_specs = (OutputSpec("lower_level_v", "V", "level sensor reading"),)

    def _outflows(self, x: Tensor, theta: list[Tensor]) -> tuple[Tensor, Tensor]:
        upper = _drain_root(x.narrow(1, 0, 1))
        lower = _drain_root(x.narrow(1, 1, 1) - theta[4])
        return upper, lower

    def derivative(
        self, x: Tensor, u: Tensor, inflow: Tensor, theta: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """See `AbstractUnit.derivative`; `inflow` is ignored and the outlet stream is 0."""
        upper, lower = self._outflows(x, theta)
        d_upper = theta[3] * u - theta[0] * upper
        if not self.overflow:
            d_lower = theta[1] * upper - theta[2] * lower
            return torch.cat([d_upper, d_lower], dim=1), torch.zeros_like(inflow)
        upper_spill = self._spill(d_upper, x.narrow(1, 0, 1), theta[5])
        d_lower = theta[1] * upper + theta[7] * upper_spill - theta[2] * lower
        lower_spill = self._spill(d_lower, x.narrow(1, 1, 1), theta[6])
        d = torch.cat([d_upper - upper_spill, d_lower - lower_spill], dim=1)
        return d, torch.zeros_like(inflow)

    def _spill(self, net_inflow: Tensor, level: Tensor, overflow_level: Tensor) -> Tensor:
        """The part of a positive net inflow a (nearly) full tank cannot hold, plus whatever
        stands above its rim."""
        # Not capped at 1 above h + w/2: a level a solver step carried past it spills more
        # than comes in and falls back (capped, every level above would be an equilibrium).
        ramp = ((level - overflow_level) / self.overflow_width_v + 0.5).clamp_min(0.0)
        above_rim = (level - overflow_level - 0.5 * self.overflow_width_v).clamp_min(0.0)
        return net_inflow.clamp_min(0.0) * ramp + self.rim_spill_per_s * above_rim

    def outputs(self, x: Tensor, theta: list[Tensor]) -> Tensor:
        """[lower_level_v], (batch, 1): the sensor reading, saturated."""
        return x.narrow(1, 1, 1).clamp_max(self.saturation_v)

    def inventory(self, x: Tensor) -> Tensor:
        """Water held, in level volts above zero, in the first component column."""
        total = x.narrow(1, 0, 1).clamp_min(0.0) + x.narrow(1, 1, 1).clamp_min(0.0)
        pad = torch.zeros(x.shape[0], self.n_components - 1, dtype=x.dtype, device=x.device)
        return torch.cat([total, pad], dim=1)

    def steady_state(self, u: Tensor, inflow: Tensor, theta: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Levels where both balances vanish, inverting the derivative's `_drain_root`:
        x1 = L(k4 u / k1), x2 = o + L(k2 k4 u / (k1 k3)) with L(r) = (r + 1e-3)^2 - 1e-6
        (u floored at 0: with the pump off both tanks are empty).

        With overflow a level stops where its spill takes all of the net inflow, h + w/2: the
        upper tank there spills s1 = k4 u - k1 sqrt(x1), and the lower tank balances
        k2 sqrt(x1) + k5 s1 against its drain."""
        upper_root = theta[3] * u.clamp_min(0.0) / theta[0]
        upper = _level_of_root(upper_root)
        if not self.overflow:
            lower = theta[4] + _level_of_root(theta[1] / theta[2] * upper_root)
            return torch.cat([upper, lower], dim=1), torch.zeros_like(inflow)
        half_width = 0.5 * self.overflow_width_v
        upper = torch.minimum(upper, theta[5] + half_width)
        root = _drain_root(upper)
        upper_spill = (theta[3] * u.clamp_min(0.0) - theta[0] * root).clamp_min(0.0)
        lower_root = (theta[1] * root + theta[7] * upper_spill) / theta[2]
        lower = theta[4] + _level_of_root(lower_root)
        lower = torch.minimum(lower, theta[6] + half_width)
        return torch.cat([upper, lower], dim=1), torch.zeros_like(inflow)


def _drain_root(level: Tensor) -> Tensor:
    """sqrt(level) of Torricelli's law, 0 at and below empty, with a finite slope there.

    A learned correction may push a level below empty, where no water drains: the level is
    floored at 0. sqrt(h + 1e-6) - 1e-3 keeps the gradient finite (500 at h = 0) and is
    exactly 0 at an empty tank, so an empty tank stays empty (plain sqrt(h + 1e-6) would drain
    it below 0 at k * 1e-3 V/s forever).
    """
    return torch.sqrt(level.clamp_min(0.0) + 1e-6) - 1e-3


def _level_of_root(root: Tensor) -> Tensor:
    """The level whose `_drain_root` is `root` (>= 0), V."""
    return (root + 1e-3).pow(2) - 1e-6
