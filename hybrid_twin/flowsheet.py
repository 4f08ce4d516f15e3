"""Composes unit models into one vector field over the line's named global state.

A flowsheet spec (a plain mapping; training/ translates Hydra configs into it) names the
components, the units and the streams between them; `build_flowsheet` checks it and returns a
`Flowsheet`, which is itself a vector field (`theta()`, `rhs(x, u, theta)`) that the solvers
integrate and `hybrid_twin.hybrid.HybridVectorField` wraps. Units are kept in topological order
of the streams; the global state, input, output and parameter vectors are the units' vectors
concatenated in that order, named "<unit>.<name>".
"""

import importlib
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from hybrid_twin.errors import ConfigError, unknown_key_message
from hybrid_twin.units import UNITS
from hybrid_twin.units.base import AbstractUnit

SPEC_KEYS = (
    "name",
    "components",
    "units",
    "streams",
    "inputs",
    "measurements",
    "disturbances",
    "calibrated",
)


def input_targets(inputs: Mapping[str, object]) -> list[tuple[str, str]]:
    """(tag, "unit.input") pairs of a flowsheet spec's `inputs`, in spec and list order.

    One plant signal may drive several unit inputs (a feeder setpoint feeds its feeder and the
    press's recipe), so a value is either one "unit.input" or a list of them.

    Args:
        inputs: {tag: "unit.input" or ["unit.input", ...]}.

    Returns:
        One pair per target; a tag with n targets gives n pairs.

    Raises:
        ConfigError: a value that is neither a string nor a non-empty list of strings.
    """
    pairs: list[tuple[str, str]] = []
    for tag, value in dict(inputs).items():
        targets = [value] if isinstance(value, str) else value
        if (
            not isinstance(targets, Sequence)
            or not targets
            or not all(isinstance(t, str) for t in targets)
        ):
            raise ConfigError(
                f"flowsheet.inputs.{tag}: expected 'unit.input' or a non-empty list of them, "
                f"got {value!r}"
            )
        pairs.extend((str(tag), target) for target in targets)
    return pairs


def _offsets(sizes: Sequence[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


class Flowsheet(nn.Module):
    """A line of unit models connected by material streams.

    Args:
        units: the units in topological order (every upstream unit before its downstream).
        upstream: for each unit, indices of the units feeding it.
        components: component names of the streams.
        tags: {"inputs": {tag: "unit.input" or ["unit.input", ...]}, "measurements": {...},
            "disturbances": {...}, "calibrated": [tag, ...]}, kept as metadata for the
            observation model and training.

    Attributes:
        state_names, input_names, output_names, param_names: "<unit>.<name>" in vector order.
        input_tags: plant tag of each input (aligned with input_names) where the spec maps one;
            a tag that feeds several unit inputs appears once for each of them.

    Raises:
        ConfigError: an inputs entry that is neither a name nor a list of names.
    """

    state_slices: list[tuple[int, int]]
    input_slices: list[tuple[int, int]]
    param_slices: list[tuple[int, int]]
    upstream: list[list[int]]

    def __init__(
        self,
        units: Sequence[AbstractUnit],
        upstream: Sequence[Sequence[int]],
        components: Sequence[str],
        tags: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.upstream = [list(up) for up in upstream]
        self.components = list(components)
        self.n_components = len(self.components)
        self.unit_names = [unit.unit_name for unit in units]
        self.state_specs = [spec for unit in units for spec in unit.state_specs]
        self.input_specs = [spec for unit in units for spec in unit.input_specs]
        self.param_specs = [spec for unit in units for spec in unit.params.specs]
        self.state_names = [f"{u.unit_name}.{s.name}" for u in units for s in u.state_specs]
        self.input_names = [f"{u.unit_name}.{s.name}" for u in units for s in u.input_specs]
        self.output_names = [f"{u.unit_name}.{s.name}" for u in units for s in u.output_specs]
        self.param_names = [f"{u.unit_name}.{n}" for u in units for n in u.params.names]
        self.state_slices = _offsets([len(u.state_specs) for u in units])
        self.input_slices = _offsets([len(u.input_specs) for u in units])
        self.param_slices = _offsets([len(u.params.names) for u in units])
        self.n_states, self.n_inputs = len(self.state_names), len(self.input_names)
        self.n_outputs, self.n_params = len(self.output_names), len(self.param_names)
        self.tags = dict(tags or {})
        pairs = input_targets(self.tags.get("inputs", {}))  # type: ignore[arg-type]
        by_input = {target: tag for tag, target in pairs}
        self.input_tags = [by_input.get(name, "") for name in self.input_names]

    def theta(self) -> Tensor:
        """Physical parameter values of all units, (1, n_params)."""
        values: list[Tensor] = []
        for unit in self.units:
            values.append(unit.params.values())
        return torch.cat(values).unsqueeze(0)

    def _inflow(self, i: int, outflows: list[Tensor], no_inflow: Tensor) -> Tensor:
        upstream = self.upstream[i]
        if len(upstream) == 0:
            return no_inflow
        inflow = outflows[upstream[0]]
        for j in upstream[1:]:
            inflow = inflow + outflows[j]
        return inflow

    def _evaluate(self, x: Tensor, u: Tensor, theta: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        derivatives: list[Tensor] = []
        outflows: list[Tensor] = []
        no_inflow = torch.zeros(x.shape[0], self.n_components, dtype=x.dtype, device=x.device)
        columns = theta.split(1, dim=1)  # one split per evaluation, not one slice per parameter
        for i, unit in enumerate(self.units):
            inflow = self._inflow(i, outflows, no_inflow)
            s0, s1 = self.state_slices[i]
            i0, i1 = self.input_slices[i]
            p0, p1 = self.param_slices[i]
            dx, out = unit.derivative(
                x.narrow(1, s0, s1 - s0),
                u.narrow(1, i0, i1 - i0),
                inflow,
                columns[p0:p1],
            )
            derivatives.append(dx)
            outflows.append(out)
        return derivatives, outflows

    @torch.jit.export
    def rhs(self, x: Tensor, u: Tensor, theta: Tensor) -> Tensor:
        """dx/dt = f_mech(x, u; theta).

        Args:
            x: states, (batch, n_states), units of `state_specs`.
            u: inputs, (batch, n_inputs), units of `input_specs`.
            theta: parameter values, (1 or batch, n_params), from `theta()`.

        Returns:
            dx/dt, (batch, n_states), state units per second.
        """
        return torch.cat(self._evaluate(x, u, theta)[0], dim=1)

    @torch.jit.export
    def flows(self, x: Tensor, u: Tensor, theta: Tensor) -> Tensor:
        """Outlet stream of every unit, (batch, n_units, n_components), kg/h."""
        return torch.stack(self._evaluate(x, u, theta)[1], dim=1)

    @torch.jit.export
    def outputs(self, x: Tensor, theta: Tensor) -> Tensor:
        """All unit outputs h(x), (batch, n_outputs), in `output_names` order."""
        values: list[Tensor] = []
        columns = theta.split(1, dim=1)
        for i, unit in enumerate(self.units):
            s0, s1 = self.state_slices[i]
            p0, p1 = self.param_slices[i]
            values.append(unit.outputs(x.narrow(1, s0, s1 - s0), columns[p0:p1]))
        return torch.cat(values, dim=1)

    @torch.jit.export
    def inventory(self, x: Tensor) -> Tensor:
        """Material held in each unit, (batch, n_units, n_components), kg."""
        values: list[Tensor] = []
        for i, unit in enumerate(self.units):
            s0, s1 = self.state_slices[i]
            values.append(unit.inventory(x.narrow(1, s0, s1 - s0)))
        return torch.stack(values, dim=1)

    @torch.jit.export
    def steady_state(self, u: Tensor, theta: Tensor) -> Tensor:
        """Operating point for constant inputs, (batch, n_states); u: (batch, n_inputs)."""
        states: list[Tensor] = []
        outflows: list[Tensor] = []
        no_inflow = torch.zeros(u.shape[0], self.n_components, dtype=u.dtype, device=u.device)
        columns = theta.split(1, dim=1)
        for i, unit in enumerate(self.units):
            inflow = self._inflow(i, outflows, no_inflow)
            i0, i1 = self.input_slices[i]
            p0, p1 = self.param_slices[i]
            x, out = unit.steady_state(u.narrow(1, i0, i1 - i0), inflow, columns[p0:p1])
            states.append(x)
            outflows.append(out)
        return torch.cat(states, dim=1)

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        """dx/dt at the current parameters; see `rhs`."""
        return self.rhs(x, u, self.theta())

    def nominal_inputs(self) -> Tensor:
        """Nominal input vector from the InputSpecs, (1, n_inputs)."""
        return torch.tensor([[spec.nominal for spec in self.input_specs]])

    def sinks(self) -> list[int]:
        """Indices of units whose outflow leaves the line (no downstream unit)."""
        fed = {j for up in self.upstream for j in up}
        return [i for i in range(len(self.unit_names)) if i not in fed]


def build_flowsheet(spec: Mapping[str, object]) -> Flowsheet:
    """Build a Flowsheet from a spec mapping (see configs/flowsheet/cdc_line.yaml).

    Args:
        spec: {"components": [...], "units": {name: {"type": key, ...kwargs}} (or
            {"_target_": "package.module.Class", ...kwargs} for a unit class of the user's),
            "streams": [[from, to], ...], optional "inputs" ({tag: "unit.input" or a list
            of them}), "measurements"/"disturbances" ({tag: "unit.output"}), "calibrated"
            ([tag]), "name"}.

    Returns:
        The flowsheet with units in topological order of the streams.

    Raises:
        ConfigError: unknown keys, unit types or names, a stream cycle, a stream into a
            unit that takes none, a tag mapped to an unknown quantity, a unit input left
            unmapped or mapped more than once, one tag feeding inputs of different engineering
            units or nominal values; a `_target_` that cannot be imported or is no
            AbstractUnit; a unit whose methods return shapes its specs do not declare
            (`check_unit_shapes`).
    """
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise ConfigError(unknown_key_message("flowsheet key", sorted(unknown)[0], SPEC_KEYS))
    components = [str(c) for c in spec.get("components", ())]  # type: ignore[attr-defined]
    if not components or len(set(components)) != len(components):
        raise ConfigError(f"flowsheet.components: expected distinct names, got {components}")
    unit_specs = dict(spec.get("units", {}))  # type: ignore[call-overload]
    if not unit_specs:
        raise ConfigError("flowsheet.units: expected at least one unit")
    upstream = _upstream_by_name(unit_specs, spec.get("streams", ()))  # type: ignore[arg-type]
    order = _topological_order(list(unit_specs), upstream)
    units = [_build_unit(name, unit_specs[name], components) for name in order]
    for name, unit in zip(order, units, strict=True):
        if upstream[name] and not getattr(unit, "accepts_inflow", True):
            raise ConfigError(f"flowsheet.streams: {name} ({type(unit).__name__}) takes no inflow")
    index = {name: i for i, name in enumerate(order)}
    tags = {
        key: spec[key]
        for key in ("inputs", "measurements", "disturbances", "calibrated")
        if key in spec
    }
    flowsheet = Flowsheet(units, [[index[u] for u in upstream[n]] for n in order], components, tags)
    _check_tags(flowsheet)
    return flowsheet


def _build_unit(name: str, unit_spec: Mapping[str, object], components: list[str]) -> AbstractUnit:
    options = dict(unit_spec)
    kind = options.pop("type", None)
    target = options.pop("_target_", None)
    if target is not None:
        if kind is not None:
            raise ConfigError(
                f"flowsheet.units.{name}: give either type (a unit of the library) or "
                f"_target_ (a unit class of your own), not both"
            )
        cls, label = user_unit_class(name, str(target)), str(target)
    elif kind in UNITS:
        cls, label = UNITS[str(kind)], str(kind)
    else:
        raise ConfigError(
            f"flowsheet.units.{name}: "
            + unknown_key_message("unit type", str(kind), UNITS)
            + "; or name a class of your own with _target_: package.module.Class"
        )
    valid = cls.config_keys()
    for key in options:
        if key not in valid:
            raise ConfigError(
                f"flowsheet.units.{name}: " + unknown_key_message(f"{label} key", key, valid)
            )
    try:
        unit = cls(name, components, **options)  # type: ignore[arg-type]
    except TypeError as error:  # a required key is missing
        raise ConfigError(f"flowsheet.units.{name} ({label}): {error}") from None
    check_unit_shapes(unit, f"flowsheet.units.{name} ({label})")
    return unit


def user_unit_class(name: str, target: str) -> type[AbstractUnit]:
    """The unit class a flowsheet's `_target_: package.module.Class` names (a user's prior).

    Args:
        name: the unit's name in the flowsheet, for messages.
        target: dotted path of an `AbstractUnit` subclass, importable from `sys.path`.

    Raises:
        ConfigError: the module cannot be imported, has no such attribute, or it is not an
            AbstractUnit subclass.
    """
    where = f"flowsheet.units.{name}._target_"
    module_name, _, attribute = target.rpartition(".")
    if not module_name:
        raise ConfigError(f"{where}: expected package.module.Class, got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"{where}: cannot import module {module_name!r} ({error}); it must be installed "
            f"or its folder on PYTHONPATH"
        ) from error
    cls = getattr(module, attribute, None)
    if cls is None:
        raise ConfigError(f"{where}: module {module_name!r} has no attribute {attribute!r}")
    if not (isinstance(cls, type) and issubclass(cls, AbstractUnit)) or cls is AbstractUnit:
        raise ConfigError(
            f"{where}: {target!r} is not a subclass of hybrid_twin.AbstractUnit (a unit "
            f"declares state_specs, input_specs, output_specs and implements derivative, "
            f"outputs, inventory and steady_state; docs/plants.md)"
        )
    return cls


def check_unit_shapes(unit: AbstractUnit, where: str) -> None:
    """Evaluate a unit once at its nominal inputs and check every result against its specs.

    A unit whose `derivative` returns another number of states than its `state_specs`
    declare (or outputs, or a stream of the wrong width) would otherwise fail deep inside a
    training step, or silently shift every later unit's states; this stops it at build time.

    Args:
        unit: the constructed unit.
        where: config location for messages, e.g. "flowsheet.units.tanks (my.Tanks)".

    Raises:
        ConfigError: a method fails on the nominal point or returns a wrong shape; the
            message names the method, the shape it returned and the one its specs declare.
    """
    n_states, n_outputs = len(unit.state_specs), len(unit.output_specs)
    n_components = unit.n_components
    with torch.no_grad():
        u = torch.tensor([[spec.nominal for spec in unit.input_specs]]).reshape(1, -1)
        inflow = torch.zeros(1, n_components)
        theta = unit.theta()
        try:
            x, out = unit.steady_state(u, inflow, theta)
            _expect(where, "steady_state states", x, (1, n_states), "state_specs")
            _expect(where, "steady_state outflow", out, (1, n_components), "components")
            dx, out = unit.derivative(x, u, inflow, theta)
            _expect(where, "derivative dx/dt", dx, (1, n_states), "state_specs")
            _expect(where, "derivative outflow", out, (1, n_components), "components")
            _expect(where, "outputs", unit.outputs(x, theta), (1, n_outputs), "output_specs")
            _expect(where, "inventory", unit.inventory(x), (1, n_components), "components")
        except (RuntimeError, IndexError, TypeError, ValueError) as error:
            if isinstance(error, ConfigError):
                raise
            raise ConfigError(
                f"{where}: evaluating the unit at its nominal inputs failed "
                f"({type(error).__name__}: {error}); check that derivative, outputs and "
                f"steady_state use {n_states} states and {u.shape[1]} inputs as declared"
            ) from error


def _expect(where: str, what: str, value: object, shape: tuple[int, int], spec: str) -> None:
    got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
    if got != shape:
        raise ConfigError(
            f"{where}: {what} has shape {got}, expected {shape} from its {spec} "
            f"(batch 1, {shape[1]} declared)"
        )


def _upstream_by_name(
    unit_specs: Mapping[str, object], streams: Sequence[Sequence[str]]
) -> dict[str, list[str]]:
    upstream: dict[str, list[str]] = {name: [] for name in unit_specs}
    for stream in streams:
        if len(stream) != 2:
            raise ConfigError(f"flowsheet.streams: expected [from, to], got {list(stream)}")
        source, target = (str(s) for s in stream)
        for end in (source, target):
            if end not in unit_specs:
                raise ConfigError(
                    "flowsheet.streams: " + unknown_key_message("unit", end, unit_specs)
                )
        if source == target or source in upstream[target]:
            raise ConfigError(
                f"flowsheet.streams: stream {source} -> {target} is a self-loop or duplicate"
            )
        fed = [name for name, sources in upstream.items() if source in sources]
        if fed:  # each downstream unit would get the whole outflow: mass made from nothing
            raise ConfigError(
                f"flowsheet.streams: {source} feeds {fed[0]} and {target}; a unit's outflow "
                "goes to one unit (splits are not supported)"
            )
        upstream[target].append(source)
    return upstream


def _topological_order(names: list[str], upstream: Mapping[str, list[str]]) -> list[str]:
    order: list[str] = []
    while len(order) < len(names):
        ready = [n for n in names if n not in order and all(u in order for u in upstream[n])]
        if not ready:
            left = [n for n in names if n not in order]
            raise ConfigError(
                f"flowsheet.streams: units {left} form a cycle (recycles are not supported)"
            )
        order.append(ready[0])  # declaration order among the ready units keeps names stable
    return order


def _check_tags(flowsheet: Flowsheet) -> None:
    tags = flowsheet.tags
    for key, valid in (
        ("inputs", flowsheet.input_names),
        ("measurements", flowsheet.output_names),
        ("disturbances", flowsheet.output_names),
    ):
        mapping = dict(tags.get(key, {}))  # type: ignore[call-overload]
        pairs = input_targets(mapping) if key == "inputs" else list(mapping.items())
        for tag, target in pairs:
            if target not in valid:
                raise ConfigError(
                    f"flowsheet.{key}.{tag}: " + unknown_key_message("quantity", str(target), valid)
                )
    if tags:  # a flowsheet that maps tags maps every unit input (an absent inputs: too)
        _check_input_mapping(flowsheet, input_targets(tags.get("inputs", {})))  # type: ignore[arg-type]
    sections: dict[str, str] = {}
    for key in ("inputs", "measurements", "disturbances"):
        for tag in dict(tags.get(key, {})):  # type: ignore[call-overload]
            if tag in sections:  # consumers merge the sections: one would silently win
                raise ConfigError(
                    f"flowsheet.{key}.{tag}: the tag is in flowsheet.{sections[tag]} too; a tag "
                    "is one signal: an input, a measurement or a disturbance"
                )
            sections[tag] = key
    measured = dict(tags.get("measurements", {}))  # type: ignore[call-overload]
    calibrated = list(tags.get("calibrated", []))  # type: ignore[call-overload]
    for i, tag in enumerate(calibrated):
        if tag not in measured:
            raise ConfigError(
                f"flowsheet.calibrated: {tag!r} is not one of the measurements {sorted(measured)}"
            )
        if tag in calibrated[:i]:
            raise ConfigError(f"flowsheet.calibrated: {tag!r} is listed twice")


def _check_input_mapping(flowsheet: Flowsheet, pairs: list[tuple[str, str]]) -> None:
    """Every unit input gets exactly one tag; a tag's inputs agree on unit and nominal value."""
    tags_of: dict[str, list[str]] = {}
    for tag, target in pairs:
        tags_of.setdefault(target, []).append(tag)
    twice = {target: tags for target, tags in tags_of.items() if len(tags) > 1}
    if twice:
        target, tags = next(iter(twice.items()))
        raise ConfigError(
            f"flowsheet.inputs: unit input {target!r} is mapped more than once (by {tags}); "
            "every unit input needs exactly one tag"
        )
    missing = [name for name in flowsheet.input_names if name not in tags_of]
    if missing:
        raise ConfigError(
            f"flowsheet.inputs: every unit input needs exactly one tag; unmapped: {missing}"
        )
    spec_of = dict(zip(flowsheet.input_names, flowsheet.input_specs, strict=True))
    first: dict[str, str] = {}
    for tag, target in pairs:
        seen = first.setdefault(tag, target)
        a, b = spec_of[seen], spec_of[target]
        if (a.unit, a.nominal) != (b.unit, b.nominal):
            raise ConfigError(
                f"flowsheet.inputs.{tag}: one tag is one signal, but it feeds {seen} "
                f"(nominal {a.nominal} {a.unit}) and {target} (nominal {b.nominal} {b.unit})"
            )
