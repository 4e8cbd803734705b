"""Packaging the evaluated model: as data (model.json + weights.safetensors), logged to MLflow with a pyfunc flavour."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import tracking
from pipeline.adapt import CalibratedNet, write_package
from pipeline.io import jsonable

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")  # the pyfunc flavour's code file ("models from code")


def log_packaged(
    model: CalibratedNet, input_example: np.ndarray, metadata: dict[str, Any], register_as: str | None = None
) -> dict[str, Any]:
    """Package `model` as data (`adapt.package.write_package`), log it to the active MLflow run and register it.

    The pyfunc flavour is built from the same package (`PYFUNC_CODE`); the sha256 of its files is
    recorded in the tracking store (`tracking.log_model`), where `score.load_packaged` checks them.

    Args:
        model: the network and its fitted calibration. input_example: one prepared input (1, C, ...)
            float32, for the signature. metadata: JSON values (prepare, classes, operating point, ...).
        register_as: the registered model name, or None.

    Returns:
        {"model_uri", "registered_name", "version"}.
    """
    model = model.cpu().eval()
    with torch.no_grad():
        output = model(torch.as_tensor(input_example)).numpy()
    metadata = jsonable(metadata)
    with tempfile.TemporaryDirectory(prefix="medxfer-model-") as tmp:
        folder = Path(tmp) / tracking.PACKAGE
        sha256 = write_package(folder, model, metadata)
        return tracking.log_model(folder, PYFUNC_CODE, input_example, output, metadata, sha256, register_as)
