"""Mechanistic unit models, one file per unit operation, and the UNITS registry.

Registry key = flowsheet config `type:` = class: `{"type": "liw_feeder"}` builds a
`LossInWeightFeeder`.
"""

from hybrid_twin.units.base import AbstractUnit as AbstractUnit
from hybrid_twin.units.blender import TanksInSeriesBlender as TanksInSeriesBlender
from hybrid_twin.units.feeder import LossInWeightFeeder as LossInWeightFeeder
from hybrid_twin.units.press import TabletPress as TabletPress

UNITS: dict[str, type[AbstractUnit]] = {
    "liw_feeder": LossInWeightFeeder,
    "tanks_in_series_blender": TanksInSeriesBlender,
    "tablet_press": TabletPress,
}
