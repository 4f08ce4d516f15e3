"""`twin train resume_from=<last.ckpt>`: training goes on in the same MLflow run.

One module-scoped pair of `twin train` runs (2 epochs, then resumed to 4) against a SQLite store
in a fresh folder serves the run-content tests; the error cases fail before anything trains.
"""

from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from mlflow.tracking import MlflowClient

from hybrid_twin import ConfigError
from tests.training.twin_cli import TINY_SIZES, run_twin
from training.train import RUN_ID_KEY, SEED_KEY, read_checkpoint

# mlflow.pyfunc warns about its own type hints when it is first imported (mlflow 3.17).
pytestmark = pytest.mark.filterwarnings("ignore:.*Any type hint is inferred as AnyType:UserWarning")
TINY = [*TINY_SIZES, "trainer.enable_progress_bar=false"]


def _runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("cdc-line-twin")
    return client.search_runs([experiment.experiment_id])


class Resumed(NamedTuple):
    client: MlflowClient
    run_id: str  # of the first `twin train`
    first_checkpoint: Path  # the run's `checkpoint` tag after the first `twin train`
    folder: Path
    uri: str
    dataset: Path


@pytest.fixture(scope="module")
def resumed(tiny_cdc_dataset, tmp_path_factory) -> Resumed:
    """`twin train trainer.max_epochs=2`, then `resume_from=<its last.ckpt>` up to 4 epochs."""
    folder = tmp_path_factory.mktemp("resume")
    uri = f"sqlite:///{folder / 'store.db'}"
    data = f"datamodule.path={tiny_cdc_dataset}"
    first = run_twin(
        folder,
        uri,
        "train",
        data,
        *TINY,
        "trainer.max_epochs=2",
        f"hydra.run.dir={folder / 'first'}",
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    (run,) = _runs(client)
    checkpoint = Path(run.data.tags["checkpoint"])
    second = run_twin(
        folder,
        uri,
        "train",
        data,
        *TINY,
        "trainer.max_epochs=4",
        f"resume_from={checkpoint}",
        f"hydra.run.dir={folder / 'second'}",
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return Resumed(client, run.info.run_id, checkpoint, folder, uri, tiny_cdc_dataset)


def test_resumed_training_continues_the_same_mlflow_run_with_the_epoch_steps(resumed):
    (run,) = _runs(resumed.client)
    assert run.info.run_id == resumed.run_id
    assert run.info.status == "FINISHED"
    for name in ("train/loss", "val/loss", "val/rmse/NIR.API_CONC"):
        history = resumed.client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [0, 1, 2, 3], name


def test_resumed_run_registers_a_second_version_from_the_same_run(resumed):
    versions = resumed.client.search_model_versions("name='cdc-line-twin'")
    assert sorted((int(v.version), v.run_id) for v in versions) == [
        (1, resumed.run_id),
        (2, resumed.run_id),
    ]


def test_checkpoints_hold_the_run_id_and_the_run_records_the_resume(resumed):
    first = torch.load(resumed.first_checkpoint, map_location="cpu", weights_only=True)
    assert resumed.first_checkpoint == resumed.folder / "first" / "checkpoints" / "last.ckpt"
    assert (first[RUN_ID_KEY], first["epoch"]) == (resumed.run_id, 1)
    run = resumed.client.get_run(resumed.run_id)
    newest = Path(run.data.tags["checkpoint"])
    assert newest == resumed.folder / "second" / "checkpoints" / "last.ckpt"
    second = torch.load(newest, map_location="cpu", weights_only=True)
    assert (second[RUN_ID_KEY], second["epoch"]) == (resumed.run_id, 3)
    # Params stay as the run started (MLflow cannot change one); tags say what the resume changed.
    assert run.data.params["trainer.max_epochs"] == "2"
    assert run.data.params["resume_from"] == "null"
    tags = run.data.tags
    assert tags["trainer.accelerator_used"] == "cpu"  # what ran (trainer=gpu may fall back)
    assert tags["resume.count"] == "1"
    assert tags["resume.1.checkpoint"] == str(resumed.first_checkpoint)
    assert tags["resume.1.epoch"] == "2"
    assert tags["resume.1.trainer.max_epochs"] == "4"
    assert tags["resume.1.outcome"] == "finished"
    assert "resume.1.resume_from" not in tags
    names = {a.path for a in resumed.client.list_artifacts(resumed.run_id, "resume/1")}
    assert names == {"resume/1/config.yaml"}


def test_resume_refuses_a_changed_training_setting_and_names_it(resumed):
    run = resumed.client.get_run(resumed.run_id)
    result = run_twin(
        resumed.folder,
        resumed.uri,
        "train",
        f"datamodule.path={resumed.dataset}",
        *TINY,
        "trainer.max_epochs=6",
        "lit.residual_penalty=0.5",
        f"resume_from={run.data.tags['checkpoint']}",
        f"hydra.run.dir={resumed.folder / 'refused'}",
    )
    assert result.returncode != 0
    assert "lit.residual_penalty: 0.001 -> 0.5" in result.stderr, result.stderr[-3000:]
    assert resumed.run_id in result.stderr
    after = resumed.client.get_run(resumed.run_id)
    assert after.data.tags == run.data.tags  # nothing recorded, nothing trained
    history = resumed.client.get_metric_history(resumed.run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2, 3]


def test_resume_from_a_run_that_is_not_in_the_tracking_store_names_the_run_id(resumed, tmp_path):
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    result = run_twin(
        tmp_path,
        uri,
        "train",
        f"datamodule.path={resumed.dataset}",
        *TINY,
        "trainer.max_epochs=4",
        f"resume_from={resumed.first_checkpoint}",
    )
    assert result.returncode != 0
    assert f"MLflow run {resumed.run_id!r}, which is not in the tracking store" in result.stderr, (
        result.stderr[-3000:]
    )
    assert str(resumed.first_checkpoint) in result.stderr
    assert not list(tmp_path.glob("outputs/train/*/checkpoints/*.ckpt"))  # nothing trained


def test_a_resume_that_fails_leaves_the_finished_run_finished_and_says_so(
    tiny_cdc_dataset, tmp_path
):
    # Marked FAILED, the run's registered versions vanished from `twin evaluate` (finished
    # runs only) and `twin export run_id=`, though nothing was wrong with them.
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    data = f"datamodule.path={tiny_cdc_dataset}"
    first = run_twin(tmp_path, uri, "train", data, *TINY, "model=mechanistic",
                     "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'first'}")  # fmt: skip
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    (run,) = _runs(client)
    result = run_twin(tmp_path, uri, "train", data, *TINY, "model=mechanistic",
                      "trainer.max_epochs=2", "trainer.limit_val_batches=0",  # no val/loss
                      f"resume_from={run.data.tags['checkpoint']}")  # fmt: skip
    assert result.returncode != 0
    assert "monitor 'val/loss' was not logged" in result.stderr, result.stderr[-3000:]
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED"
    assert after.data.tags["resume.1.outcome"].startswith("failed: KeyError: ")
    versions = client.search_model_versions("name='cdc-line-twin'")
    assert [(int(v.version), v.run_id) for v in versions] == [(1, run.info.run_id)]


@pytest.mark.slow
def test_resume_with_ddp_continues_the_run_and_only_rank_zero_records(tiny_cdc_dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    data = f"datamodule.path={tiny_cdc_dataset}"
    first = run_twin(tmp_path, uri, "train", data, *TINY, "trainer.max_epochs=1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    (run,) = _runs(client)
    result = run_twin(
        tmp_path,
        uri,
        "train",
        data,
        *TINY,
        "trainer=ddp",
        "trainer.max_epochs=2",
        f"resume_from={run.data.tags['checkpoint']}",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Starting with 2 processes" in output
    (after,) = _runs(client)
    assert after.info.run_id == run.info.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [0, 1]
    assert after.data.tags["resume.1.trainer.devices"] == "2"
    # the strategy's keys changed too: `auto` became a DDPStrategy (recorded since 2026-12-06)
    assert after.data.tags["resume.1.trainer.strategy"] == "(unset)"
    assert after.data.tags["resume.1.trainer.strategy._target_"].endswith("DDPStrategy")
    assert client.get_model_version("cdc-line-twin", "2").run_id == run.info.run_id
    newest = torch.load(after.data.tags["checkpoint"], map_location="cpu", weights_only=True)
    assert (newest[RUN_ID_KEY], newest["epoch"]) == (run.info.run_id, 1)


def test_read_checkpoint_names_a_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match="no checkpoint file .*nowhere/last.ckpt"):
        read_checkpoint(missing, 4)


def test_read_checkpoint_refuses_a_checkpoint_without_a_run_id(resumed, tmp_path):
    checkpoint = torch.load(resumed.first_checkpoint, map_location="cpu", weights_only=True)
    del checkpoint[RUN_ID_KEY]
    path = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ConfigError, match=f"checkpoint '{path}' holds no MLflow run id"):
        read_checkpoint(path, 4)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04 broken zip"])
def test_read_checkpoint_refuses_a_file_that_is_no_checkpoint(tmp_path, content):
    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="is not a Lightning checkpoint"):
        read_checkpoint(path, 4)


def test_read_checkpoint_refuses_a_checkpoint_cut_short(resumed, tmp_path):
    # a copy cut short (a full disk, a transfer stopped) ended in a bare OSError traceback
    content = resumed.first_checkpoint.read_bytes()
    for size in (len(content) // 2, len(content) - 30):
        path = tmp_path / f"cut_{size}.ckpt"
        path.write_bytes(content[:size])
        with pytest.raises(ConfigError, match="is not a Lightning checkpoint"):
            read_checkpoint(path, 4)


def test_read_checkpoint_wants_max_epochs_past_the_epochs_done(resumed):
    with pytest.raises(ConfigError, match="has trained 2 epochs; set trainer.max_epochs above 2"):
        read_checkpoint(resumed.first_checkpoint, 2)
    resume = read_checkpoint(resumed.first_checkpoint, 3)
    assert (resume.run_id, resume.epochs_done) == (resumed.run_id, 2)


def test_read_checkpoint_refuses_another_lr_schedule_before_the_run_is_reopened(resumed):
    # Refused in the fit, the reopened run was marked FAILED with resume tags that lied
    assert read_checkpoint(resumed.first_checkpoint, 6, "none").epochs_done == 2
    with pytest.raises(ConfigError, match=r"lit\.lr_schedule: the checkpoint trained with "
                                          r"schedule 'none'.*asks for 'cosine' over 6"):
        read_checkpoint(resumed.first_checkpoint, 6, "cosine")


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_version_of_a_resumed_run_loads_its_own_weights_not_the_runs_newest(resumed, monkeypatch):
    import mlflow
    import mlflow.pyfunc
    from omegaconf import OmegaConf

    from training.export import load_eager_twin, open_model_on_data, resolve_model
    from training.scenario import load_scenario_twin
    from training.tracking import load_twin

    monkeypatch.setenv("MLFLOW_TRACKING_URI", resumed.uri)
    mlflow.set_tracking_uri(resumed.uri)
    registered = {
        v: _state(mlflow.pyfunc.load_model(f"models:/cdc-line-twin/{v}").unwrap_python_model().twin)
        for v in ("1", "2")
    }
    assert not _same_weights(registered["1"], registered["2"])  # 2 more epochs trained
    model = {"registered_model_name": "cdc-line-twin", "run_id": None}
    first = OmegaConf.create({**model, "model_uri": "models:/cdc-line-twin/1"})
    assert tuple(resolve_model(first)) == (resumed.run_id, "1", "models:/cdc-line-twin/1")
    # Export, evaluate-faults and evaluate-diversion start here; scenario loads the scripted twin.
    data = {"num_threads": 1, "dtype": "float64", "data_path": str(resumed.dataset)}
    opened = open_model_on_data(OmegaConf.create({**first, **data}))
    assert (opened.version, opened.model_uri) == ("1", "models:/cdc-line-twin/1")
    eager = load_eager_twin(opened.run_id, opened.dataset, opened.model_uri)
    eager_state = {k: v for k, v in _state(eager).items() if k in registered["1"]}
    assert _same_weights(eager_state, registered["1"])
    scenario_cfg = OmegaConf.create({"twin": {**first, "file": None}})
    scenario_twin = load_scenario_twin(scenario_cfg, opened.dataset)
    assert _same_weights(_state(scenario_twin.model), registered["1"])
    assert "cdc-line-twin v1" in scenario_twin.source
    # The latest version is version 2's own model; a bare run id keeps the run's newest model.
    latest = resolve_model(OmegaConf.create({**model, "model_uri": None}))
    assert tuple(latest) == (resumed.run_id, "2", "models:/cdc-line-twin/2")
    by_run = resolve_model(OmegaConf.create({**model, "run_id": resumed.run_id, "model_uri": None}))
    assert (by_run.version, by_run.model_uri) == ("2", f"runs:/{resumed.run_id}/model")
    assert _same_weights(_state(load_twin(resumed.run_id)), registered["2"])


def test_evaluate_scores_the_registered_version_it_is_given(resumed, monkeypatch):
    # `runs.hybrid=models:/cdc-line-twin/1` was refused (Key not in struct), and a run id
    # always scored the run's newest model: version 1 of a resumed run could not be scored
    import mlflow
    import pandas as pd
    from omegaconf import OmegaConf

    from training.dataset import PreparedDataset
    from training.evaluate import _training_run, evaluate_runs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", resumed.uri)
    mlflow.set_tracking_uri(resumed.uri)
    dataset = PreparedDataset.open(resumed.dataset)
    cfg = OmegaConf.create({"runs": {"hybrid": "models:/cdc-line-twin/1"}, "data_path": "d",
                            "tracking": {"experiment_name": "cdc-line-twin"}})  # fmt: skip
    run, uri = _training_run(cfg, "hybrid", dataset.manifest_sha256)
    assert (run.info.run_id, uri) == (resumed.run_id, "models:/cdc-line-twin/1")
    score = {v: evaluate_runs({"hybrid": run}, dataset, "test", [1.0], 1.0,
                              model_uris={"hybrid": f"models:/cdc-line-twin/{v}"})
             for v in ("1", "2")}  # fmt: skip
    newest = evaluate_runs({"hybrid": run}, dataset, "test", [1.0], 1.0)
    pd.testing.assert_frame_equal(score["2"], newest)  # the run's newest model is version 2
    assert not score["1"]["rmse"].equals(score["2"]["rmse"])
    cfg.runs.hybrid = "models:/cdc-line-twin/7"
    with pytest.raises(ConfigError, match=r"runs.hybrid: models:/cdc-line-twin/7 is not in the "
                                          r"registry"):
        _training_run(cfg, "hybrid", dataset.manifest_sha256)


@pytest.mark.parametrize(("before", "raised", "after", "outcome"), [
    ("FINISHED", SystemExit(1), "FINISHED", "interrupted: SystemExit: 1"),  # Ctrl-C in the fit
    ("FINISHED", KeyboardInterrupt(), "FINISHED", "interrupted: KeyboardInterrupt: "),
    ("FAILED", RuntimeError("boom"), "FAILED", "failed: RuntimeError: boom"),
    ("KILLED", RuntimeError("boom"), "KILLED", "failed: RuntimeError: boom"),
])
def test_a_resume_ending_in_an_exception_restores_the_runs_status(
    tmp_path, monkeypatch, before, raised, after, outcome
):
    import mlflow
    from omegaconf import OmegaConf

    import training.train as train

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    client.set_terminated(run_id, before)
    monkeypatch.setattr(train, "_resume_tags", lambda *args: {"resume.count": "1"})
    cfg = OmegaConf.create({"trainer": {"enable_checkpointing": False}})
    resume = train.Resume(tmp_path / "last.ckpt", run_id, 2)
    datamodule = type("Data", (), {"manifest_sha256": "sha"})()
    with pytest.raises(type(raised)):
        with train._mlflow_run(cfg, {}, datamodule, tmp_path, resume):
            raise raised
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags["resume.1.outcome"]) == (after, outcome)


def test_a_null_seed_is_drawn_once_logged_and_kept_by_a_resume(tiny_cdc_dataset, tmp_path):
    # seed=null logged "null", the network's start was unseeded and the window seed was
    # only in cli.log: the run could not be repeated from MLflow, and a resume drew anew.
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    data = f"datamodule.path={tiny_cdc_dataset}"
    first = run_twin(tmp_path, uri, "train", data, *TINY, "seed=null", "trainer.max_epochs=1",
                     "lit.theta_only_epochs=0", f"hydra.run.dir={tmp_path / 'drawn'}")  # fmt: skip
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    (run,) = _runs(client)
    seed = int(run.data.params["seed"])
    assert 0 <= seed < 2**32 and run.data.tags["seed.drawn"] == "true"
    assert run.data.params["datamodule.seed"] == str(seed)
    checkpoint = torch.load(run.data.tags["checkpoint"], map_location="cpu", weights_only=True)
    assert checkpoint[SEED_KEY] == seed
    # the logged seed repeats the run
    again = run_twin(tmp_path, uri, "train", data, *TINY, f"seed={seed}", "trainer.max_epochs=1",
                     "lit.theta_only_epochs=0", f"hydra.run.dir={tmp_path / 'again'}")  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    repeated = next(r for r in _runs(client) if r.info.run_id != run.info.run_id)
    assert "seed.drawn" not in repeated.data.tags
    assert repeated.data.metrics["val/loss"] == run.data.metrics["val/loss"]
    # a resume with seed=null goes on with the run's seed: nothing changed, nothing refused
    resumed = run_twin(tmp_path, uri, "train", data, *TINY, "seed=null", "trainer.max_epochs=2",
                       "lit.theta_only_epochs=0",
                       f"resume_from={run.data.tags['checkpoint']}")  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["resume.1.outcome"] == "finished"
    assert not any(key.startswith("resume.1.seed") for key in tags)


def test_resume_refuses_a_key_the_config_no_longer_has(resumed):
    # `~lit.residual_penalty` fell back to its default: a change, silently accepted before
    run = resumed.client.get_run(resumed.run_id)
    result = run_twin(resumed.folder, resumed.uri, "train", f"datamodule.path={resumed.dataset}",
                      *TINY, "trainer.max_epochs=6", "~lit.residual_penalty",
                      f"resume_from={run.data.tags['checkpoint']}",
                      f"hydra.run.dir={resumed.folder / 'unset'}")  # fmt: skip
    assert result.returncode != 0
    assert "lit.residual_penalty: 0.001 -> (unset)" in result.stderr, result.stderr[-3000:]
    assert resumed.client.get_run(resumed.run_id).data.tags == run.data.tags
