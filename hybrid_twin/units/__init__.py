"""Mechanistic unit models, one file per unit operation, and the UNITS registry.

Registry key = flowsheet config `type:` = class: `{"type": "liw_feeder"}` builds a
`LossInWeightFeeder`. A unit of the user's own (an `AbstractUnit` subclass) is named with
`_target_: package.module.Class` instead of `type:` (hybrid_twin.flowsheet, docs/plants.md).
"""

from hybrid_twin.units.base import AbstractUnit as AbstractUnit
from hybrid_twin.units.blender import TanksInSeriesBlender as TanksInSeriesBlender
from hybrid_twin.units.feeder import LossInWeightFeeder as LossInWeightFeeder
from hybrid_twin.units.linear import LinearStateSpace as LinearStateSpace
from hybrid_twin.units.press import TabletPress as TabletPress
from hybrid_twin.units.tanks import CascadedTanks as CascadedTanks

UNITS: dict[str, type[AbstractUnit]] = {
    "liw_feeder": LossInWeightFeeder,
    "tanks_in_series_blender": TanksInSeriesBlender,
    "tablet_press": TabletPress,
    "cascaded_tanks": CascadedTanks,
    "linear_state_space": LinearStateSpace,
}
