"""Datamodule, twin and Lightning module from a composed `twin train` config.

Kept apart from training/train.py so that what builds a training run imports no MLflow:
benchmarks and the GPU checks (benchmarks/bench_training.py, bench_gpu_training.py) build
exactly what `twin train` trains without a tracking store.
"""

import logging

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from hybrid_twin import ConfigError, Flowsheet
from hybrid_twin.flowsheet import input_targets
from hybrid_twin.hybrid import flowsheet_output_unit
from training.datamodule import CDCDataModule
from training.lit_module import TwinLitModule
from training.twin_model import TwinModel, build_twin_model

log = logging.getLogger(__name__)


def build_training(cfg: DictConfig, config: dict) -> tuple[CDCDataModule, TwinModel, TwinLitModule]:
    """Datamodule, model and Lightning module from the composed config.

    Args:
        cfg: the composed config (for `_target_` nodes); config: the same, resolved, plain.

    Raises:
        ConfigError: the dataset's tags and the flowsheet disagree, a bad model setting, or
            `initial_state: learned` with windows that do not start at a run's first row.
    """
    check_learned_start(config["initial_state"], config["datamodule"])
    datamodule = CDCDataModule(**config["datamodule"])
    generator = None if cfg.seed is None else torch.Generator().manual_seed(int(cfg.seed))
    model = build_twin_model(
        config["flowsheet"],
        config["model"],
        config["solver"],
        datamodule.input_tags,
        datamodule.measurement_tags,
        datamodule.normalisation,
        datamodule.dt_s,
        config["initial_state"],
        generator,
    )
    tags = datamodule.dataset.manifest["tags"]
    check_tag_units(model.field.flowsheet, {tag: str(tags[tag]["unit"]) for tag in tags})
    if model.reset_from_y.shape[0] == 0 and datamodule.measurement_tags:
        log.warning(
            "no measurement maps to a state of flowsheet %s (they map to outputs only): each "
            "window starts from the past inputs alone, and past values of %s are not used; "
            "map a measurement to a state it reads (docs/plants.md, 'How past measurements "
            "start a window')", cfg.flowsheet.get("name", "the flowsheet"),
            list(datamodule.measurement_tags),
        )  # fmt: skip
    schedule = config["lit"].get("theta_only_epochs", 0)
    epochs = config["trainer"].get("max_epochs")
    if config["model"].get("kind") == "hybrid" and isinstance(epochs, int) and schedule >= epochs:
        log.warning("lit.theta_only_epochs = %d >= trainer.max_epochs = %d: the hybrid's "
                    "network never trains", schedule, epochs)  # fmt: skip
    lit = TwinLitModule(
        model, instantiate(cfg.optimizer), datamodule.measurement_tags, **config["lit"]
    )
    return datamodule, model, lit


def check_tag_units(flowsheet: Flowsheet, units: dict[str, str]) -> None:
    """Each tag the flowsheet maps reads or sets its quantity in the quantity's own unit: the
    model converts nothing (a feeder recorded in g/min on a kg/h input runs 60x off).

    Args:
        units: the dataset's tag -> unit (its manifest); tags it lacks are not checked.

    Raises:
        ConfigError: a tag whose unit differs from its quantity's, naming both and the key.
    """
    spec_of = dict(zip(flowsheet.input_names, flowsheet.input_specs, strict=True))
    mapped = [("inputs", tag, target, spec_of[target].unit)
              for tag, target in input_targets(flowsheet.tags.get("inputs", {}))]  # fmt: skip
    for key in ("measurements", "disturbances"):
        mapped += [(key, tag, target, flowsheet_output_unit(flowsheet, target))
                   for tag, target in dict(flowsheet.tags.get(key, {})).items()]  # fmt: skip
    for key, tag, target, unit in mapped:
        if tag in units and units[tag] != unit:
            raise ConfigError(
                f"flowsheet.{key}.{tag}: the dataset records {tag} in {units[tag]!r}, but "
                f"{target} is in {unit!r}; the model converts nothing: map the tag to a "
                "quantity of its unit, or record it in the quantity's"
            )


def check_learned_start(initial_state: str, datamodule: dict) -> None:
    """A learned start is the state at a run's first row: every window must begin there.

    Raises:
        ConfigError: `initial_state: learned` without whole-run train and evaluation windows.
    """
    if initial_state != "learned":
        return
    missing = [k for k in ("train_full_runs", "eval_full_runs") if not datamodule.get(k)]
    if missing:
        raise ConfigError(
            "initial_state: learned starts every window from one learned state at a run's "
            f"first row, so windows must be whole runs; set datamodule.{missing[0]}=true"
        )
