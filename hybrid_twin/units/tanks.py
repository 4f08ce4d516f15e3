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
misses (overflow of either tank, an outflow law not exactly square-root) is left to a residual.
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
        params: parameter overrides (k1_upper_outflow, k2_transfer, k3_lower_outflow,
            k4_pump_gain, sensor_offset_v).

    Raises:
        ConfigError: a nominal pump voltage outside its range, a non-positive scale or
            saturation, bad parameter overrides.
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
        params: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(name, components, TANKS_PARAMS, params)
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
        # sqrt of a level floored at 0: a learned correction may push a level below empty,
        # where no water drains; the 1e-6 keeps the gradient finite at an empty tank.
        upper = torch.sqrt(x.narrow(1, 0, 1).clamp_min(0.0) + 1e-6)
        lower = torch.sqrt((x.narrow(1, 1, 1) - theta[4]).clamp_min(0.0) + 1e-6)
        return upper, lower

    def derivative(
        self, x: Tensor, u: Tensor, inflow: Tensor, theta: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """See `AbstractUnit.derivative`; `inflow` is ignored and the outlet stream is 0."""
        upper, lower = self._outflows(x, theta)
        d_upper = theta[3] * u - theta[0] * upper
        d_lower = theta[1] * upper - theta[2] * lower
        return torch.cat([d_upper, d_lower], dim=1), torch.zeros_like(inflow)

    def outputs(self, x: Tensor, theta: list[Tensor]) -> Tensor:
        """[lower_level_v], (batch, 1): the sensor reading, saturated."""
        return x.narrow(1, 1, 1).clamp_max(self.saturation_v)

    def inventory(self, x: Tensor) -> Tensor:
        """Water held, in level volts above zero, in the first component column."""
        total = x.narrow(1, 0, 1).clamp_min(0.0) + x.narrow(1, 1, 1).clamp_min(0.0)
        pad = torch.zeros(x.shape[0], self.n_components - 1, dtype=x.dtype, device=x.device)
        return torch.cat([total, pad], dim=1)

    def steady_state(self, u: Tensor, inflow: Tensor, theta: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Levels where both balances vanish, with the derivative's 1e-6 floor under the roots:
        x1 = (k4 u / k1)^2 - 1e-6, x2 = o + (k2 k4 u / (k1 k3))^2 - 1e-6 (u floored at 0,
        levels at 0: a pump voltage too small to lift a level above the floor reads empty)."""
        upper_root = theta[3] * u.clamp_min(0.0) / theta[0]
        upper = (upper_root.pow(2) - 1e-6).clamp_min(0.0)
        lower = theta[4] + ((theta[1] / theta[2] * upper_root).pow(2) - 1e-6).clamp_min(0.0)
        return torch.cat([upper, lower], dim=1), torch.zeros_like(inflow)
