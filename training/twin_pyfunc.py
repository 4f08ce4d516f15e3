"""The trained twin as an MLflow pyfunc model: how `cdc-line-twin` versions are logged and served.

train.py scripts the trained `TwinModel` (torch.jit.script), saves it as the artifact
`twin.pt` and logs `TwinPyfunc` around it with a tensor signature and an input example.
`mlflow.pyfunc.load_model("models:/cdc-line-twin/<version>")` then needs torch, numpy and
mlflow only: `TwinPyfunc` is stored by value, not as a reference to this project's module, and
the model's requirements name those three (and cloudpickle). Inputs and outputs are in the
tags' engineering units (`TwinModel.forecast`):

    {"past_u": (batch, P, n_u), "past_y": (batch, P, n_y) NaN = not sampled,
     "u": (batch, T, n_u)}  ->  (batch, T, n_y) predicted measurements

with the column orders of the dataset manifest (inputs then disturbances; measurements),
recorded in the model's metadata as `input_tags` and `measurement_tags`.
"""

import importlib.metadata
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cloudpickle
import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from training.tracking import MODEL_ARTIFACT

if TYPE_CHECKING:
    from training.twin_model import TwinModel

ARTIFACT_KEY = "twin"
INPUT_NAMES = ("past_u", "past_y", "u")
# What loading the logged model imports (MLflow's requirements file).
REQUIREMENTS = ("mlflow", "torch", "numpy", "cloudpickle")


class TwinPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a scripted TwinModel; predict() calls its `forecast`."""

    def load_context(self, context) -> None:
        self.twin = torch.jit.load(context.artifacts[ARTIFACT_KEY], map_location="cpu")
        self.twin.eval()

    # MLflow reads this hint: np.ndarray (one of its "no schema inference" types) keeps it
    # from inferring a schema or warning; the tensor signature given at logging validates.
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        """model_input: {"past_u", "past_y", "u"} float arrays -> (batch, T, n_y) float32.

        Args:
            context: MLflow's model context (unused once loaded).
            model_input: mapping of the three arrays (see the module docstring).
            params: unused.

        Returns:
            (batch, T, n_y) float32 predicted measurements in tag units.

        Raises:
            KeyError: an input array is missing (the message lists the expected names).
        """
        missing = [name for name in INPUT_NAMES if name not in model_input]
        if missing:
            raise KeyError(f"twin model: missing inputs {missing}; expected {INPUT_NAMES}")
        tensors = [
            torch.as_tensor(np.asarray(model_input[n], dtype=np.float32)) for n in INPUT_NAMES
        ]
        with torch.no_grad():
            return self.twin.forecast(*tensors).numpy()


def signature(n_u: int, n_y: int) -> ModelSignature:
    """Tensor signature: batch, P and T free (-1); columns fixed by the manifest."""
    float32 = np.dtype(np.float32)
    inputs = Schema(
        [
            TensorSpec(float32, (-1, -1, n_u), "past_u"),
            TensorSpec(float32, (-1, -1, n_y), "past_y"),
            TensorSpec(float32, (-1, -1, n_u), "u"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(float32, (-1, -1, n_y))]))


def log_twin(
    model: "TwinModel",
    example: Mapping[str, np.ndarray],
    tags: Mapping[str, Sequence[str]],
    registered_model_name: str,
    workdir: Path,
):
    """Script the model, log it to the active MLflow run and register a new version.

    Args:
        model: the trained model (float32, any device; it is scripted on CPU).
        example: an input example, {"past_u", "past_y", "u"} arrays in tag units.
        tags: {"input_tags": [...], "measurement_tags": [...]}, stored as model metadata.
        registered_model_name: e.g. "cdc-line-twin".
        workdir: where twin.pt is written before upload.

    Returns:
        mlflow's ModelInfo (registered_model_version holds the new version).
    """
    scripted = torch.jit.script(model.to("cpu").eval())
    path = Path(workdir) / "twin.pt"
    scripted.save(str(path))
    # By value: pickled by reference, loading would import this project (not on any index,
    # yet inferred as a requirement) for a class that needs torch, numpy and mlflow alone.
    this_module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(this_module)
    try:
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=TwinPyfunc(),
            artifacts={ARTIFACT_KEY: str(path)},
            signature=signature(len(tags["input_tags"]), len(tags["measurement_tags"])),
            input_example=dict(example),
            metadata={key: list(value) for key, value in tags.items()},
            registered_model_name=registered_model_name,
            pip_requirements=[f"{name}=={_release(name)}" for name in REQUIREMENTS],
        )
    finally:
        cloudpickle.unregister_pickle_by_value(this_module)


def _release(distribution: str) -> str:
    """The installed version without its local label (torch's `+cpu` / `+cu126` names a
    build, not a release an index serves)."""
    return importlib.metadata.version(distribution).split("+")[0]
