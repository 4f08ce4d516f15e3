"""`twin export`: a registered twin -> verified files a plant system runs with torch alone.

Data flow: MLflow model version (or run) -> its `config.yaml` + scripted weights -> the eager
`TwinModel` -> `OnlineTwin` (EKF + placeholder monitor) run over the normal runs of the fit
split -> `fit_monitor` on their innovations -> per format in `formats`: `torch.jit.script`
(twin.pt), `torch.export` programs (twin.pt2) and their AOTInductor build (twin.aoti.pt2;
training/export_formats.py) -> each read back from its bytes and checked against the eager
module on held-out runs (refused beyond the tolerance), its update latency timed -> the files,
each with `metadata.json` -> logged to the training run (`twin_export/v<version>/`), the version
tagged. `load_twin_file` reads the TorchScript file back with a clear error for a damaged file.
"""

import datetime
import hashlib
import io
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import NamedTuple

import mlflow
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from hybrid_twin import ConfigError, TwinError, fit_monitor
from hybrid_twin.errors import config_number
from hybrid_twin.monitoring import CALIBRATIONS
from training.dataset import PreparedDataset, RunTensors
from training.export_formats import (
    FORMATS,
    PROGRAM_SHAPES,
    PT2_FORMATS,
    compile_programs,
    example_arguments,
    export_programs,
    format_paths,
    load_pt2_twin,
    measure_latency,
    package,
)
from training.online_twin import STATE_FIELDS, UPDATE_OUTPUTS, OnlineTwin, placeholder_monitor
from training.tracking import (
    check_training_run,
    download_run_file,
    has_finished_models,
    load_twin,
    run_model_uri,
    tracking_uri,
)
from training.twin_model import TwinModel, build_twin_model

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
ARTIFACT_DIR = "twin_export"
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class ExportMismatchError(TwinError, ValueError):
    """The scripted twin differs from the eager one beyond the tolerance (belongs in
    hybrid_twin/errors.py, which this issue may not edit)."""


class TwinFileError(TwinError, ValueError):
    """A twin file cannot be read: missing, truncated, corrupted or without metadata."""


class ResolvedModel(NamedTuple):
    """Which trained twin a stage runs (`resolve_model`)."""

    run_id: str  # the training run
    version: str | None  # its registered version, if any
    # The weights: the version's own model (a resumed run registers several versions from one
    # run), or the run's newest model when only a run id was asked for.
    model_uri: str


class ModelOnData(NamedTuple):
    """A trained twin's run and the prepared dataset it was trained on (`open_model_on_data`)."""

    run_id: str
    version: str | None  # its registered version, if any
    run: object  # mlflow.entities.Run
    dataset: PreparedDataset
    dtype: torch.dtype  # cfg.dtype
    past_steps: int  # rows the twin was trained to start from
    model_uri: str  # where its weights are (ResolvedModel.model_uri)


def check_trained_on(run, dataset: PreparedDataset, data_path: object, where: str = "") -> None:
    """Raise ConfigError unless `run` was trained on `dataset` (same manifest SHA-256): another
    dataset's normalisation would silently shift every tag."""
    trained_on = run.data.tags.get("data.manifest_sha256")
    if trained_on != dataset.manifest_sha256:
        raise ConfigError(
            f"{where}run {run.info.run_id} was trained on manifest {trained_on}, data_path "
            f"{data_path} has {dataset.manifest_sha256}: its normalisation would not match"
        )


def open_model_on_data(cfg: DictConfig) -> ModelOnData:
    """The common start of the stages that run one trained twin over a prepared dataset
    (export, evaluate-faults, evaluate-diversion): torch threads (`num_threads`), `dtype`,
    the MLflow store, the model (`resolve_model`) and `data_path`, checked against each other.

    Raises:
        ConfigError: an unknown dtype, no such model or run, or a run trained on other data.
    """
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))
    if str(cfg.dtype) not in DTYPES:
        raise ConfigError(f"dtype: expected one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    mlflow.set_tracking_uri(tracking_uri())
    run_id, version, model_uri = resolve_model(cfg)
    dataset = PreparedDataset.open(cfg.data_path)
    run = mlflow.get_run(run_id)
    check_trained_on(run, dataset, cfg.data_path)
    past_steps = int(run.data.params["datamodule.past_steps"])
    dtype = DTYPES[str(cfg.dtype)]
    return ModelOnData(run_id, version, run, dataset, dtype, past_steps, model_uri)


def run_export(cfg: DictConfig) -> dict:
    """`twin export`: write and log the twin file; returns its metadata.

    Raises:
        ConfigError: a bad setting, no such model/run, or a run trained on other data.
        ExportMismatchError: a format's twin and eager differ beyond `verify.tolerance`.
        TwinFormatError: torch.export or the AOTInductor build of a PT2 format failed.
    """
    started = time.perf_counter()
    formats = check_formats(cfg.formats)
    check_out_path(Path(str(cfg.out)), formats)
    run_id, version, run, dataset, dtype, past_steps, model_uri = open_model_on_data(cfg)
    twin = load_eager_twin(run_id, dataset, model_uri)
    online, fit_record = build_online_twin(twin, dataset, cfg, past_steps, dtype)
    held_out = verification_data(dataset, cfg.verify, past_steps, dtype)
    build_started = time.perf_counter()
    twins, built = {"torchscript": script_and_reload(online)}, {}
    build_seconds = {"torchscript": time.perf_counter() - build_started}
    if len(formats) > 1:
        build_started = time.perf_counter()
        programs = export_programs(online, example_arguments(online, held_out.u, held_out.y,
                                                             past_steps))  # fmt: skip
        build_seconds["export"] = time.perf_counter() - build_started
        built = {"export": programs} if "export" in formats else {}
        if "aoti" in formats:
            build_started = time.perf_counter()
            built["aoti"] = compile_programs(programs)
            build_seconds["aoti"] = time.perf_counter() - build_started
        # What is verified is what the file will hold, read back from its bytes.
        twins.update({fmt: load_pt2_twin(package(fmt, b, {}))[0] for fmt, b in built.items()})
    checks, timings = {}, {}  # kept apart: both have a forecast_steps, of their own
    for fmt, candidate in twins.items():
        checks[fmt] = verify_twin(online, candidate, held_out, cfg.verify, dtype, fmt)
        timings[fmt] = measure_latency(candidate, held_out.u, held_out.y, past_steps,
                                       int(cfg.latency_steps))  # fmt: skip
        timings[fmt]["build_seconds"] = build_seconds[fmt]
    metadata = twin_metadata(
        dataset, run, version, str(cfg.registered_model_name), cfg, past_steps, fit_record,
        checks["torchscript"], online,
    )  # fmt: skip
    out = Path(str(cfg.out))
    paths = {fmt: path for fmt, path in format_paths(out).items() if fmt in formats}
    metadata["files"] = {fmt: path.name for fmt, path in paths.items()}
    metadata["formats"] = {fmt: _format_record(checks[fmt], timings[fmt]) for fmt in checks}
    if built:
        metadata["program_shapes"] = PROGRAM_SHAPES
    # twin.pt last: whoever watches it (the service's reload poll) then finds its siblings new.
    for fmt, b in built.items():
        write_bytes_atomically(package(fmt, b, {**metadata, "format": fmt}), paths[fmt])
    write_twin_file(twins["torchscript"], {**metadata, "format": "torchscript"}, out)
    metadata["export_seconds"] = time.perf_counter() - started
    _log(run_id, version, str(cfg.registered_model_name), paths, metadata)
    for fmt, path in paths.items():
        record = metadata["formats"][fmt]
        print(
            f"export: wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {fmt}); vs eager max "
            f"diff {record['max_diff']:.3g} <= {checks[fmt]['tolerance']:g}; update p50 "
            f"{record['update_p50_ms']:.3f} ms, p99 {record['update_p99_ms']:.3f} ms; built in "
            f"{record['build_seconds']:.1f} s"
        )
    print(f"export: from run {run_id} (version {version}) in {metadata['export_seconds']:.1f} s")
    return metadata


def check_formats(formats) -> list[str]:
    """The `formats` setting as a list in FORMATS order.

    Raises:
        ConfigError: an unknown format, or no torchscript (the reference file the registry
            tags and the service's default model_uri name).
    """
    wanted = [str(f) for f in ([formats] if isinstance(formats, str) else formats)]
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown or "torchscript" not in wanted:
        raise ConfigError(
            f"formats: {wanted}: expected torchscript plus any of {', '.join(PT2_FORMATS)}"
            + (f"; unknown: {unknown}" if unknown else "; torchscript is always written")
        )
    return [f for f in FORMATS if f in wanted]


def check_out_path(out: Path, formats: list[str]) -> None:
    """Refuse an `out` no file can be written to, before minutes of building: a folder gave
    IsADirectoryError at the end (and left a partial file), a file as its folder a
    FileExistsError naming only that file, a read-only folder a RuntimeError naming none.

    Raises:
        ConfigError: naming `out` and what is in the way.
    """
    for fmt, path in format_paths(out).items():
        if fmt in formats and path.is_dir():
            raise ConfigError(f"out: {path} is a folder; give the twin file's path, e.g. "
                              f"{path / 'twin.pt'}")  # fmt: skip
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"out: {out} cannot be written: {blocking} is a file, not a folder")
    # the folder that exists and would hold the file (or its new folders): a read-only one
    # failed only after the build, in torch's C++ with no path
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out: {out} cannot be written: {existing} is not writable")


def _format_record(check: dict, timing: dict) -> dict:
    """`formats.<format>` of the metadata: its verified max_diff and its timings."""
    keys = ("update_p50_ms", "update_p99_ms", "forecast_ms", "forecast_steps", "build_seconds")
    return {"max_diff": check["max_diff"], **{key: timing[key] for key in keys}}


def resolve_model(cfg: DictConfig, prefix: str = "") -> ResolvedModel:
    """The twin `run_id`, `model_uri` or the latest registered version names.

    A version's weights are loaded from the version itself: a resumed run registers a version
    per `twin train`, and `runs:/<run id>/model` holds only the newest of them.

    Args:
        cfg: the mapping with `run_id`, `model_uri`, `registered_model_name`.
        prefix: where that mapping sits in the command's config (`twin.`), for messages.

    Raises:
        ConfigError: a run_id that is not a finished `twin train` run of this store, a
            model_uri not of `registered_model_name` or not in the registry, or no
            registered version at all.
    """
    client = mlflow.MlflowClient()
    name = str(cfg.registered_model_name)
    versions = client.search_model_versions(f"name='{name}'")
    if cfg.run_id:
        run_id = str(cfg.run_id)
        check_training_run(client, run_id, f"{prefix}run_id")
        mine = [v for v in versions if v.run_id == run_id]
        newest = str(max(mine, key=lambda v: int(v.version)).version) if mine else None
        return ResolvedModel(run_id, newest, run_model_uri(run_id))
    if cfg.model_uri:
        registered = f"models:/{name}/"
        ref = str(cfg.model_uri)
        if not ref.startswith(registered) or not ref[len(registered) :].isdigit():
            raise ConfigError(f"{prefix}model_uri: expected {registered}<version number>, "
                              f"got {ref!r}")  # fmt: skip
        wanted = ref[len(registered) :]
        found = [v for v in versions if str(v.version) == wanted]
        if not found:
            known = sorted(int(v.version) for v in versions)
            raise ConfigError(f"{prefix}model_uri: {ref} not in the registry at "
                              f"{tracking_uri()}; versions: {known}")  # fmt: skip
        return ResolvedModel(found[0].run_id, wanted, f"{registered}{wanted}")
    if not versions:
        raise ConfigError(
            f"no registered version of {name!r} at {tracking_uri()}: run `twin train`, or "
            f"give {prefix}model_uri=models:/<name>/<version> or {prefix}run_id=<run id>"
        )
    latest, skipped = _latest_finished(client, versions)
    if skipped:
        log.warning("%s: skipped version(s) %s of %r: their training runs did not finish",
                    prefix + "model_uri=null", skipped, name)  # fmt: skip
    if latest is None:
        raise ConfigError(
            f"no version of {name!r} at {tracking_uri()} comes from a finished training run "
            f"(versions {skipped}): give {prefix}model_uri=models:/{name}/<version>"
        )
    return ResolvedModel(latest.run_id, str(latest.version), f"models:/{name}/{latest.version}")


def _latest_finished(client, versions: list) -> tuple[object | None, list[int]]:
    """(The newest version whose training run FINISHED (or is being resumed), the newer
    versions passed over): a run that fails after registering, or an older store's, must
    not become "the latest"."""
    from mlflow.exceptions import MlflowException

    skipped = []
    for version in sorted(versions, key=lambda v: -int(v.version)):
        try:
            finished = has_finished_models(client.get_run(version.run_id))
        except MlflowException:  # the run was deleted for good
            finished = False
        if finished:
            return version, skipped
        skipped.append(int(version.version))
    return None, skipped


def load_eager_twin(
    run_id: str, dataset: PreparedDataset, model_uri: str | None = None
) -> TwinModel:
    """The run's TwinModel as an eager module: rebuilt from its `config.yaml`, weights from
    its scripted twin (state_dict keys are the same).

    Args:
        model_uri: which of the run's models holds the weights (`resolve_model`); None = the
            newest model the run logged.
    """
    config = yaml.safe_load(download_run_file(run_id, "config.yaml"))
    twin = build_twin_model(
        config["flowsheet"],
        config["model"],
        config["solver"],
        dataset.input_tags,
        dataset.measurement_tags,
        dataset.normalisation(),
        dataset.dt_s,
        config["initial_state"],
    )
    scripted = load_twin(run_id, model_uri)
    # Buffers the code builds from the config (e.g. `readout_columns`, added after some runs
    # were logged) may be absent from older files: they keep their rebuilt value. A missing
    # parameter or an unknown key means the code and the run disagree.
    result = twin.load_state_dict(scripted.state_dict(), strict=False)
    parameters = dict(twin.named_parameters())
    missing = [k for k in result.missing_keys if k in parameters]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"run {run_id} ({model_uri}): its weights do not fit "
            f"the model its config.yaml builds now: "
            f"missing parameters {missing}, unexpected keys {result.unexpected_keys}"
        )
    return twin.eval()


def noise_settings(twin: TwinModel, dataset: PreparedDataset, filter_cfg) -> dict[str, Tensor]:
    """q, r, p0_std (docs/export.md): fractions of the field's state scales and the train std.

    Raises:
        ConfigError: q or r not a number > 0, p0 not >= 0 (squared, -1e-3 acted as 1e-3).
    """
    fractions = {}
    for key, low in (("q_std_fraction", "> 0"), ("r_std_fraction", "> 0"),
                     ("p0_std_fraction", ">= 0")):  # fmt: skip
        fractions[key] = config_number(filter_cfg[key], f"filter.{key}")
        if fractions[key] < 0 or (low == "> 0" and fractions[key] == 0):
            raise ConfigError(f"filter.{key}: expected a number {low}, got {filter_cfg[key]!r}")
    state_std = twin.field.state_normaliser.std.detach().to(torch.float64)
    y_std = dataset.normalisation(torch.float64)[3]
    return {
        "q": (fractions["q_std_fraction"] * state_std) ** 2,
        "r": (fractions["r_std_fraction"] * y_std) ** 2,
        "p0_std": fractions["p0_std_fraction"] * state_std,
    }


def engineering_runs(
    dataset: PreparedDataset, runs: list[RunTensors], dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Runs stacked in tag units, (R, T, n_u) u and (R, T, n_y) y (NaN = not sampled), and the
    (R, T) bool mask of real rows; shorter runs are padded (last u held, y NaN)."""
    u_mean, u_std, y_mean, y_std = dataset.normalisation(dtype)
    steps = max(r.u.shape[0] for r in runs)
    us, ys, real = [], [], []
    for r in runs:
        u = r.u.to(dtype) * u_std + u_mean
        y = torch.where(r.mask, r.y.to(dtype) * y_std + y_mean, float("nan"))
        pad = steps - u.shape[0]
        us.append(torch.cat([u, u[-1:].expand(pad, -1)]))
        ys.append(torch.cat([y, torch.full((pad, y.shape[1]), float("nan"), dtype=dtype)]))
        real.append(torch.arange(steps) < u.shape[0])
    return torch.stack(us), torch.stack(ys), torch.stack(real)


def run_filter(online, u: Tensor, y: Tensor, past_steps: int, steps: int | None = None) -> list:
    """initial_state on the first past_steps rows, then `update` row by row.

    Returns:
        One tuple of `update` outputs (UPDATE_OUTPUTS order) per step, first the initial state.
    """
    with torch.no_grad():
        state = tuple(online.initial_state(u[:, :past_steps], y[:, :past_steps]))
        last = u.shape[1] if steps is None else min(u.shape[1], past_steps + steps)
        outputs = [state]
        for k in range(past_steps, last):
            step = online.update(*state, u[:, k], y[:, k], torch.isfinite(y[:, k]))
            state = tuple(step[:5])
            outputs.append(tuple(step))
    return outputs


# Splits whose runs score a detector: fitting on them would grade the detector on its own data.
SCORING_SPLITS = ("test", "fault")


def monitor_fit_runs(dataset: PreparedDataset, fit_split, past_steps: int) -> list[RunTensors]:
    """The normal runs the detector is fitted on: every run of the split(s) `fit_split` (a name
    or a list of names) longer than past_steps + 1 rows.

    Raises:
        ConfigError: a scoring split (test, fault) among them, or no run left.
    """
    splits = [fit_split] if isinstance(fit_split, str) else [str(s) for s in fit_split]
    scoring = [s for s in splits if s in SCORING_SPLITS]
    if scoring or not splits:
        raise ConfigError(f"monitor.fit_split: {splits}: fit the detector on normal runs of "
                          f"train and/or val; {', '.join(SCORING_SPLITS)} score it")
    kind = {run_id: info.get("kind", "normal") for run_id, info in dataset.manifest["runs"].items()}
    runs = [r for split in splits for r in dataset.load_split(split)
            if kind[r.run_id] == "normal" and r.u.shape[0] > past_steps + 1]
    if not runs:
        raise ConfigError(f"monitor.fit_split: no normal run of {splits} is longer than "
                          f"{past_steps + 1} rows (past_steps + 1)")
    return runs


def monitor_calibration_runs(
    dataset: PreparedDataset, monitor_cfg, fit_runs: list[RunTensors], past_steps: int
) -> list[RunTensors]:
    """The normal runs that set the detector's limits under `monitor.calibration: split` (none
    under in_sample, the default): the runs of `monitor.calibration_split`, none a fit run.

    Raises:
        ConfigError: an unknown calibration; no, or a scoring, calibration split; a run in
            both the fit and the calibration runs; no run left.
    """
    calibration = str(monitor_cfg.get("calibration", "in_sample"))
    if calibration not in CALIBRATIONS:
        raise ConfigError(f"monitor.calibration: expected one of {', '.join(CALIBRATIONS)}, "
                          f"got {calibration!r}")
    split = monitor_cfg.get("calibration_split")
    if calibration == "in_sample":
        if split is not None:  # it would be silently ignored
            raise ConfigError(f"monitor.calibration_split: {split} is set but "
                              f"monitor.calibration is in_sample; set it to split or null")
        return []
    splits = [] if split is None else [split] if isinstance(split, str) else [str(s) for s in split]
    if not splits or set(splits) & set(SCORING_SPLITS):
        raise ConfigError(f"monitor.calibration_split: {splits}: calibrate on normal runs of "
                          f"train or val; {', '.join(SCORING_SPLITS)} score the detector")
    kind = {run_id: info.get("kind", "normal") for run_id, info in dataset.manifest["runs"].items()}
    runs = [r for s in splits for r in dataset.load_split(s)
            if kind[r.run_id] == "normal" and r.u.shape[0] > past_steps + 1]
    shared = sorted({r.run_id for r in runs} & {r.run_id for r in fit_runs})
    if shared:
        raise ConfigError(f"monitor.calibration_split {splits} shares runs {shared} with "
                          f"monitor.fit_split: split calibration needs runs the fit did not use")
    if not runs:
        raise ConfigError(f"monitor.calibration_split: no normal run of {splits} is longer "
                          f"than {past_steps + 1} rows (past_steps + 1)")
    return runs


def build_online_twin(
    twin: TwinModel, dataset: PreparedDataset, cfg: DictConfig, past_steps: int,
    dtype: torch.dtype,
) -> tuple[OnlineTwin, dict]:  # fmt: skip
    """The eager OnlineTwin with its monitor fitted on the fit split's normal runs."""
    noise = noise_settings(twin, dataset, cfg.filter)
    n_y = len(dataset.measurement_tags)
    # In the file's dtype before the filter copies q, r and p0 into its own (a float32 model
    # rounded them inside a float64 file), and frozen: a caller's loop without no_grad would
    # otherwise chain every update into one autograd graph (0.4 MB more a row).
    online = OnlineTwin(twin.to(dtype), noise["q"], noise["r"], noise["p0_std"],
                        placeholder_monitor(n_y))  # fmt: skip
    online = online.to(dtype).eval().requires_grad_(False)
    fit_split = cfg.monitor.fit_split
    fit_split = fit_split if isinstance(fit_split, str) else list(fit_split)
    runs = monitor_fit_runs(dataset, fit_split, past_steps)
    cal_runs = monitor_calibration_runs(dataset, cfg.monitor, runs, past_steps)
    u, y, real = engineering_runs(dataset, runs + cal_runs, dtype)
    # The filter is the same before and after fitting: script it once for speed.
    steps = run_filter(torch.jit.script(online), u, y, past_steps)[1:]
    innovation = torch.stack([s[6] for s in steps], dim=1)
    innovation_var = torch.stack([s[7] for s in steps], dim=1)
    mask = torch.isfinite(y[:, past_steps:]) & real[:, past_steps:, None]
    n = len(runs)  # fit runs first, then the calibration runs
    monitor = fit_monitor(
        innovation[:n], innovation_var[:n], mask[:n],
        false_alarm_rate=float(cfg.monitor.false_alarm_rate),
        ewma_lambda=float(cfg.monitor.ewma_lambda),
        persistence=int(cfg.monitor.persistence),
        tags=dataset.measurement_tags,
        calibration="split" if cal_runs else "in_sample",
        calibration_data=(innovation[n:], innovation_var[n:], mask[n:]) if cal_runs else None,
        dtype=dtype,
    )  # fmt: skip
    online.monitor = monitor.to(dtype)
    record = {
        "fit_split": fit_split,
        "fit_runs": [r.run_id for r in runs],
        "fit_steps": int(real[:n, past_steps:].sum()),
        "fit_level": monitor.fit_level,
        "fit_exceed_rate": monitor.fit_exceed_rate,
        "calibration_runs": [r.run_id for r in cal_runs],
        "calibration_scale": monitor.calibration_scale,
        "calibration_exceed_rate": monitor.calibration_exceed_rate,
        "ratio_std": monitor.std.tolist(),
        "q": noise["q"].tolist(),
        "r": noise["r"].tolist(),
        "p0_std": noise["p0_std"].tolist(),
    }
    return online, record


def script_and_reload(online: OnlineTwin) -> torch.jit.ScriptModule:
    """torch.jit.script, saved to bytes and loaded back: what verification checks is exactly
    what the file will hold."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(online), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def max_scaled_difference(a: Tensor, b: Tensor, scale: Tensor) -> float:
    """max |a - b| / scale; equal infinities and NaN on both sides count as equal, a
    non-finite value on one side only as an infinite difference (a NaN must not pass)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    a_nan, b_nan = torch.isnan(a), torch.isnan(b)
    same = (torch.isinf(a) & torch.isinf(b) & (a == b)) | (a_nan & b_nan)
    diff = torch.where(same, 0.0, (a - b).abs() / scale)
    diff = torch.where(a_nan ^ b_nan, torch.inf, diff)
    return float(diff.max()) if diff.numel() else 0.0


# Integers and flags among the `update` outputs: equal, or the file is wrong.
EXACT_OUTPUTS = ("run_length", "alarm", "status")


class HeldOut(NamedTuple):
    """The held-out runs a twin file is verified on (`verification_data`)."""

    split: str
    run_ids: list[str]
    u: Tensor  # (R, T, n_u) tag units
    y: Tensor  # (R, T, n_y) tag units, NaN = not sampled
    y_std: Tensor  # (n_y,) float64 train std: the scale of tag differences
    past_steps: int


def verification_data(
    dataset: PreparedDataset, verify_cfg, past_steps: int, dtype: torch.dtype
) -> HeldOut:
    """The first `max_runs` runs of `verify.split` longer than past_steps + 1 rows, as lines of
    one batch; at least MIN_VERIFY_LINES different lines (a run again, shifted, if needed).

    Raises:
        ConfigError: no such run.
    """
    split = str(verify_cfg.split)
    runs = [r for r in dataset.load_split(split) if r.u.shape[0] > past_steps + 1]
    runs = runs[: int(verify_cfg.max_runs)]
    if not runs:
        raise ConfigError(f"verify.split: no run of split {split!r} longer than {past_steps + 1}")
    u, y, _ = engineering_runs(dataset, runs, dtype)
    run_ids = [r.run_id for r in runs]
    # Several different lines in one batch, always: a program right on row 0 and wrong on the
    # others (an AOTInductor bug met in torch 2.13) must not pass. Fewer runs than that: the
    # first run again, started later.
    for offset in VERIFY_OFFSETS[: max(0, MIN_VERIFY_LINES - len(runs))]:
        pad = min(offset, u.shape[1] - past_steps - 2)
        u = torch.cat([u, torch.cat([u[:1, pad:], u[:1, -1:].expand(-1, pad, -1)], dim=1)])
        y = torch.cat([y, torch.cat([y[:1, pad:], torch.full_like(y[:1, :pad], float("nan"))],
                                    dim=1)])  # fmt: skip
        run_ids.append(f"{run_ids[0]}[{pad}:]")
    y_std = dataset.normalisation(torch.float64)[3]
    return HeldOut(split, run_ids, u, y, y_std, past_steps)


MIN_VERIFY_LINES = 3
VERIFY_OFFSETS = (7, 13)  # rows by which the extra lines of a short verify split start later


def verify_twin(
    eager: OnlineTwin, candidate, held_out: HeldOut, verify_cfg, dtype: torch.dtype,
    fmt: str = "torchscript",
) -> dict:  # fmt: skip
    """forecast and `update_steps` update steps, the file's twin (`fmt`) vs eager, on held-out
    runs.

    Every `update` output is compared. Differences are scaled per quantity: states by
    state_normaliser.std, tag values by the train std, variances by those squared (P: their
    products) plus |eager value|, the rest (T^2 and its limit, contributions, EWMA and its
    statistic, held inputs) by 1 + |eager value|; alarms, run lengths and solver statuses
    must be equal.

    Raises:
        ExportMismatchError: a scaled difference above `tolerance`, or an alarm, run length
            or status that differs.
    """
    split, u, y, y_std, past_steps = (held_out.split, held_out.u, held_out.y, held_out.y_std,
                                      held_out.past_steps)  # fmt: skip
    x_std = eager.twin.field.state_normaliser.std.detach().to(torch.float64)
    horizon = min(int(verify_cfg.forecast_steps), u.shape[1] - past_steps)
    args = (u[:, :past_steps], y[:, :past_steps], u[:, past_steps : past_steps + horizon])
    with torch.no_grad():
        forecasts = eager.forecast(*args), candidate.forecast(*args)
        diffs = {"forecast": max_scaled_difference(*forecasts, y_std)}
    steps = int(verify_cfg.update_steps)
    a = run_filter(eager, u, y, past_steps, steps)
    b = run_filter(candidate, u, y, past_steps, steps)
    # Every output the service returns is compared (the state fields from the initial state
    # on): states and tag values by their train scale; variances by theirs plus their own size
    # (the 5-min assay's residual_var reached 6,476 y_std^2 on the default model, where float64
    # rounding alone gave 1.1e-6 y_std^2); everything else by 1 + |eager value|.
    absolute = {"x": x_std, "prediction": y_std, "residual": y_std}
    variances = {"P": x_std[:, None] * x_std[None, :], "residual_var": y_std**2}
    mismatches = {}
    for i, name in enumerate(UPDATE_OUTPUTS):
        first = 0 if i < len(STATE_FIELDS) else 1  # a[0], b[0]: the initial state alone
        ref = torch.stack([s[i] for s in a[first:]])
        values = torch.stack([s[i] for s in b[first:]])
        if name in EXACT_OUTPUTS:
            mismatches[name] = int((ref != values).sum())
            continue
        scale = absolute.get(name)
        if scale is None:
            scale = variances.get(name, 1.0) + ref.abs().to(torch.float64)
        diffs[name] = max_scaled_difference(ref, values, scale)
    result = {
        "format": fmt,
        "split": split,
        "runs": held_out.run_ids,
        "update_steps": len(a) - 1,
        "forecast_steps": horizon,
        "tolerance": float(verify_cfg.tolerance),
        "max_diff": max(diffs.values()),
        "diffs": diffs,
        "alarm_mismatches": mismatches["alarm"],
        "mismatches": mismatches,
    }
    if not result["max_diff"] <= result["tolerance"] or any(mismatches.values()):
        worst = max(diffs, key=diffs.get)
        raise ExportMismatchError(
            f"export refused: the {fmt} twin differs from eager on {split} runs {result['runs']}: "
            f"max scaled difference {result['max_diff']:.3g} ({worst}), tolerance "
            f"{result['tolerance']:g}; values that must be equal, differing: {mismatches}; "
            f"per quantity: {diffs}"
            + ("" if fmt == "torchscript" else f"; leave {fmt} out of `formats` to go without it")
        )
    return result


def twin_metadata(
    dataset: PreparedDataset, run, version: str | None, name: str, cfg: DictConfig,
    past_steps: int, fit_record: dict, verification: dict, online: OnlineTwin,
) -> dict:  # fmt: skip
    """The JSON stored as `metadata.json` in the file (docs/export.md lists the fields)."""
    tags = dataset.manifest["tags"]
    monitor = online.monitor
    return {
        "format_version": FORMAT_VERSION,
        "model_kind": run.data.tags.get("model.kind"),
        "registered_model": name,
        "registered_version": version,
        "training_run_id": run.info.run_id,
        "data_manifest_sha256": dataset.manifest_sha256,
        "dt_s": dataset.dt_s,
        "past_steps": past_steps,
        "dtype": str(cfg.dtype),
        "input_tags": list(dataset.input_tags),
        "measurement_tags": list(dataset.measurement_tags),
        "units": {t: tags[t]["unit"] for t in [*dataset.input_tags, *dataset.measurement_tags]},
        "state_names": list(online.twin.field.flowsheet.state_names),
        "state_fields": list(UPDATE_OUTPUTS[:5]),
        "update_outputs": list(UPDATE_OUTPUTS),
        "filter": {k: OmegaConf.to_container(cfg.filter)[k] for k in cfg.filter},
        "detector": {
            **OmegaConf.to_container(cfg.monitor),
            **fit_record,
            "t2_limits": monitor.t2_limits.tolist(),
            "ewma_limit": float(monitor.ewma_limit),
        },
        "verification": verification,
        "torch_version": torch.__version__,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_bytes_atomically(data: bytes, out: Path) -> None:
    """A temporary file, then a rename: a reader never sees half a file. The temporary name
    is this writer's own: two exports to one `out` shared `<out>.partial`, and one of them
    failed when the other renamed it away."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def write_twin_file(scripted, metadata: dict, out: Path) -> None:
    """Save atomically (`write_bytes_atomically`) with metadata.json in _extra_files."""
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer, _extra_files={METADATA_FILE: json.dumps(metadata)})
    write_bytes_atomically(buffer.getvalue(), out)


def load_twin_file(path: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """The scripted OnlineTwin and its metadata from a twin file (CPU).

    Raises:
        TwinFileError: missing file, not a TorchScript archive (truncated, corrupted), or no
            readable metadata.json; the message names the path and the cause.
    """
    path = Path(path)
    if not path.is_file():
        raise TwinFileError(f"twin file {path}: no such file")
    extra = {METADATA_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TwinFileError(
            f"twin file {path} ({path.stat().st_size} bytes) is not a readable TorchScript "
            f"archive (truncated or corrupted? re-run `twin export`): {first}"
        ) from error
    try:
        metadata = json.loads(extra[METADATA_FILE])
    except json.JSONDecodeError as error:
        raise TwinFileError(
            f"twin file {path}: {METADATA_FILE} missing or not JSON: {error}"
        ) from error
    if metadata.get("format_version") != FORMAT_VERSION:
        found = metadata.get("format_version")
        raise TwinFileError(
            f"twin file {path}: format_version {found!r}, this code reads {FORMAT_VERSION}"
        )
    return module, metadata


def _log(
    run_id: str, version: str | None, name: str, paths: dict[str, Path], metadata: dict
) -> None:
    """Every format's file as an artifact of the training run (under `twin_export/v<version>/`,
    or `twin_export/` for a run exported without a version), and tags naming them on the run
    and the model version: `twin_export.file` / `.sha256` the TorchScript file,
    `twin_export.files` all of them (JSON {format: {file, sha256}})."""
    client = mlflow.MlflowClient()
    # One folder per version: a resumed run registers several versions, and a later version's
    # export under the same name would replace the files an earlier version's tags (and an
    # alias on it: a rollback) name.
    folder = ARTIFACT_DIR if version is None else f"{ARTIFACT_DIR}/v{version}"
    files = {}
    for fmt, path in paths.items():
        client.log_artifact(run_id, str(path), folder)
        files[fmt] = {"file": f"{folder}/{path.name}",
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}  # fmt: skip
    digest = files["torchscript"]["sha256"]
    tags = {
        "twin_export.file": files["torchscript"]["file"],
        "twin_export.sha256": digest,
        "twin_export.max_diff": f"{metadata['verification']['max_diff']:.3g}",
        "twin_export.files": json.dumps(files, sort_keys=True),
    }
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
        if version is not None:
            client.set_model_version_tag(name, version, key, value)
    metadata["sha256"] = digest
    metadata["file_sha256"] = {fmt: f["sha256"] for fmt, f in files.items()}
