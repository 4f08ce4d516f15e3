"""Settings a user mistypes, refused by name before anything runs: run ids that name no
finished training run, counts and rates that are not numbers, switches that are not true or
false, a scenario name given without its list, a recorded start on another time grid, a
checkpoint that is not one, filter fractions below zero."""

import dataclasses
import os
import re
import threading
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from hybrid_twin import ConfigError
from hybrid_twin.errors import config_bool
from tests.training.test_scenario import _scenario, dataset, line, root, twin  # noqa: F401
from training.config_dir import SHIPPED_CONFIG_DIR
from training.export import noise_settings, resolve_model
from training.scenario import _raw_scenarios
from training.scenario_run import start_rows
from training.train import check_run_settings, read_checkpoint


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty MLflow store as the process's tracking URI (restored after)."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # training.tracking reads it first
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    return client, experiment, uri


def test_a_run_id_that_names_no_finished_training_run_is_refused_by_name(store):
    # MLflow answered a 30-line traceback (not found) or a failed artifact download
    client, experiment, uri = store
    settings = {"registered_model_name": "cdc-line-twin", "model_uri": None}
    evaluation = client.create_run(experiment, run_name="evaluate-x").info.run_id
    client.set_terminated(evaluation)
    failed = client.create_run(experiment, run_name="hybrid-y").info.run_id
    client.log_param(failed, "datamodule.past_steps", "12")
    client.set_terminated(failed, "FAILED")
    for run_id, message in (
        ("deadbeef", rf"twin.run_id: no run 'deadbeef' in the MLflow store at {re.escape(uri)}"),
        (evaluation, rf"twin.run_id: run {evaluation} \(evaluate-x\) is not a `twin train` run"),
        (failed, rf"twin.run_id: training run {failed} \(hybrid-y\) is FAILED"),
    ):
        with pytest.raises(ConfigError, match=message):
            resolve_model(OmegaConf.create({**settings, "run_id": run_id}), prefix="twin.")
    # the advice names the keys of the command that was run
    with pytest.raises(ConfigError, match=r"give twin.model_uri=models:/<name>/<version> or "
                                          r"twin.run_id=<run id>"):
        resolve_model(OmegaConf.create({**settings, "run_id": None}), prefix="twin.")


def test_the_latest_version_is_the_newest_of_a_finished_run_and_evaluate_checks_its_runs(
    store, tmp_path, caplog
):
    # Version 2 of a run that failed after registering was "the latest": a bare `twin export`
    # shipped it, and `twin evaluate runs.hybrid=<failed run>` scored it and logged into it.
    from training.evaluate import _training_run

    client, experiment, _ = store
    runs = {}
    for name, status in (("hybrid-a", "FINISHED"), ("hybrid-b", "FAILED")):
        runs[status] = client.create_run(experiment, run_name=name).info.run_id
        client.log_param(runs[status], "datamodule.past_steps", "12")
        client.set_tag(runs[status], "model.kind", "hybrid")
        client.set_terminated(runs[status], status)
    client.create_registered_model("cdc-line-twin")
    for status in ("FINISHED", "FAILED"):
        client.create_model_version("cdc-line-twin", str(tmp_path / status), run_id=runs[status])
    settings = {"registered_model_name": "cdc-line-twin", "model_uri": None, "run_id": None}
    with caplog.at_level("WARNING"):
        latest = resolve_model(OmegaConf.create(settings))
    assert (latest.run_id, latest.version) == (runs["FINISHED"], "1")
    assert "skipped version(s) [2] of 'cdc-line-twin': their training runs did not finish" in (
        caplog.text
    )
    chosen = resolve_model(OmegaConf.create({**settings, "model_uri": "models:/cdc-line-twin/2"}))
    assert chosen.version == "2"  # named explicitly, it is the user's choice
    # a resume reopens the run (RUNNING): what it registered before still stands
    client.update_run(runs["FINISHED"], status="RUNNING")
    client.set_tag(runs["FINISHED"], "resume.count", "1")
    assert resolve_model(OmegaConf.create(settings)).version == "1"
    client.set_terminated(runs["FINISHED"], "KILLED")
    with pytest.raises(ConfigError, match=r"no version of 'cdc-line-twin' .* comes from a "
                                          r"finished training run \(versions \[2, 1\]\)"):
        resolve_model(OmegaConf.create(settings))
    evaluate = OmegaConf.create({"runs": {"hybrid": runs["FAILED"]}, "data_path": "d",
                                 "tracking": {"experiment_name": "e"}})  # fmt: skip
    with pytest.raises(ConfigError, match=rf"runs.hybrid: training run {runs['FAILED']} "
                                          r"\(hybrid-b\) is FAILED"):
        _training_run(evaluate, "hybrid", "sha")
    evaluate.runs.hybrid = "deadbeef"
    with pytest.raises(ConfigError, match=r"runs.hybrid: no run 'deadbeef' in the MLflow store"):
        _training_run(evaluate, "hybrid", "sha")


def _train_settings(**changes) -> OmegaConf:
    base = {"seed": 0, "num_threads": 1, "optimizer": {"lr": 1e-3, "weight_decay": 0.0},
            "trainer": {"max_epochs": 20, "check_val_every_n_epoch": 1}}  # fmt: skip
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist([f"{k}={v}" for k, v in
                                                            changes.items()]))  # fmt: skip
    return merged


@pytest.mark.parametrize(("key", "value", "message"), [
    ("trainer.max_epochs", "three", r"trainer.max_epochs: expected a number, got 'three'"),
    ("trainer.max_epochs", "0", r"trainer.max_epochs: expected a whole number >= 1, got 0"),
    ("trainer.max_epochs", "2.5", r"trainer.max_epochs: expected a whole number >= 1"),
    ("optimizer.lr", "abc", r"optimizer.lr: expected a number, got 'abc'"),
    ("optimizer.lr", "-0.1", r"optimizer.lr: expected a number >= 0, got -0.1"),
    ("num_threads", "1.5", r"num_threads: expected a whole number >= 1, got 1.5"),
    ("seed", "abc", r"seed: expected a number, got 'abc'"),
    # Lightning's own ValueError, naming no key, after the datamodule had drawn 2^62 seeds
    ("seed", str(2**32), r"seed: expected a whole number below 2\^32, got 4294967296"),
    # bf16-true registered a model whose predict fails; 64 one whose outputs are not float32
    ("trainer.precision", "bf16-true", r"trainer.precision: expected one of 32, 32-true, "),
    ("trainer.precision", "64", r"trainer.precision: .*got '64'"),
    # crashed after the whole fit, with nothing registered
    ("tracking.example_windows", "0", r"tracking.example_windows: expected a whole number >= 1"),
    ("tracking.example_windows", "null", r"tracking.example_windows: .*got null"),
    # a duplicate keyword for lightning.Trainer, after the dataset loaded
    ("trainer.default_root_dir", "/tmp/x", r"trainer.default_root_dir: set by `twin train`"),
])  # fmt: skip
def test_training_numbers_are_checked_before_anything_is_built(key, value, message):
    # Lightning and torch met these late: a bare AssertionError after the build, a TypeError
    # inside AdamW, a missing val/loss
    check_run_settings(_train_settings())
    check_run_settings(_train_settings(**{"trainer.precision": "bf16-mixed"}))
    with pytest.raises(ConfigError, match=message):
        check_run_settings(_train_settings(**{key: value}))


def test_a_file_that_is_not_a_checkpoint_is_named_as_such(tmp_path):
    # a CSV gave IndexError out of torch's unpickler
    not_a_checkpoint = tmp_path / "runs.csv"
    not_a_checkpoint.write_text("run_id,start,end\nrun_0,2025-03-01T00:00:00Z,\n")
    with pytest.raises(ConfigError, match=r"runs.csv"):
        read_checkpoint(not_a_checkpoint, 20)


def test_a_switch_is_true_or_false_only():
    # bool("no") is True: `plant_check.enabled=no` ran the check
    assert config_bool(False, "plant_check.enabled") is False
    for value in ("no", "off", "false", 0, None):
        with pytest.raises(ConfigError, match=r"plant_check.enabled: expected true or false"):
            config_bool(value, "plant_check.enabled")


def test_one_scenario_name_without_its_list_is_that_scenario():
    # run=api_feeder_dip was read letter by letter: "no scenario file .../a.yaml"
    shipped = sorted((SHIPPED_CONFIG_DIR / "scenarios").glob("*.yaml"))[0]
    (path,) = _raw_scenarios({"run": shipped.stem})
    assert str(path) == str(shipped)
    assert _raw_scenarios({"run": shipped.stem})[path] == yaml.safe_load(shipped.read_text())


def test_a_recorded_start_on_another_time_grid_is_refused(root, line, twin, dataset):  # noqa: F811
    # rows 2 s apart were fed to a 5 s twin: the printed table changed, exit 0
    run_id = dataset.run_ids("test")[0]
    raw = {"name": "recorded", "duration_min": 5,
           "start": {"from": "recorded", "run": run_id, "time_min": 5}}  # fmt: skip
    other_grid = dataclasses.replace(twin, dt_s=twin.dt_s * 2)
    scenario = _scenario(root, line, other_grid, raw)
    with pytest.raises(ConfigError, match=rf"on a {dataset.dt_s:g} s grid, the twin on "
                                          rf"{2 * dataset.dt_s:g} s"):
        start_rows(other_grid, scenario, line, dataset)


def test_filter_fractions_below_zero_are_refused(twin, dataset):  # noqa: F811
    # they are squared: q_std_fraction=-1e-3 acted as 1e-3
    fractions = {"q_std_fraction": 1e-3, "r_std_fraction": 1.0, "p0_std_fraction": 1.0}
    settings = noise_settings(twin.model, dataset, OmegaConf.create(fractions))
    assert torch.all(settings["q"] > 0)
    for key, value in (("q_std_fraction", -1e-3), ("r_std_fraction", 0.0),
                       ("p0_std_fraction", -1.0), ("q_std_fraction", "abc")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"filter.{key}: expected a number"):
            noise_settings(twin.model, dataset, OmegaConf.create({**fractions, key: value}))


def test_an_export_path_no_file_can_be_written_to_is_refused_before_the_build(tmp_path):
    # a folder gave IsADirectoryError after minutes of building and left <out>.partial
    from training.export import check_out_path

    formats = ["torchscript", "export", "aoti"]
    check_out_path(tmp_path / "models" / "twin.pt", formats)  # a folder to be made: fine
    (tmp_path / "twin.pt").mkdir()
    with pytest.raises(ConfigError, match=r"out: .*twin.pt is a folder; give the twin file's"):
        check_out_path(tmp_path / "twin.pt", formats)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot be written: .*a_file is a file, not a"):
        check_out_path(tmp_path / "a_file" / "twin.pt", formats)
    (tmp_path / "x.aoti.pt2").mkdir()  # in the way of one format only
    with pytest.raises(ConfigError, match=r"x.aoti.pt2 is a folder"):
        check_out_path(tmp_path / "x.pt", formats)
    check_out_path(tmp_path / "x.pt", ["torchscript"])


def test_an_export_into_a_read_only_folder_is_refused_before_the_build(tmp_path, monkeypatch):
    # a read-only mount failed after the build in torch's C++, naming no path; the tests run
    # as root, whom file modes do not stop, so the mount's answer is stood in for
    import training.export
    from training.export import check_out_path

    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(training.export.os, "access", lambda path, mode: (
        False if Path(path) == read_only and mode & os.W_OK else real_access(path, mode)))
    with pytest.raises(ConfigError, match=r"ro/twin.pt cannot be written: .*ro is not writable"):
        check_out_path(read_only / "twin.pt", ["torchscript"])
    with pytest.raises(ConfigError, match=r"cannot be written: .*ro is not writable"):
        check_out_path(read_only / "models" / "twin.pt", ["torchscript"])  # folder to be made
    check_out_path(tmp_path / "twin.pt", ["torchscript"])


def test_writers_of_one_file_do_not_share_a_temporary_file(tmp_path):
    # two exports to one `out` shared `<out>.partial`: one renamed it away from the other,
    # which failed with FileNotFoundError after its whole build
    from training.export import write_bytes_atomically

    out = tmp_path / "twin.pt"
    payloads = [bytes([n]) * 200_000 for n in (1, 2)]
    errors = []

    def write(data):
        try:
            for _ in range(40):
                write_bytes_atomically(data, out)
        except OSError as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(data,)) for data in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert out.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["twin.pt"]  # no temporary file left
