"""The tag dictionary: what the plant says each historian tag is.

`configs/plant/<plant>.yaml` holds `tags: {TAG: {role, unit, sample_period_s, range,
max_hold_s, description}}` (docs/data_contracts.md section 2; max_hold_s and description
optional). `prepare` receives that mapping as a plain
dict and turns it here into a `TagDictionary`, the one object the later stages ask about a
tag's role, unit and valid range. The dictionary's order is kept: it is the column order of
the prepared files and of the model's inputs and outputs.
"""

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass

from data_pipelines.errors import ConfigError, config_number

ROLES = ("input", "disturbance", "measurement")
_REQUIRED_KEYS = ("role", "unit", "sample_period_s", "range")
_VALID_KEYS = (*_REQUIRED_KEYS, "max_hold_s", "description")
HELD_ROLES = ("input", "disturbance")


@dataclass(frozen=True)
class TagSpec:
    """One tag of the dictionary.

    Attributes:
        name: historian tag name, e.g. "FEED_API.MASSFLOW".
        role: "input" (manipulated, zero-order held), "disturbance" (measured, held like an
            input) or "measurement" (predicted by the twin, never interpolated).
        unit: engineering unit as written in the export, compared verbatim ("kg/h").
        sample_period_s: nominal historian sample period in seconds.
        range_low: lowest valid value, in `unit`.
        range_high: highest valid value, in `unit`.
        max_hold_s: for a held tag, the oldest its last valid sample may be and still stand
            for its value on the grid; None: held however old (a historian that writes a
            setpoint only when it changes).
        description: free text.
    """

    name: str
    role: str
    unit: str
    sample_period_s: float
    range_low: float
    range_high: float
    max_hold_s: float | None = None
    description: str = ""

    def as_manifest(self) -> dict:
        """The tag as manifest.json stores it: role, unit, sample_period_s, range, and
        max_hold_s where the dictionary sets one."""
        entry = {
            "role": self.role,
            "unit": self.unit,
            "sample_period_s": self.sample_period_s,
            "range": [self.range_low, self.range_high],
        }
        if self.max_hold_s is not None:
            entry["max_hold_s"] = self.max_hold_s
        return entry


class TagDictionary:
    """The plant's tags, in dictionary order, with lookups by name and role.

    Build it with `TagDictionary.from_mapping(cfg["tags"])`.
    """

    def __init__(self, specs: list[TagSpec]):
        self.specs = {spec.name: spec for spec in specs}
        if len(self.specs) != len(specs):
            raise ConfigError("tag dictionary names a tag twice")

    @classmethod
    def from_mapping(cls, tags: Mapping) -> "TagDictionary":
        """Build the dictionary from the `tags:` mapping of a plant config.

        Args:
            tags: {TAG: {role, unit, sample_period_s, range: [low, high], description}}.

        Returns:
            The TagDictionary, in the mapping's order.

        Raises:
            ConfigError: empty mapping, unknown or missing key, unknown role, a non-positive
                sample period, a range that is not two finite numbers with low <= high, or a
                max_hold_s on a measurement or below the tag's sample period.
        """
        if not isinstance(tags, Mapping) or not tags:
            raise ConfigError("tag dictionary is empty: expected {TAG: {role, unit, ...}}")
        return cls([_parse_spec(str(name), entry) for name, entry in tags.items()])

    @property
    def names(self) -> list[str]:
        """All tag names in dictionary order."""
        return list(self.specs)

    def with_role(self, role: str) -> list[str]:
        """Tag names of one role ("input", "disturbance", "measurement") in dictionary order."""
        return [name for name, spec in self.specs.items() if spec.role == role]

    @property
    def held(self) -> list[str]:
        """Inputs then disturbances: the tags that are zero-order held on the grid."""
        return [name for role in HELD_ROLES for name in self.with_role(role)]

    @property
    def column_order(self) -> list[str]:
        """Inputs, disturbances, measurements: the tag columns of a prepared run file."""
        return self.held + self.with_role("measurement")

    def close_matches(self, name: str, n: int = 3) -> list[str]:
        """Up to `n` dictionary tags spelled like `name`, for "did you mean" messages; a tag
        that differs in case only comes first (difflib alone missed `pump.voltage`)."""
        same_letters = [t for t in self.names if t.casefold() == name.casefold() and t != name]
        close = difflib.get_close_matches(name, self.names, n=n, cutoff=0.6)
        return [*same_letters, *(t for t in close if t not in same_letters)][:n]

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def __getitem__(self, name: str) -> TagSpec:
        return self.specs[name]

    def __len__(self) -> int:
        return len(self.specs)


def _parse_spec(name: str, entry: object) -> TagSpec:
    """One `TAG: {...}` entry -> TagSpec; raises ConfigError naming the tag."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"tag {name}: expected a mapping of {list(_VALID_KEYS)}, got {entry!r}")
    unknown = sorted(set(entry) - set(_VALID_KEYS))
    if unknown:
        raise ConfigError(f"tag {name}: unknown keys {unknown}; valid keys: {list(_VALID_KEYS)}")
    missing = [key for key in _REQUIRED_KEYS if key not in entry]
    if missing:
        raise ConfigError(f"tag {name}: missing keys {missing}")
    if entry["role"] not in ROLES:
        raise ConfigError(f"tag {name}: role {entry['role']!r} is not one of {list(ROLES)}")
    period = config_number(entry["sample_period_s"], f"tag {name}: sample_period_s")
    if not 0 < period < math.inf:
        raise ConfigError(f"tag {name}: sample_period_s must be > 0, got {period}")
    rng = entry["range"]
    if not isinstance(rng, (list, tuple)) or len(rng) != 2:
        raise ConfigError(f"tag {name}: range must be [low, high], got {rng!r}")
    low, high = (config_number(v, f"tag {name}: range") for v in rng)
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ConfigError(f"tag {name}: range must be finite with low <= high, got {rng!r}")
    return TagSpec(
        name=name,
        role=str(entry["role"]),
        unit=str(entry["unit"]),
        sample_period_s=period,
        range_low=low,
        range_high=high,
        max_hold_s=_max_hold(name, entry, period),
        description=str(entry.get("description", "")),
    )


def _max_hold(name: str, entry: Mapping, period: float) -> float | None:
    """The tag's max_hold_s (None where absent or null), checked against its role and period."""
    value = entry.get("max_hold_s")
    if value is None:
        return None
    if entry["role"] not in HELD_ROLES:
        raise ConfigError(
            f"tag {name}: max_hold_s applies to held tags (roles {list(HELD_ROLES)}); a "
            f"{entry['role']} is never held"
        )
    max_hold = config_number(value, f"tag {name}: max_hold_s")
    if not period <= max_hold < math.inf:
        raise ConfigError(
            f"tag {name}: max_hold_s must be finite and >= its sample_period_s ({period:g} s), "
            f"got {max_hold:g}: below it, every stretch between two samples would count as lost"
        )
    return max_hold
