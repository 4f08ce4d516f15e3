"""Flowsheet specs of the built-in plants, the same mappings as configs/flowsheet/<key>.yaml.

`FLOWSHEETS[key]()` returns a fresh spec for `build_flowsheet`; a test checks each against its
YAML file so the two never drift apart.
"""

from collections.abc import Callable


def cdc_line_flowsheet_spec() -> dict[str, object]:
    """The built-in continuous direct compression line (configs/plant/cdc_line.yaml tags).

    Three loss-in-weight feeders (API, excipient, lubricant) -> tanks-in-series blender (NIR
    at its outlet) -> tablet press. Nominal point (centre of the line's design space):
    30 kg/h at 10 % API and 1 % lubricant, 400 rpm, 400 mg tablets (a 40 mg dose). The press
    reports tablet API against the running recipe's dose (`label_claim: recipe`), as the
    plant's at-line assay does while a run steps the API fraction, so each feeder setpoint
    tag also feeds the press's recipe input of its component.
    """
    return {
        "name": "cdc_line",
        "components": ["api", "excipient", "lubricant"],
        "units": {
            "feeder_api": {
                "type": "liw_feeder",
                "component": "api",
                "nominal_flow_kg_h": 3.0,
                "flow_range_kg_h": [0.0, 10.0],
                "hopper_nominal_kg": 5.0,
                "params": {"starve_mass_kg": 0.1},
            },
            "feeder_exc": {
                "type": "liw_feeder",
                "component": "excipient",
                "nominal_flow_kg_h": 26.7,
                "flow_range_kg_h": [0.0, 80.0],
                "hopper_nominal_kg": 25.0,
                "params": {"starve_mass_kg": 1.0},
            },
            "feeder_lub": {
                "type": "liw_feeder",
                "component": "lubricant",
                "nominal_flow_kg_h": 0.3,
                "flow_range_kg_h": [0.0, 2.0],
                "hopper_nominal_kg": 1.0,
                "params": {"starve_mass_kg": 0.03},
            },
            "blender": {
                "type": "tanks_in_series_blender",
                "n_tanks": 5,
                "nominal_speed_rpm": 400.0,
                "speed_range_rpm": [0.0, 1200.0],
                "params": {
                    "holdup_ref_kg": 0.6,
                    "throughput_ref_kg_h": 30.0,
                    "speed_ref_rpm": 400.0,
                },
            },
            "press": {
                "type": "tablet_press",
                "api_component": "api",
                "n_frame_tanks": 1,
                "nominal_weight_mg": 400.0,
                "weight_range_mg": [50.0, 1000.0],
                "stations": 24,
                "nominal_holdup_kg": 0.15,
                "label_claim": "recipe",
                "nominal_feed_sp_kg_h": {"api": 3.0, "excipient": 26.7, "lubricant": 0.3},
                "feed_sp_range_kg_h": [0.0, 80.0],
                "params": {"label_claim_mg": 40.0, "weight_ref_mg": 400.0, "force_ref_kN": 15.0},
            },
        },
        "streams": [
            ["feeder_api", "blender"],
            ["feeder_exc", "blender"],
            ["feeder_lub", "blender"],
            ["blender", "press"],
        ],
        "inputs": {
            "FEED_API.MASSFLOW_SP": ["feeder_api.mass_flow_sp_kg_h", "press.api_sp_kg_h"],
            "FEED_EXC.MASSFLOW_SP": ["feeder_exc.mass_flow_sp_kg_h", "press.excipient_sp_kg_h"],
            "FEED_LUB.MASSFLOW_SP": ["feeder_lub.mass_flow_sp_kg_h", "press.lubricant_sp_kg_h"],
            "BLEND.SPEED_SP": "blender.speed_sp_rpm",
            "PRESS.WEIGHT_SP": "press.weight_sp_mg",
        },
        "measurements": {
            "FEED_API.MASSFLOW": "feeder_api.mass_flow_kg_h",
            "FEED_EXC.MASSFLOW": "feeder_exc.mass_flow_kg_h",
            "FEED_LUB.MASSFLOW": "feeder_lub.mass_flow_kg_h",
            "BLEND.SPEED": "blender.speed_rpm",
            "NIR.API_CONC": "blender.api_conc_pct_ww",
            "PRESS.COMP_FORCE": "press.comp_force_kN",
            "PRESS.TABLET_WEIGHT": "press.tablet_weight_mg",
            "PRESS.TABLET_API": "press.tablet_api_pct_lc",
        },
        "disturbances": {
            "FEED_API.HOPPER_MASS": "feeder_api.hopper_mass_kg",
            "FEED_EXC.HOPPER_MASS": "feeder_exc.hopper_mass_kg",
            "FEED_LUB.HOPPER_MASS": "feeder_lub.hopper_mass_kg",
            "PRESS.TURRET_SPEED": "press.turret_speed_rpm",
        },
        "calibrated": ["NIR.API_CONC"],
    }


def cascaded_tanks_flowsheet_spec() -> dict[str, object]:
    """The Cascaded Tanks benchmark rig (configs/plant/cascaded_tanks.yaml tags).

    One `cascaded_tanks` unit: pump -> upper tank -> lower tank, Torricelli outflows, the level
    sensor read unclipped (so the 10 V samples teach the residual the overflow; the YAML says
    why); nominal pump voltage 2.8 V, the estimation record's mean. The measured output shares
    its name with the lower level state, so the past window resets it.
    """
    return {
        "name": "cascaded_tanks",
        "components": ["water"],
        "units": {
            "tanks": {
                "type": "cascaded_tanks",
                "nominal_pump_v": 2.8,
                "pump_range_v": [0.0, 10.0],
                "level_scale_v": 5.0,
                "saturation_v": None,
            }
        },
        "streams": [],
        "inputs": {"PUMP.VOLTAGE": "tanks.pump_v"},
        "measurements": {"TANK2.LEVEL": "tanks.lower_level_v"},
    }


def cascaded_tanks_overflow_flowsheet_spec() -> dict[str, object]:
    """The Cascaded Tanks rig with the tanks' overflow in the prior (hybrid_twin/units/tanks.py,
    after Rogers et al. 2017): a full tank stops rising and spills, part of the upper tank's
    spill into the lower one. Otherwise as `cascaded_tanks_flowsheet_spec`."""
    spec = cascaded_tanks_flowsheet_spec()
    spec["name"] = "cascaded_tanks_overflow"
    spec["units"]["tanks"].update({"overflow": True, "overflow_width_v": 0.5})
    return spec


def cascaded_tanks_linear_flowsheet_spec() -> dict[str, object]:
    """A learned linear state-space prior for the Cascaded Tanks rig: two states, starting as
    two first-order lags of 100 s (hybrid_twin/units/linear.py)."""
    return {
        "name": "cascaded_tanks_linear",
        "components": ["water"],
        "units": {
            "linear": {
                "type": "linear_state_space",
                "n_states": 2,
                "time_constant_s": 100.0,
                "inputs": {"pump_v": {"unit": "V", "nominal": 2.8, "range": [0.0, 10.0]}},
                "outputs": {"level_v": {"unit": "V", "nominal": 5.6, "scale": 2.2}},
            }
        },
        "streams": [],
        "inputs": {"PUMP.VOLTAGE": "linear.pump_v"},
        "measurements": {"TANK2.LEVEL": "linear.level_v"},
    }


FLOWSHEETS: dict[str, Callable[[], dict[str, object]]] = {
    "cdc_line": cdc_line_flowsheet_spec,
    "cascaded_tanks": cascaded_tanks_flowsheet_spec,
    "cascaded_tanks_overflow": cascaded_tanks_overflow_flowsheet_spec,
    "cascaded_tanks_linear": cascaded_tanks_linear_flowsheet_spec,
}
