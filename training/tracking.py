"""MLflow bookkeeping of a training run: where runs go, and what every run records.

The default tracking store is a SQLite database in the project folder, so a data scientist
can open `mlflow ui --backend-store-uri sqlite:///mlflow.db` without running a server;
MLFLOW_TRACKING_URI points a team at its own server instead. Every run records the resolved
config (flattened as params, and whole as `config.yaml`), the dataset manifest hash and the
git commit as tags, so a number in the UI can be traced to the data and code that made it.
"""

import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import mlflow
import yaml

from hybrid_twin import ConfigError

# MLflow refuses more than 100 params in one batch and values longer than 6000 characters.
PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000
DEFAULT_DB_NAME = "mlflow.db"
MODEL_ARTIFACT = "model"  # the name `twin train` logs its pyfunc model under (twin_pyfunc.py)


def tracking_uri(project_dir: Path | None = None) -> str:
    """The tracking URI: $MLFLOW_TRACKING_URI, else `sqlite:///<project_dir>/mlflow.db`.

    Args:
        project_dir: folder holding the default database; the current directory if None.
    """
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    folder = Path.cwd() if project_dir is None else Path(project_dir)
    return f"sqlite:///{(folder / DEFAULT_DB_NAME).resolve()}"


def run_model_uri(run_id: str) -> str:
    """`runs:/<run id>/model`: the newest model the run logged. A resumed run logs one per
    `twin train`, so a registered version's own weights are at `models:/<name>/<version>`."""
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"


def load_twin(run_id: str, model_uri: str | None = None):
    """The scripted TwinModel of a training run (its pyfunc model's artifact).

    Downloaded into a folder removed on return: MLflow's own default is a new temporary
    folder per call, never removed, holding the model's whole copy (runs:/ URIs even from a
    local store), one per export, evaluation and scenario.

    Args:
        run_id: the training run.
        model_uri: which of its models: a registered version's `models:/<name>/<version>`
            (resolve_model); None = the newest model the run logged.

    Returns:
        The torch.jit.ScriptModule.
    """
    # mlflow.pyfunc warns on import (its own type hints): load it only when needed.
    import mlflow.pyfunc

    uri = run_model_uri(run_id) if model_uri is None else model_uri
    with tempfile.TemporaryDirectory(prefix="twin_model_") as downloads:
        return mlflow.pyfunc.load_model(uri, dst_path=downloads).unwrap_python_model().twin


def download_run_file(run_id: str, artifact_path: str) -> str:
    """The text of one of a run's artifacts (e.g. its `config.yaml`), no download kept."""
    with tempfile.TemporaryDirectory(prefix="twin_artifact_") as downloads:
        return Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=downloads)).read_text()


def flatten_params(config: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} as MLflow params.

    Lists stay one value (`[0.0, 10.0]`) because a list is one setting to a reader of the UI.

    Raises:
        ValueError: a value longer than MLflow accepts, naming the key.
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = "null" if value is None else str(value)
        if len(text) > MAX_PARAM_CHARS:
            raise ValueError(
                f"config key {name!r}: value of {len(text)} characters is longer than "
                f"MLflow's limit of {MAX_PARAM_CHARS}; keep it in config.yaml only"
            )
        flat[name] = text
    return flat


def _batches(items: dict[str, str], size: int) -> Iterator[dict[str, str]]:
    keys = sorted(items)
    for start in range(0, len(keys), size):
        yield {key: items[key] for key in keys[start : start + size]}


def log_config(config: Mapping) -> None:
    """Log a resolved config to the active run: flattened params plus `config.yaml`."""
    for batch in _batches(flatten_params(config), PARAMS_PER_BATCH):
        mlflow.log_params(batch)
    mlflow.log_text(yaml.safe_dump(dict(config), sort_keys=False), "config.yaml")


def git_commit(repo_dir: Path | None = None) -> str:
    """The commit of the code that runs, with `-dirty` when the work tree has changes.

    Returns "unknown" outside a git work tree (an installed copy), never raising: a run must
    not fail for want of provenance, and "unknown" in the UI says what happened.
    """
    cwd = Path(__file__).resolve().parent if repo_dir is None else Path(repo_dir)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def provenance_tags(manifest_sha256: str, model_kind: str) -> dict[str, str]:
    """Tags that tie a run to its data and code."""
    return {
        "data.manifest_sha256": manifest_sha256,
        "git.commit": git_commit(),
        "model.kind": model_kind,
    }


def check_training_run(client, run_id: str, key: str):
    """The run `run_id` names, refused unless it is a finished `twin train` run: MLflow's own
    answers were a 30-line traceback ("Run with id=... not found") or a failed artifact
    download, and `twin evaluate` scored (and logged into) a FAILED run.

    Raises:
        ConfigError: no such run in this store, a run of another stage, or one that did
            not finish (it registered no model), naming `key`.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"{key}: no run {run_id!r} in the MLflow store at {tracking_uri()}"
                          ) from None  # fmt: skip
    if "datamodule.past_steps" not in run.data.params:
        raise ConfigError(f"{key}: run {run_id} ({run.info.run_name}) is not a `twin train` "
                          "run: give the id of a training run")  # fmt: skip
    if not has_finished_models(run):
        raise ConfigError(f"{key}: training run {run_id} ({run.info.run_name}) is "
                          f"{run.info.status}: only a finished run has its model")  # fmt: skip
    return run


def has_finished_models(run) -> bool:
    """Whether a training run's logged models come from finished trainings: it FINISHED, or
    it is being resumed (RUNNING with `resume.count`: what it registered before stands)."""
    status = run.info.status
    return status == "FINISHED" or (status == "RUNNING" and "resume.count" in run.data.tags)
