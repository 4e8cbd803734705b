"""The MLflow pyfunc flavour of a medxfer model, logged as "models from code": nothing of it is pickled.

MLflow runs this file when it logs the model and when `mlflow.pyfunc.load_model` loads it; it is
not imported by medxfer itself (`medxfer score` reads the package directly: `score.packaged`).
`load_context` rebuilds the network from the model's ``package`` artifact (model.json +
weights.safetensors, checked against the sha256 in model.json); `predict` takes prepared float32
tensors (B, C, H, W) or (B, C, D, H, W) and returns calibrated probabilities (B, n_classes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.adapt.package import read_package
from pipeline.tracking import PACKAGE, PythonModel, set_pyfunc_model


class MedxferModel(PythonModel):
    """A medxfer package as an MLflow PythonModel."""

    def load_context(self, context: Any) -> None:
        self.model, self.description = read_package(context.artifacts[PACKAGE])

    # no type hints here: MLflow would validate the input by them (it expects list[...] of instances)
    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()


set_pyfunc_model(MedxferModel())
