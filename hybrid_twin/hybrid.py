"""Hybrid vector field dx/dt = f_mech(x, u; theta) + g_nn(x, u; phi); observation y = h(x).

`HybridVectorField` wraps a `Flowsheet` (the mechanistic part) and a `ResidualNet`; one config
picks the kind: `mechanistic` (theta only), `black_box` (network only) or `hybrid`, and for
the hybrid whether the network corrects the whole derivative (additive form) or named unit
parameters (closure form). The solvers in `hybrid_twin.solvers` integrate it;
`ObservationModel` maps its states onto the plant's PAT tags.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from hybrid_twin.errors import ConfigError, ShapeError, unknown_key_message
from hybrid_twin.flowsheet import Flowsheet
from hybrid_twin.residual import ResidualConfig, ResidualNet
from hybrid_twin.specs import ParameterSet, ParamSpec

KINDS = ("mechanistic", "black_box", "hybrid")


class Normaliser(nn.Module):
    """Affine map v -> (v - mean) / std over the last dimension.

    Args:
        mean: (n,) in the quantity's units.
        std: (n,) > 0, same units.

    Raises:
        ShapeError: mean and std are not matching 1-D tensors.
        ConfigError: a std is not finite and positive.
    """

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("std", torch.zeros(0))
        self.register_buffer("inv_std", torch.zeros(0))
        self.set_(mean, std)

    def set_(self, mean: Tensor, std: Tensor) -> None:
        """Replace the statistics in place (e.g. with training-split statistics)."""
        mean, std = torch.as_tensor(mean), torch.as_tensor(std)
        if mean.dim() != 1 or mean.shape != std.shape:
            raise ShapeError(
                f"Normaliser: expected mean and std of equal shape (n,), got {tuple(mean.shape)} "
                f"and {tuple(std.shape)}"
            )
        if not bool(torch.all(torch.isfinite(std) & (std > 0))):
            raise ConfigError(f"Normaliser: every std must be finite and > 0, got {std.tolist()}")
        dtype = torch.get_default_dtype() if self.mean.numel() == 0 else self.mean.dtype
        self.mean = mean.detach().to(dtype).clone()
        self.std = std.detach().to(dtype).clone()
        self.inv_std = 1.0 / self.std

    @classmethod
    def fit(cls, samples: Tensor, min_std: float = 1e-8) -> "Normaliser":
        """Statistics over all leading dimensions of samples (..., n); std floored at min_std."""
        flat = samples.detach().reshape(-1, samples.shape[-1])
        return cls(flat.mean(dim=0), flat.std(dim=0).clamp_min(min_std))

    def forward(self, v: Tensor) -> Tensor:
        """v: (..., n) -> (..., n) normalised."""
        return (v - self.mean) * self.inv_std

    @torch.jit.export
    def denormalise(self, z: Tensor) -> Tensor:
        """Inverse map, (..., n) -> (..., n)."""
        return z * self.std + self.mean


@dataclass(frozen=True)
class ModelConfig:
    """One config for the three model kinds (configs/model/<kind>.yaml).

    Attributes:
        kind: "mechanistic", "black_box" or "hybrid".
        residual: network settings (ignored by `mechanistic`).
        closure: hybrid only: names "<unit>.<param>" the network corrects multiplicatively
            instead of adding to dx/dt; empty means the additive form.
        readout: hybrid and black_box: measurement tags whose reading h(x) a second network of
            the states corrects multiplicatively (TwinModel applies it); for what the readout
            law misses and no change of the dynamics can explain without distorting another
            state (the compression force's dependence on the blend composition).
    """

    kind: str = "hybrid"
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    closure: tuple[str, ...] = ()
    readout: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError("model: " + unknown_key_message("kind", self.kind, KINDS))
        object.__setattr__(self, "closure", tuple(self.closure))
        object.__setattr__(self, "readout", tuple(self.readout))
        if self.readout and self.kind == "mechanistic":
            raise ConfigError(
                "model.readout: the mechanistic kind has no network to correct a readout with"
            )
        if self.closure and self.kind != "hybrid":
            raise ConfigError(
                f"model.closure: only the hybrid kind has a closure form, got kind={self.kind!r}"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> "ModelConfig":
        """Build from a plain mapping; unknown keys raise ConfigError listing the valid ones."""
        valid = [f.name for f in fields(cls)]
        for key in values:
            if key not in valid:
                raise ConfigError("model: " + unknown_key_message("key", key, valid))
        options = dict(values)
        residual = options.pop("residual", {})
        if not isinstance(residual, ResidualConfig):
            residual = ResidualConfig.from_mapping(dict(residual))  # type: ignore[call-overload]
        return cls(residual=residual, **options)  # type: ignore[arg-type]


def default_normalisers(flowsheet: Flowsheet) -> tuple[Normaliser, Normaliser]:
    """State and input normalisers centred on the nominal steady state.

    States: mean = steady state at nominal inputs, std = its magnitude (a relative deviation),
    or the StateSpec scale where the steady state is 0. Inputs: mean = nominal, std = |nominal|
    or half the range where the nominal is 0. Training replaces them with data statistics.
    """
    with torch.no_grad():
        u_nominal = flowsheet.nominal_inputs()
        x_nominal = flowsheet.steady_state(u_nominal, flowsheet.theta())[0]
    scales = torch.tensor([spec.scale for spec in flowsheet.state_specs])
    x_std = torch.where(x_nominal.abs() > 1e-12 * scales, x_nominal.abs(), scales)
    halves = torch.tensor([(s.bounds[1] - s.bounds[0]) / 2 for s in flowsheet.input_specs])
    u_std = torch.where(u_nominal[0].abs() > 0, u_nominal[0].abs(), halves)
    return Normaliser(x_nominal, x_std), Normaliser(u_nominal[0], u_std)


class HybridVectorField(nn.Module):
    """dx/dt = f_mech(x, u; theta) + g_nn(x, u; phi) in one of three kinds.

    - mechanistic: f_mech only (no network, parameters are theta).
    - black_box: s * g(z), z = normalised (x, u); the flowsheet only names the states.
    - hybrid, additive: f_mech + s * g(z), s = bound * state_std / time_scale_s per state.
    - hybrid, closure: f_mech(x, u; theta'), theta'_j = theta_j exp(c_j g_j(z)) for the
      named parameters, |c_j| = closure_log_bound, clamped into theta_j's bounds.

    Args:
        flowsheet: the mechanistic line.
        config: a ModelConfig or its mapping form; default hybrid.
        generator: for the network's initial weights.

    Raises:
        ConfigError: invalid config or an unknown closure parameter.
    """

    def __init__(
        self,
        flowsheet: Flowsheet,
        config: ModelConfig | Mapping[str, object] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            config = ModelConfig.from_mapping(config or {})
        self.config = config
        self.kind = config.kind
        self.flowsheet = flowsheet
        self.n_states, self.n_inputs = flowsheet.n_states, flowsheet.n_inputs
        for name in config.closure:
            if name not in flowsheet.param_names:
                raise ConfigError(
                    "model.closure: "
                    + unknown_key_message("parameter", name, flowsheet.param_names)
                )
        self.n_closure = len(config.closure)
        closure = [flowsheet.param_names.index(name) for name in config.closure]
        self.register_buffer("closure_index", torch.tensor(closure, dtype=torch.long))
        # A corrected value stays inside its parameter's bounds: exp(+-c) alone took a time
        # constant learned near its 2 s floor to 1.2 s, where one 5 s RK4 step diverges.
        bounds = [flowsheet.param_specs[i].bounds for i in closure]
        dtype = torch.get_default_dtype()
        self.register_buffer("closure_low", torch.tensor([b[0] for b in bounds], dtype=dtype))
        self.register_buffer("closure_high", torch.tensor([b[1] for b in bounds], dtype=dtype))
        self.closure_log_bound = float(config.residual.closure_log_bound)
        self.state_normaliser, self.input_normaliser = default_normalisers(flowsheet)
        self.register_buffer("derivative_scale", torch.zeros(self.n_states))
        self._update_scale()
        self.net: ResidualNet | None = None
        if config.kind != "mechanistic":
            n_out = self.n_closure if self.n_closure else self.n_states
            # zero_init: a hybrid starts as its mechanistic model, a black box as dx/dt = 0
            # (every state held: a persistence forecast, stable from the first step).
            self.net = ResidualNet(
                self.n_states + self.n_inputs,
                n_out,
                config.residual.hidden,
                config.residual.zero_init,
                generator,
                config.residual.fused,
                config.residual.fused_precision,
            )
        self.n_readout = len(config.readout)
        self.readout_log_bound = float(config.residual.readout_log_bound)
        self.readout_net: ResidualNet | None = None
        if self.n_readout > 0:  # zero-initialised: no correction until it learns one
            self.readout_net = ResidualNet(
                self.n_states,
                self.n_readout,
                config.residual.hidden,
                True,
                generator,
                config.residual.fused,
                config.residual.fused_precision,
            )

    def _update_scale(self) -> None:
        residual = self.config.residual
        self.derivative_scale = self.state_normaliser.std * (residual.bound / residual.time_scale_s)

    def set_normalisation(
        self, state_mean: Tensor, state_std: Tensor, input_mean: Tensor, input_std: Tensor
    ) -> None:
        """Replace both normalisers (e.g. with training statistics); the residual bound follows."""
        self.state_normaliser.set_(state_mean, state_std)
        self.input_normaliser.set_(input_mean, input_std)
        self._update_scale()

    @torch.jit.export
    def theta(self) -> Tensor:
        """Physical parameter values, (1, n_params); solvers call it once per solve."""
        return self.flowsheet.theta()

    @torch.jit.export
    def residual(self, x: Tensor, u: Tensor) -> Tensor:
        """Network output g in (-1, 1), (batch, n_states or n_closure); (batch, 0) if none."""
        if self.net is None:
            return torch.zeros(x.shape[0], 0, dtype=x.dtype, device=x.device)
        return self.net(torch.cat([self.state_normaliser(x), self.input_normaliser(u)], dim=1))

    @torch.jit.export
    def readout_correction(self, x: Tensor) -> Tensor:
        """Network output in (-1, 1) per `config.readout` tag, (batch, n_readout); the reading
        becomes h(x) * exp(readout_log_bound * output). (batch, 0) if there is none."""
        if self.readout_net is None:
            return torch.zeros(x.shape[0], 0, dtype=x.dtype, device=x.device)
        return self.readout_net(self.state_normaliser(x))

    @torch.jit.export
    def rhs(self, x: Tensor, u: Tensor, theta: Tensor) -> Tensor:
        """dx/dt for states x (batch, n_states), inputs u (batch, n_inputs), theta (1, n_params).

        Returns:
            (batch, n_states), state units per second.
        """
        if self.net is None:
            return self.flowsheet.rhs(x, u, theta)
        g = self.net(torch.cat([self.state_normaliser(x), self.input_normaliser(u)], dim=1))
        if self.kind == "black_box":
            return g * self.derivative_scale
        if self.n_closure > 0:
            corrected = torch.clamp(
                theta.index_select(1, self.closure_index) * torch.exp(g * self.closure_log_bound),
                self.closure_low,
                self.closure_high,
            )
            theta = theta.expand(x.shape[0], -1).index_copy(1, self.closure_index, corrected)
            return self.flowsheet.rhs(x, u, theta)
        return self.flowsheet.rhs(x, u, theta) + g * self.derivative_scale

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        """dx/dt at the current parameters; see `rhs`."""
        return self.rhs(x, u, self.theta())


class ObservationModel(nn.Module):
    """y = h(x): flowsheet outputs picked per plant tag, with calibration gain/offset.

    A calibrated tag (the NIR concentration: its chemometric model drifts in slope and bias)
    reads gain * h(x) + offset with gain in gain_bounds and offset in +-offset_bound (tag units),
    both learnable; every other tag is h(x) as computed.

    Args:
        flowsheet: the line, with "measurements"/"disturbances" tag maps in its spec.
        tags: tags to predict, in output order; default: the spec's measurements.
        calibrated: tags with gain/offset; default: the spec's "calibrated" list.
        gain_bounds: (low, high) of the gains.
        offset_bound: largest |offset|, tag units.

    Raises:
        ConfigError: a tag the flowsheet does not map, or a calibrated tag not in `tags`.
    """

    def __init__(
        self,
        flowsheet: Flowsheet,
        tags: Sequence[str] | None = None,
        calibrated: Sequence[str] | None = None,
        gain_bounds: tuple[float, float] = (0.5, 1.5),
        offset_bound: float = 5.0,
    ) -> None:
        super().__init__()
        mapping = {
            **dict(flowsheet.tags.get("measurements", {})),
            **dict(flowsheet.tags.get("disturbances", {})),
        }  # type: ignore[call-overload]
        self.tags = list(tags if tags is not None else dict(flowsheet.tags.get("measurements", {})))  # type: ignore[call-overload]
        for tag in self.tags:
            if tag not in mapping:
                raise ConfigError("observation: " + unknown_key_message("tag", tag, mapping))
        calibrated = list(
            calibrated if calibrated is not None else flowsheet.tags.get("calibrated", [])
        )  # type: ignore[call-overload]
        for tag in calibrated:
            if tag not in self.tags:
                raise ConfigError(
                    f"observation.calibrated: {tag!r} is not one of the predicted tags {self.tags}"
                )
        self.flowsheet = flowsheet
        self.outputs = [mapping[tag] for tag in self.tags]
        self.tag_units = [flowsheet_output_unit(flowsheet, name) for name in self.outputs]
        index = [flowsheet.output_names.index(name) for name in self.outputs]
        self.register_buffer("index", torch.tensor(index, dtype=torch.long))
        self.n_tags, self.n_calibrated = len(self.tags), len(calibrated)
        self.register_buffer(
            "calibrated_index",
            torch.tensor([self.tags.index(t) for t in calibrated], dtype=torch.long),
        )
        specs = [
            spec
            for tag in calibrated
            for spec in (
                ParamSpec(f"{tag}.gain", "1", 1.0, gain_bounds, True, "calibration slope"),
                ParamSpec(
                    f"{tag}.offset",
                    "tag unit",
                    0.0,
                    (-offset_bound, offset_bound),
                    True,
                    "calibration bias",
                ),
            )
        ]
        self.calibration = ParameterSet(specs)

    def forward(self, x: Tensor) -> Tensor:
        """States (..., n_states) -> tag predictions (..., n_tags) in the tags' units."""
        flat = x.reshape(-1, x.shape[-1])
        y = self.flowsheet.outputs(flat, self.flowsheet.theta()).index_select(1, self.index)
        if self.n_calibrated > 0:
            values = self.calibration.values().reshape(-1, 2)
            gains = torch.ones(self.n_tags, dtype=y.dtype, device=y.device).index_copy(
                0, self.calibrated_index, values[:, 0]
            )
            offsets = torch.zeros(self.n_tags, dtype=y.dtype, device=y.device).index_copy(
                0, self.calibrated_index, values[:, 1]
            )
            y = y * gains + offsets
        shape = list(x.shape[:-1])
        shape.append(self.n_tags)
        return y.reshape(shape)


def flowsheet_output_unit(flowsheet: Flowsheet, name: str) -> str:
    """Engineering unit of a flowsheet output "<unit>.<output>"."""
    unit_name, output = name.split(".", 1)
    unit = flowsheet.units[flowsheet.unit_names.index(unit_name)]
    return next(spec.unit for spec in unit.output_specs if spec.name == output)
