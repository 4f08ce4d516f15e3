"""Component transport through equal tanks in series: the mixing core of blender and feed frame.

blender.py and press.py call `transport_series` once per integration step. Each tank holds
the same total mass; a change of the series' hold-up spreads evenly over the tanks, so the
total flow between tank k and k+1 interpolates linearly between inflow and outflow. Component
masses move upwind (each flow carries the composition of the tank it leaves), which keeps
every component's balance exact to rounding: what leaves one tank enters the next.
"""

import numpy as np

_TINY_KG = 1e-12


def transport_series(
    comp_kg: np.ndarray,
    tank_kg: np.ndarray,
    inflow_kg_s: np.ndarray,
    inflow_frac: np.ndarray,
    outflow_kg_s: np.ndarray,
    dt_s: float,
) -> np.ndarray:
    """Advance the component masses of a tank series by one explicit upwind step (in place).

    Args:
        comp_kg: (n_runs, n_comp, n_tanks) component mass per tank, kg; updated in place.
        tank_kg: (n_runs,) total mass of one tank before the step, kg (the composition basis).
        inflow_kg_s: (n_runs,) total flow into the first tank, kg/s.
        inflow_frac: (n_runs, n_comp) mass fractions of the inflow.
        outflow_kg_s: (n_runs,) total flow out of the last tank, kg/s.
        dt_s: step, s. Positivity needs flow * dt below a tank's mass: the config check
            (config._check_transport_steps) keeps it under half a tank.

    Returns:
        (n_runs, n_comp) component mass that left the last tank during the step, kg.
    """
    n_tanks = comp_kg.shape[-1]
    # an empty tank has nothing to pass on (its components are 0 too)
    frac = comp_kg / np.maximum(tank_kg, _TINY_KG)[:, None, None]
    share = np.arange(1, n_tanks + 1) / n_tanks
    # boundary k (after tank k): F_k = F_in + (F_out - F_in) * k / n
    boundary_kg = (inflow_kg_s * dt_s)[:, None] + ((outflow_kg_s - inflow_kg_s) * dt_s)[
        :, None
    ] * share
    leaving = boundary_kg[:, None, :] * frac
    comp_kg -= leaving
    comp_kg[:, :, 0] += (inflow_kg_s * dt_s)[:, None] * inflow_frac
    comp_kg[:, :, 1:] += leaving[:, :, :-1]
    return leaving[:, :, -1]
