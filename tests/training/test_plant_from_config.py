"""A plant of the user's own, by configuration alone: the Cascaded Tanks rig's real records.

The benchmark CSV becomes a historian export, `twin prepare` prepares it with the plant's tag
dictionary, and `twin train` trains a prior the user wrote (examples/plants/two_tank_prior.py,
named by `_target_` in a flowsheet config of a config folder of the user's) and registers it
as TorchScript; a prior of the wrong state size, or a flowsheet naming a tag the plant's
dictionary lacks, stops `twin train` before anything trains or is recorded.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from hybrid_twin import ConfigError
from tests.training.twin_cli import run_twin
from training.config_dir import SHIPPED_CONFIG_DIR
from training.tracking import load_twin

pytestmark = pytest.mark.filterwarnings("ignore:.*Any type hint is inferred as AnyType:UserWarning")
ROOT = Path(__file__).resolve().parents[2]
HEAD_CSV = ROOT / "tests" / "data" / "cascaded_tanks_head.csv"  # first 120 rows, real data
EXAMPLES = ROOT / "examples" / "plants"
TINY = [
    "experiment=cascaded_tanks",
    "datamodule.window_steps=16",
    "datamodule.past_steps=4",
    "datamodule.batch_size=4",
    "datamodule.windows_per_epoch=8",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "tracking.plot_split=null",
    "num_threads=1",
    "solver.torch_compile=cuda",  # the shipped `true` would compile for each tiny run on CPU
]
WRONG_STATE_SIZE = '''
import torch
from two_tank_prior import TwoTankPrior


class ThreeStateDerivative(TwoTankPrior):
    """Declares two states but returns three derivatives."""

    def derivative(self, x, u, inflow, theta):
        dx, out = super().derivative(x, u, inflow, theta)
        return torch.cat([dx, dx[:, :1]], dim=1), out
'''


def _yaml(group: str, name: str) -> dict:
    return yaml.safe_load((SHIPPED_CONFIG_DIR / group / f"{name}.yaml").read_text())


def _user_configs(folder: Path, unit: dict, inputs: dict | None = None) -> Path:
    """A config folder of the user's holding flowsheet/user_tanks.yaml."""
    configs = folder / "user_configs" / "flowsheet"
    configs.mkdir(parents=True, exist_ok=True)
    flowsheet = {
        "name": "user_tanks",
        "components": ["water"],
        "units": {"tanks": unit},
        "streams": [],
        "inputs": inputs or {"PUMP.VOLTAGE": "tanks.pump_v"},
        "measurements": {"TANK2.LEVEL": "tanks.level_v"},
    }
    (configs / "user_tanks.yaml").write_text(yaml.safe_dump(flowsheet))
    return configs.parent


def _train(folder: Path, dataset: Path, configs: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_twin(
        folder,
        f"sqlite:///{folder / 'store.db'}",
        "train",
        *TINY,
        f"datamodule.path={dataset}",
        f"hydra.searchpath=[file://{configs}]",
        "flowsheet=user_tanks",
        *extra,
        env={"PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(folder)])},
    )


def _build(dataset: Path, configs: Path, *extra: str) -> tuple:
    """What `twin train` builds before Trainer and MLflow start (training/build.py), in-process:
    an error here is an error before anything trains or is recorded."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from training.build import build_training

    overrides = [*TINY, f"datamodule.path={dataset}", f"hydra.searchpath=[file://{configs}]"]
    if not any(e.startswith("flowsheet=") for e in extra):  # default: the user's flowsheet
        overrides.append("flowsheet=user_tanks")
    overrides += extra
    with initialize_config_dir(str(SHIPPED_CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return build_training(cfg, OmegaConf.to_container(cfg, resolve=True))


def _runs(folder: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'store.db'}")
    experiment = client.get_experiment_by_name("cascaded-tanks")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def test_benchmark_csv_becomes_an_export_whose_validation_record_is_the_test_split(
    tiny_tanks_dataset,
):
    manifest = json.loads((tiny_tanks_dataset / "manifest.json").read_text())
    assert manifest["splits"]["train"] == ["estimation"]
    assert manifest["splits"]["test"] == ["validation"]
    assert manifest["splits"]["val"] == []
    assert manifest["dt_s"] == 4.0
    assert {run: meta["n_rows"] for run, meta in manifest["runs"].items()} == {
        "estimation": 120,
        "validation": 120,
    }
    assert manifest["counts"]["rows_rejected"] == 0
    head = np.loadtxt(HEAD_CSV, delimiter=",", skiprows=1, usecols=(2,))  # yEst
    assert manifest["normalisation"]["TANK2.LEVEL"]["mean"] == pytest.approx(head.mean())


def test_user_prior_named_by_target_trains_and_its_torchscript_twin_runs_without_it(
    tiny_tanks_dataset, tmp_path
):
    configs = _user_configs(tmp_path, {"_target_": "two_tank_prior.TwoTankPrior"})
    result = _train(tmp_path, tiny_tanks_dataset, configs, "model=hybrid")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = _runs(tmp_path)
    assert run.data.params["flowsheet.units.tanks._target_"] == "two_tank_prior.TwoTankPrior"
    assert np.isfinite(float(run.data.metrics["val/loss"]))
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        scripted = load_twin(run.info.run_id)  # as `twin evaluate` loads the registered twin
    finally:
        mlflow.set_tracking_uri(previous)
    twin_file = str(tmp_path / "twin.pt")
    torch.jit.save(scripted, twin_file)
    # A fresh process without the user's module on its path: the TorchScript file is enough.
    script = (
        "import sys, torch; twin = torch.jit.load(sys.argv[1]); "
        "u = torch.full((1, 20, 1), 3.0); "
        "y = twin.forecast(u[:, :4], torch.full((1, 4, 1), 5.0), u); "
        "print(float(y[0, -1, 0]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    loaded = subprocess.run(
        [sys.executable, "-c", script, twin_file],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert np.isfinite(float(loaded.stdout.strip().splitlines()[-1]))


def test_prior_returning_the_wrong_state_size_stops_twin_train_before_training(
    tiny_tanks_dataset, tmp_path
):
    (tmp_path / "bad_prior.py").write_text(WRONG_STATE_SIZE)
    configs = _user_configs(tmp_path, {"_target_": "bad_prior.ThreeStateDerivative"})
    result = _train(tmp_path, tiny_tanks_dataset, configs, "model=mechanistic")
    assert result.returncode != 0
    assert "twin train: error: flowsheet.units.tanks" in result.stderr  # no traceback
    assert "Traceback" not in result.stderr and "(bad_prior.ThreeStateDerivative)" in result.stderr
    assert "derivative dx/dt has shape (1, 3), expected (1, 2)" in result.stderr
    assert _runs(tmp_path) == []  # nothing trained, nothing recorded


@pytest.fixture
def user_path(monkeypatch, tmp_path):
    """The user's modules importable in this process, as PYTHONPATH makes them for `twin`."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_flowsheet_tag_missing_from_the_plant_dictionary_is_a_config_error(
    tiny_tanks_dataset, user_path
):
    configs = _user_configs(
        user_path,
        {"_target_": "two_tank_prior.TwoTankPrior"},
        inputs={"PUMP.SPEED": "tanks.pump_v"},  # the dictionary's tag is PUMP.VOLTAGE
    )
    with pytest.raises(
        ConfigError, match=r"'PUMP.VOLTAGE': the flowsheet maps no inputs.*PUMP.SPEED"
    ):
        _build(tiny_tanks_dataset, configs, "model=mechanistic")


def test_target_that_is_not_a_unit_class_names_the_config_key(tiny_tanks_dataset, user_path):
    configs = _user_configs(user_path, {"_target_": "two_tank_prior.PARAMS"})
    with pytest.raises(ConfigError, match=r"flowsheet.units.tanks._target_: .* is not a subclass"):
        _build(tiny_tanks_dataset, configs, "model=mechanistic")


def test_target_module_that_cannot_be_imported_says_so(tiny_tanks_dataset, user_path):
    configs = _user_configs(user_path, {"_target_": "no_such_module.Tanks"})
    with pytest.raises(ConfigError, match=r"_target_: cannot import module 'no_such_module'"):
        _build(tiny_tanks_dataset, configs, "model=mechanistic")


def test_linear_prior_builds_for_every_kind(tiny_tanks_dataset, user_path):
    configs = _user_configs(user_path, {"_target_": "two_tank_prior.TwoTankPrior"})
    for kind in ("mechanistic", "hybrid", "black_box"):
        _, model, _ = _build(
            tiny_tanks_dataset, configs, f"model={kind}", "flowsheet=cascaded_tanks_linear"
        )
        assert model.field.flowsheet.state_names == ["linear.x1", "linear.x2"]


def test_overflow_prior_builds_with_its_learnable_overflow_parameters(
    tiny_tanks_dataset, user_path
):
    configs = _user_configs(user_path, {"_target_": "two_tank_prior.TwoTankPrior"})
    for kind in ("mechanistic", "hybrid"):
        _, model, _ = _build(
            tiny_tanks_dataset, configs, f"model={kind}", "flowsheet=cascaded_tanks_overflow"
        )
        assert model.field.flowsheet.param_names[-3:] == [
            "tanks.upper_overflow_v",
            "tanks.lower_overflow_v",
            "tanks.k5_spill_to_lower",
        ]
        assert model.field.flowsheet.units[0].params.raw.requires_grad
