"""Resolve `models:/<name>@<alias>` or `models:/<name>/<version>` to a verified twin file.

Data flow: MLflow model version (by alias or number) -> its training run and the tags
`twin export` set on the version (`twin_export.file`, `twin_export.sha256`) -> the artifact
downloaded from that run -> `load_twin_file` with the digest checked. MLflow is imported here,
on use, and only for these URIs: a service started on a plain file never loads it.
"""

import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

from serving.twin_file import LoadedTwin, TwinFileError, load_twin_file

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
FILE_TAG = "twin_export.file"
SHA256_TAG = "twin_export.sha256"


class RegistryRef(NamedTuple):
    name: str
    version: str
    run_id: str
    artifact: str  # the twin file's path in the run's artifacts
    sha256: str


def is_registry_uri(uri: str) -> bool:
    return uri.startswith("models:/")


def resolve(uri: str, tracking_uri: str | None) -> RegistryRef:
    """The model version a models:/ URI names now, and where its twin file is.

    Raises:
        TwinFileError: a malformed URI, an unknown model, alias or version, or a version
            without the `twin_export.*` tags (never exported with `twin export`).
    """
    match = MODEL_URI.match(uri)
    if match is None:
        raise TwinFileError(
            f"model_uri {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>"
        )
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    name = match["name"]
    try:
        if match["alias"]:
            mv = client.get_model_version_by_alias(name, match["alias"])
        else:
            mv = client.get_model_version(name, match["version"])
    except MlflowException as error:
        raise TwinFileError(f"model_uri {uri!r}: not found in the registry: {error}") from error
    tags = mv.tags or {}
    if FILE_TAG not in tags or SHA256_TAG not in tags:
        raise TwinFileError(
            f"model_uri {uri!r}: version {mv.version} has no {FILE_TAG}/{SHA256_TAG} tags: "
            "export it first (`twin export model_uri=models:/<name>/<version>`)"
        )
    return RegistryRef(name, str(mv.version), mv.run_id, tags[FILE_TAG], tags[SHA256_TAG])


def load_from_registry(uri: str, tracking_uri: str | None, cache_dir: Path | None = None
                       ) -> LoadedTwin:  # fmt: skip
    """Resolve, download and load the twin file a models:/ URI names, its sha256 checked.

    Raises:
        TwinFileError: resolution or download failed, or the file is not the one exported.
    """
    ref = resolve(uri, tracking_uri)
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    target = Path(tempfile.mkdtemp(prefix=f"twin_v{ref.version}_", dir=cache_dir))
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=ref.run_id, artifact_path=ref.artifact, dst_path=str(target),
            tracking_uri=tracking_uri,
        )  # fmt: skip
        # The module is loaded from the file's bytes, so the download is not kept.
        return load_twin_file(local, source=uri, expected_sha256=ref.sha256, version=ref.version)
    except (MlflowException, OSError) as error:
        raise TwinFileError(
            f"model_uri {uri!r}: version {ref.version}: cannot download {ref.artifact} from run "
            f"{ref.run_id}: {error}"
        ) from error
    finally:
        shutil.rmtree(target, ignore_errors=True)
