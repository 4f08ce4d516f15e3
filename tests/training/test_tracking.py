"""MLflow bookkeeping against a real SQLite tracking store."""

from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from training.tracking import (
    MAX_PARAM_CHARS,
    flatten_params,
    git_commit,
    log_config,
    provenance_tags,
    tracking_uri,
)


def test_default_tracking_uri_is_sqlite_in_the_project_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_tracking_uri_from_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_flatten_params_joins_keys_with_dots_and_keeps_lists_whole():
    flat = flatten_params({"model": {"kind": "hybrid", "hidden": [64, 64]}, "seed": None})
    assert flat == {"model.kind": "hybrid", "model.hidden": "[64, 64]", "seed": "null"}


def test_flatten_params_refuses_a_value_too_long_for_mlflow_and_names_the_key():
    with pytest.raises(ValueError, match="'plant.notes'"):
        flatten_params({"plant": {"notes": "x" * (MAX_PARAM_CHARS + 1)}})


def test_log_config_writes_more_than_one_batch_of_params_and_the_yaml(tmp_path):
    config = {"group": {f"key{i:03d}": i for i in range(250)}, "name": "cdc"}
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run() as run:
        log_config(config)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    params = client.get_run(run.info.run_id).data.params
    assert len(params) == 251
    assert params["group.key249"] == "249"
    path = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(path).read_text()) == config


def test_git_commit_outside_a_work_tree_says_unknown(tmp_path):
    assert git_commit(tmp_path) == "unknown"


def test_provenance_tags_carry_manifest_hash_commit_and_kind():
    tags = provenance_tags("ab" * 32, "hybrid")
    assert tags["data.manifest_sha256"] == "ab" * 32
    assert tags["model.kind"] == "hybrid"
    assert tags["git.commit"]
