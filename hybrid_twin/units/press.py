"""Rotary tablet press: feed frame residence, tablet weight control, API content and force.

Last unit of the line; its outlet stream is the tablets leaving the line.

    dm_1/dt = in / 3600 - k m_1, dm_j/dt = k (m_(j-1) - m_j),  k = n / tau_frame   feed frame [kg/s]
    dW/dt   = (W_sp - W) / tau_W                                                    weight [mg/s]
    API     = 100 W x_api / LC                       tablet API content [%LC]
    F_c     = F_ref (W / W_ref)^p                    main compression force [kN]
    turret  = out * 1e6 / (W * stations * 60)       turret speed [rpm]

The feed frame (n small tanks in series, mean residence tau_frame) adds the last delay and
mixing before compression; x_api is the API mass fraction of its last tank (each tank's
residence tau_frame / n has the line's smooth 2 s floor, units/base.py). The press's weight
control loop drives the fill depth so tablet weight W follows its setpoint with time constant
tau_W; at a fixed punch gap a heavier fill compacts harder, hence the power law for force.

LC is the dose the assay is reported against. With `label_claim: fixed` it is the parameter
`label_claim_mg`, one product's label claim. With `label_claim: recipe` it is the dose of the
recipe being run, as the at-line assay reports it when a line runs several API fractions
(a DoE): the state D follows the recipe the setpoints describe,

    dD/dt = (W_sp F_api,sp / sum_c F_c,sp - D) / tau_recipe       recipe dose [mg/s]
    API   = 100 W x_api / D

with the feeders' setpoint mass flows F_c,sp as extra inputs. D is a state, not an algebraic
function of u, because outputs h(x) see states only; tau_recipe (fixed, 5 s) makes it follow a
recipe change within one 5 s data interval. Setpoints that name no dose (API or tablet weight
setpoint 0: a stopped API feeder, a stopped line) leave D as it was, so the tablets still made
are assayed against the last recipe's dose: following them to 0 read 1e12-1e15 %LC.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hybrid_twin.errors import ConfigError, unknown_key_message
from hybrid_twin.specs import InputSpec, OutputSpec, ParamSpec, StateSpec
from hybrid_twin.units.base import (
    AbstractUnit,
    floored_residence_s,
    positive_int,
    tank_state_specs,
    tanks_in_series,
)

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
# Appended with `label_claim: recipe` only, so `fixed` keeps its parameter vector. Not learnable:
# D is bookkeeping of the setpoints, not plant dynamics. Its 2 s lower bound keeps one RK4 step
# per 5 s data interval stable (RK4 needs dt / tau < 2.78, i.e. tau >= 1.8 s at dt = 5 s).
RECIPE_PARAMS = (
    ParamSpec(
        "recipe_tau_s", "s", 5.0, (2.0, 600.0), False, "time constant of the recipe dose state"
    ),
)
LABEL_CLAIM_MODES = ("fixed", "recipe")


class TabletPress(AbstractUnit):
    """Tablet press with a tanks-in-series feed frame.

    States: frame<j>.<component>_kg for j = 1..n_frame_tanks (component-fastest), then
    tablet_weight_mg, then (recipe only) recipe_dose_mg. Inputs: weight_sp_mg, then (recipe
    only) <component>_sp_kg_h for each flowsheet component. Outputs: tablet_weight_mg,
    tablet_api_pct_lc, comp_force_kN, turret_speed_rpm, frame_holdup_kg.

    Args:
        name: unit name.
        components: flowsheet component names.
        api_component: the component whose content is reported in %LC.
        n_frame_tanks: tanks in series representing the feed frame.
        nominal_weight_mg: typical weight setpoint, mg.
        weight_range_mg: valid setpoint range (low, high), mg.
        stations: punch stations on the turret (turret speed output).
        nominal_holdup_kg: typical feed frame mass, kg (normalisation only).
        label_claim: "fixed" (API %LC against the parameter label_claim_mg) or "recipe"
            (against the dose of the running recipe, from the feeder setpoints).
        nominal_feed_sp_kg_h: recipe only, required: {component: nominal feeder setpoint,
            kg/h} for every component; the nominal values of the <component>_sp_kg_h inputs
            (the flowsheet checks they equal those of the feeders sharing their tags).
        feed_sp_range_kg_h: recipe only: valid range (low, high) of each <component>_sp_kg_h.
        params: parameter overrides (see PRESS_PARAMS, and RECIPE_PARAMS for recipe).

    Raises:
        ConfigError: unknown api_component or label_claim, bad integers or ranges, missing or
            incomplete nominal_feed_sp_kg_h for recipe (or given for fixed), bad overrides.
    """

    recipe: bool

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
        label_claim: str = "fixed",
        nominal_feed_sp_kg_h: Mapping[str, float] | None = None,
        feed_sp_range_kg_h: Sequence[float] = (0.0, 100.0),
        params: Mapping[str, object] | None = None,
    ) -> None:
        if label_claim not in LABEL_CLAIM_MODES:
            raise ConfigError(
                f"{name}.label_claim: "
                + unknown_key_message("mode", str(label_claim), LABEL_CLAIM_MODES)
            )
        recipe = label_claim == "recipe"
        super().__init__(name, components, PRESS_PARAMS + (RECIPE_PARAMS if recipe else ()), params)
        self.recipe = recipe
        self.label_claim = str(label_claim)
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
        weight_input = InputSpec("weight_sp_mg", "mg", (low, high), float(nominal_weight_mg))
        self.state_specs = (
            *tank_state_specs(
                "frame", self.n_frame_tanks, self.components, nominal_holdup_kg / self.n_frame_tanks
            ),
            StateSpec("tablet_weight_mg", "mg", "mean tablet weight", nominal_weight_mg),
        )
        self.input_specs = (weight_input,)
        if self.recipe:
            self.state_specs = (
                *self.state_specs,
                StateSpec(
                    "recipe_dose_mg",
                    "mg",
                    "API mass per tablet of the running recipe (100 %LC)",
                    self.param_value("label_claim_mg"),
                ),
            )
            self.input_specs = (
                weight_input,
                *self._feed_input_specs(nominal_feed_sp_kg_h, feed_sp_range_kg_h),
            )
        elif nominal_feed_sp_kg_h is not None:
            raise ConfigError(
                f"{name}.nominal_feed_sp_kg_h: only used with label_claim: recipe, "
                f"got label_claim: {label_claim}"
            )
        self.output_specs = (
            OutputSpec("tablet_weight_mg", "mg", "mean tablet weight"),
            OutputSpec("tablet_api_pct_lc", "%LC", "tablet API content, percent of label claim"),
            OutputSpec("comp_force_kN", "kN", "main compression force"),
            OutputSpec("turret_speed_rpm", "rpm", "turret speed that matches the throughput"),
            OutputSpec("frame_holdup_kg", "kg", "material in the feed frame"),
        )

    def _feed_input_specs(
        self, nominal_kg_h: Mapping[str, float] | None, range_kg_h: Sequence[float]
    ) -> list[InputSpec]:
        where = f"{self.unit_name}.nominal_feed_sp_kg_h"
        given = dict(nominal_kg_h or {})
        if sorted(given) != sorted(self.components):
            raise ConfigError(
                f"{where}: label_claim: recipe needs one nominal setpoint per component "
                f"{self.components}, got {sorted(given)}"
            )
        low, high = (float(v) for v in range_kg_h)
        values = {c: float(given[c]) for c in self.components}
        outside = [c for c, v in values.items() if not low <= v <= high]
        if outside or not 0.0 <= low < high or sum(values.values()) <= 0.0:
            raise ConfigError(
                f"{where}: expected values inside feed_sp_range_kg_h [{low}, {high}] kg/h "
                f"(0 <= low < high) with a positive sum, got {values}"
            )
        return [
            InputSpec(f"{c}_sp_kg_h", "kg/h", (low, high), values[c], f"{c} feeder setpoint")
            for c in self.components
        ]

    def _tank_residence_s(self, theta: list[Tensor]) -> Tensor:
        """tau_frame / n, with the line's smooth 2 s floor (several frame tanks could go below)."""
        return floored_residence_s(theta[0] / self.n_frame_tanks)

    def _frame(self, x: Tensor) -> Tensor:
        frame = (self.n_frame_tanks, self.n_components)
        return x.narrow(1, 0, self.n_tank_states).unflatten(1, frame)

    def recipe_dose_mg(self, u: Tensor) -> Tensor:
        """Dose of the recipe the inputs describe, W_sp F_api,sp / sum_c F_c,sp, (batch, 1), mg.

        Recipe mode only; u: (batch, 1 + n_components). The floor only acts when every feeder
        setpoint is 0 (< 1e-12 kg/h in all): a dose of 0 there instead of 0/0.
        """
        feed_sp = u.narrow(1, 1, self.n_components)
        total = feed_sp.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return u.narrow(1, 0, 1) * feed_sp.narrow(1, self.api_index, 1) / total

    def derivative(
        self, x: Tensor, u: Tensor, inflow: Tensor, theta: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """See `AbstractUnit.derivative`."""
        weight = x.narrow(1, self.n_tank_states, 1)
        rate = 1.0 / self._tank_residence_s(theta)
        d_mass, out_kg_s = tanks_in_series(self._frame(x), inflow * (1.0 / 3600.0), rate)
        d_weight = (u.narrow(1, 0, 1) - weight) / theta[1]
        parts = [d_mass.flatten(1), d_weight]
        if self.recipe:
            dose = x.narrow(1, self.n_tank_states + 1, 1)
            names_a_dose = (u.narrow(1, 0, 1) > 0) & (u.narrow(1, 1 + self.api_index, 1) > 0)
            d_dose = (self.recipe_dose_mg(u) - dose) / theta[6]
            parts.append(torch.where(names_a_dose, d_dose, torch.zeros_like(d_dose)))
        return torch.cat(parts, dim=1), out_kg_s * 3600.0

    def outputs(self, x: Tensor, theta: list[Tensor]) -> Tensor:
        """[tablet_weight_mg, tablet_api_pct_lc, comp_force_kN, turret_speed_rpm,
        frame_holdup_kg], (batch, 5)."""
        frame = self._frame(x)
        weight = x.narrow(1, self.n_tank_states, 1)
        last = frame.select(1, -1)
        last_kg = last.sum(dim=1, keepdim=True)
        # The floor only acts on an empty feed frame (< 1e-12 kg): 0 %LC there instead of 0/0.
        api_fraction = last.narrow(1, self.api_index, 1) / last_kg.clamp_min(1e-12)
        if self.recipe:
            # Likewise only a dose below 1e-12 mg (no recipe: every setpoint 0) meets the floor.
            dose = x.narrow(1, self.n_tank_states + 1, 1).clamp_min(1e-12)
        else:
            dose = theta[2]
        api_lc = weight * api_fraction * 100.0 / dose
        # W is nonnegative, but a residual may push it below 0 (its bound times tau_W can
        # exceed W_sp): there the force's fractional power was NaN while the solver reported
        # success. The floor (1e-6 mg) only acts below it.
        filled = weight.clamp_min(1e-6)
        force = theta[3] * torch.pow(filled / theta[4], theta[5])
        out_kg_h = last_kg * 3600.0 / self._tank_residence_s(theta)
        turret = out_kg_h * (1e6 / (60.0 * self.stations)) / filled
        holdup = frame.flatten(1).sum(dim=1, keepdim=True)
        return torch.cat([weight, api_lc, force, turret, holdup], dim=1)

    def inventory(self, x: Tensor) -> Tensor:
        """Component masses in the feed frame, (batch, n_components), kg."""
        return self._frame(x).sum(dim=1)

    def steady_state(self, u: Tensor, inflow: Tensor, theta: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Each frame tank holds in * tau_frame / (3600 n); weight at its setpoint; recipe dose
        W_sp F_api,sp / sum_c F_c,sp."""
        tank = inflow * self._tank_residence_s(theta) / 3600.0
        tanks = tank.unsqueeze(1).expand(-1, self.n_frame_tanks, -1).flatten(1)
        parts = [tanks, u.narrow(1, 0, 1)]
        if self.recipe:
            parts.append(self.recipe_dose_mg(u))
        return torch.cat(parts, dim=1), inflow
