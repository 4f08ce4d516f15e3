"""Resolve `models:/<name>@<alias>` or `models:/<name>/<version>` to a verified twin file.

Data flow: MLflow model version (by alias or number) -> its training run and the tags
`twin export` set on the version (`twin_export.file` + `twin_export.sha256`: the TorchScript
entry file; `twin_export.files`: every format written, `{format: {"file", "sha256"}}`) -> the
artifact of the format chosen (serving/twin_file.py: the setting, or `auto`: the fastest
measured that loads) downloaded from that run -> `load_twin_file` with the digest checked.
MLflow is imported here, on use, and only for these URIs: a service started on a plain file
never loads it.
"""

import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

from serving.twin_file import (
    LoadedTwin,
    TwinFileError,
    load_first,
    load_twin_file,
    peek_twin_file,
)
from serving.twin_formats import format_order

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
FILE_TAG = "twin_export.file"
SHA256_TAG = "twin_export.sha256"
FILES_TAG = "twin_export.files"


class RegistryRef(NamedTuple):
    name: str
    version: str
    run_id: str
    artifact: str  # the TorchScript entry file's path in the run's artifacts
    sha256: str
    files: dict[str, tuple[str, str]]  # format -> (artifact path, sha256)


def is_registry_uri(uri: str) -> bool:
    return uri.startswith("models:/")


def resolve(uri: str, tracking_uri: str | None) -> RegistryRef:
    """The model version a models:/ URI names now, and where its twin files are.

    Raises:
        TwinFileError: a malformed URI, an unknown model, alias or version, a version without
            the `twin_export.*` tags (never exported with `twin export`), a malformed
            `twin_export.files` tag.
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
    files = {"torchscript": (tags[FILE_TAG], tags[SHA256_TAG])}
    files.update(_files_tag(uri, str(mv.version), tags.get(FILES_TAG)))
    return RegistryRef(name, str(mv.version), mv.run_id, tags[FILE_TAG], tags[SHA256_TAG],
                       files)  # fmt: skip


def _files_tag(uri: str, version: str, text: str | None) -> dict[str, tuple[str, str]]:
    """`twin_export.files` ({format: {"file", "sha256"}}) as format -> (file, sha256)."""
    if text is None:
        return {}  # exported before the PT2 formats: the TorchScript file only
    try:
        entries = json.loads(text)
        return {str(fmt): (str(e["file"]), str(e["sha256"])) for fmt, e in entries.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise TwinFileError(
            f"model_uri {uri!r}: version {version}: tag {FILES_TAG} is not "
            f'{{format: {{"file": ..., "sha256": ...}}}}: {type(error).__name__}: {error}'
        ) from error


def load_from_registry(uri: str, tracking_uri: str | None, setting: str = "auto",
                       cache_dir: Path | None = None) -> LoadedTwin:  # fmt: skip
    """Resolve, download and load the twin a models:/ URI names, its sha256 checked.

    Args:
        uri: models:/<name>@<alias> or models:/<name>/<version>.
        tracking_uri: the MLflow tracking URI (None: MLflow's default).
        setting: "auto" (the fastest format measured at export that passes its digest check
            and loads here; the entry file's metadata.json ranks them) or one format.
        cache_dir: where downloads go while loading (default: the system's temp folder).

    Raises:
        TwinFileError: resolution or download failed, the format asked for was not exported
            for this version, a file is not the one exported, or (auto) none loads.
    """
    ref = resolve(uri, tracking_uri)
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    target = Path(tempfile.mkdtemp(prefix=f"twin_v{ref.version}_", dir=cache_dir))
    fetched: dict[str, Path] = {}
    what = f"model_uri {uri!r} (version {ref.version})"

    def fetch(artifact: str) -> Path:
        if artifact not in fetched:
            try:
                fetched[artifact] = Path(mlflow.artifacts.download_artifacts(
                    run_id=ref.run_id, artifact_path=artifact, dst_path=str(target),
                    tracking_uri=tracking_uri))  # fmt: skip
            except (MlflowException, OSError) as error:
                raise TwinFileError(f"{what}: cannot download {artifact} from run "
                                    f"{ref.run_id}: {error}") from error  # fmt: skip
        return fetched[artifact]

    def load_one(fmt: str) -> LoadedTwin:
        if fmt not in ref.files:
            raise TwinFileError(f"{what}: no {fmt} file was exported ({FILES_TAG}: "
                                f"{sorted(ref.files)})")  # fmt: skip
        artifact, sha256 = ref.files[fmt]
        path = fetch(artifact)
        try:
            twin = load_twin_file(path, source=uri, expected_sha256=sha256,
                                  version=ref.version, expected_format=fmt)  # fmt: skip
        except TwinFileError as error:  # named as stored: the download is deleted on return
            stored = f"runs:/{ref.run_id}/{artifact}"
            raise TwinFileError(str(error).replace(str(path), stored)) from error
        return dataclasses.replace(twin, file=artifact)

    try:
        if setting == "auto":
            peeked = peek_twin_file(fetch(ref.artifact))
            if peeked is None or peeked[2] != ref.sha256:  # load_twin_file names the cause
                return load_one("torchscript")
            order = format_order(peeked[1], "torchscript")
        else:
            order = [setting]
        # The files are loaded from their bytes, so the downloads are not kept.
        return load_first(order, load_one, what, ref.sha256)
    finally:
        shutil.rmtree(target, ignore_errors=True)
