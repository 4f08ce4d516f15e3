"""The interface every mechanistic unit model implements, and the tanks-in-series balance.

A unit is a torch module giving dx/dt = f(x, u, inflow; theta) for its own states, batched
over trajectories, plus the material stream it sends downstream. The flowsheet
(`hybrid_twin.flowsheet`) wires units together by these streams. Streams are component mass
flows in kg/h, shape (batch, n_components), in the flowsheet's component order; time is in
seconds, so a balance reads dm/dt [kg/s] = (in - out) [kg/h] / 3600.
"""

import inspect
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybrid_twin.errors import ConfigError
from hybrid_twin.specs import (
    InputSpec,
    OutputSpec,
    ParameterSet,
    ParamSpec,
    StateSpec,
    override_specs,
)

# Scripted code cannot read module-level floats, so unit code writes 3600.0 (s per h) inline.


class AbstractUnit(nn.Module):
    """Base of the unit models; never instantiated.

    Subclasses set `state_specs`, `input_specs`, `output_specs` in `__init__` and implement
    `derivative`, `outputs`, `inventory` and `steady_state` with the shapes below, all
    TorchScript-compatible. Parameter values come in as `theta`, a list with one (1 or batch, 1)
    column per parameter in declaration order, rather than being read inside: a solver
    transforms them once per solve, the flowsheet splits them once per evaluation, and the
    hybrid closure form can pass per-trajectory corrected values.

    Args:
        name: unit name in the flowsheet; prefixes every state, input, output and parameter.
        components: the flowsheet's component names, in stream order.
        param_specs: the unit's declared parameters.
        params: config overrides for them (see `hybrid_twin.specs.override_specs`).
    """

    def __init__(
        self,
        name: str,
        components: Sequence[str],
        param_specs: Sequence[ParamSpec],
        params: Mapping[str, object] | None,
    ) -> None:
        super().__init__()
        self.unit_name = name
        self.components = list(components)
        self.n_components = len(self.components)
        self.params = ParameterSet(override_specs(param_specs, params, name))
        self.state_specs: tuple[StateSpec, ...] = ()
        self.input_specs: tuple[InputSpec, ...] = ()
        self.output_specs: tuple[OutputSpec, ...] = ()

    @classmethod
    def config_keys(cls) -> list[str]:
        """Keys the flowsheet config may give this unit (its keyword arguments)."""
        signature = inspect.signature(cls.__init__)
        return [p for p in signature.parameters if p not in ("self", "name", "components")]

    def _component_index(self, component: str, key: str) -> int:
        if component not in self.components:
            raise ConfigError(
                f"{self.unit_name}.{key}: component {component!r} is not one of the "
                f"flowsheet components {self.components}"
            )
        return self.components.index(component)

    def param_value(self, name: str) -> float:
        """Configured (initial) value of one of this unit's parameters."""
        return self.params.specs[self.params.names.index(name)].default

    def theta(self) -> list[Tensor]:
        """Physical parameter values as the columns `derivative` takes: n_params x (1, 1)."""
        return list(self.params.values().unsqueeze(0).split(1, dim=1))

    def derivative(
        self, x: Tensor, u: Tensor, inflow: Tensor, theta: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """dx/dt and the outlet stream.

        Args:
            x: unit states, (batch, n_states), units of `state_specs`.
            u: unit inputs, (batch, n_inputs), units of `input_specs`.
            inflow: summed upstream streams, (batch, n_components), kg/h.
            theta: parameter values, n_params columns of (1 or batch, 1).

        Returns:
            dx/dt, (batch, n_states), state units per second; outflow, (batch, n_components), kg/h.
        """
        raise NotImplementedError

    def outputs(self, x: Tensor, theta: list[Tensor]) -> Tensor:
        """Algebraic outputs h(x), (batch, n_outputs), units of `output_specs`."""
        raise NotImplementedError

    def inventory(self, x: Tensor) -> Tensor:
        """Material held in the unit per component, (batch, n_components), kg."""
        raise NotImplementedError

    def steady_state(self, u: Tensor, inflow: Tensor, theta: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Operating point for constant u and inflow: (x, outflow), shapes as in `derivative`."""
        raise NotImplementedError


# The shortest per-tank residence time a tanks-in-series unit gets: one RK4 step of the default
# 5 s data interval is stable for h / tau < 2.78, so every learnable time constant of the line
# stays above 2 s (docs/model.md).
MIN_TANK_RESIDENCE_S = 2.0


def floored_residence_s(residence_s: Tensor, floor_s: float = MIN_TANK_RESIDENCE_S) -> Tensor:
    """A per-tank residence time with a smooth floor (MIN_TANK_RESIDENCE_S), s.

    Exactly `residence_s` 2 s and more above the floor (softplus returns its argument), so a
    blender or feed frame within its usual range is untouched; below, the floor keeps a
    parameter set inside its bounds (a small hold-up at a high throughput and speed) from
    making one RK4 step unstable.
    """
    # floor_s an argument: TorchScript reads no module-level float
    return floor_s + F.softplus(residence_s - floor_s, beta=10.0)


def tanks_in_series(m: Tensor, inflow_kg_s: Tensor, rate_1_s: Tensor) -> tuple[Tensor, Tensor]:
    """Component balances of N ideally mixed tanks in series with outflow k * m per tank.

    dm_1/dt = in - k m_1,   dm_i/dt = k m_(i-1) - k m_i.

    Args:
        m: component masses, (batch, n_tanks, n_components), kg.
        inflow_kg_s: feed to tank 1, (batch, n_components), kg/s.
        rate_1_s: outflow rate constant k = 1 / (per-tank residence time), (batch, 1), or one
            per tank, (batch, n_tanks), 1/s.

    Returns:
        dm/dt, (batch, n_tanks, n_components), kg/s; outflow of the last tank,
        (batch, n_components), kg/s.
    """
    out = m * rate_1_s.unsqueeze(-1)
    into = torch.cat([inflow_kg_s.unsqueeze(1), out.narrow(1, 0, out.shape[1] - 1)], dim=1)
    return into - out, out.select(1, -1)


def tank_state_specs(
    prefix: str, n_tanks: int, components: Sequence[str], scale: float
) -> list[StateSpec]:
    """StateSpecs "<prefix><i>.<component>_kg" for tanks i = 1..n, component-fastest order."""
    return [
        StateSpec(f"{prefix}{i}.{c}_kg", "kg", f"{c} mass in {prefix} {i}", scale=scale)
        for i in range(1, n_tanks + 1)
        for c in components
    ]


def positive_int(value: object, key: str, where: str) -> int:
    """A config value that must be an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}.{key}: expected an integer >= 1, got {value!r}")
    return value
