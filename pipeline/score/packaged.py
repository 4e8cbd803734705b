"""Packaged models: load a model logged by `tracking.log_model` into a `records.Packaged`, verified, never unpickled."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import tracking
from pipeline.adapt.package import CalibratedNet, parse_record, read_package, write_package
from pipeline.errors import DataError
from pipeline.io import jsonable, state_sha256
from pipeline.prepare import CT_WINDOWS, PRESET_MODALITIES, spec_from_dict
from pipeline.records import Packaged

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")  # the pyfunc flavour's code file ("models from code")


def log_packaged(
    model: CalibratedNet, input_example: np.ndarray, metadata: dict[str, Any], register_as: str | None = None
) -> dict[str, Any]:
    """Package `model` as data (`adapt.package.write_package`), log it to the active MLflow run and register it.

    The pyfunc flavour is built from the same package (`PYFUNC_CODE`); the sha256 of its files is
    recorded in the tracking store (`tracking.log_model`), where `load_packaged` checks them.

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


def load_packaged(model_uri: str) -> Packaged:
    """Load a model logged by `tracking.log_model` and check its medxfer metadata.

    The package's files are checked against the sha256 recorded in the tracking store
    (`tracking.download_model`) before anything is parsed; the network is rebuilt from its JSON
    description and the safetensors weights (`adapt.package.read_package`). Nothing is unpickled.

    Args:
        model_uri: ``models:/NAME/VERSION|latest``, ``models:/NAME@alias``, ``runs:/ID/model`` or a path.

    Returns:
        The model (in eval mode) and what scoring reads from its metadata.

    Raises:
        TrackingError: the URI cannot be loaded. DataError: the model is not a verified medxfer
            package (a file changed since it was written, no record, a pickled model) or has no
            medxfer metadata.
    """
    with tempfile.TemporaryDirectory(prefix="medxfer-model-") as tmp:
        folder, record, source = tracking.download_model(model_uri, tmp)
        model, description = read_package(folder, parse_record(record, source), source)
    meta = description.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    missing = [k for k in ("prepare", "classes") if not meta.get(k)]
    if missing:
        raise DataError(
            f"model {model_uri} carries no medxfer metadata {missing} (found keys {sorted(meta)}); "
            "it was not packaged by `medxfer evaluate`. Fix: score a model packaged with "
            "adapt.package.write_package(..., metadata={'prepare': ..., 'classes': ...})"
        )
    return packaged(model, meta, model_uri)


def packaged(model: torch.nn.Module, meta: dict[str, Any], uri: str) -> Packaged:
    """Read a loaded model's medxfer metadata (``prepare`` and ``classes`` required) into a `Packaged`.

    Args:
        model: the packaged network (put in eval mode). meta: its medxfer metadata. uri: where it came from.

    Returns:
        The `Packaged` record.
    """
    model = model.eval()
    spec = spec_from_dict(meta["prepare"])
    threshold = (meta.get("operating_point") or {}).get("threshold")
    fingerprint = state_sha256(model)
    preset = spec.preset
    default = {"CT"} if preset in CT_WINDOWS else PRESET_MODALITIES.get(preset, set())
    return Packaged(
        model=model,
        meta=meta,
        uri=uri,
        spec=spec,
        classes=[str(c) for c in meta["classes"]],
        threshold=None if threshold is None else float(threshold),
        reference=meta.get("reference_stats"),
        fingerprint=fingerprint,
        version=_version(uri, fingerprint),
        modalities={str(m) for m in meta.get("modalities") or default},
    )


def _version(uri: str, fingerprint: str) -> str:
    """Registry version when the URI names one (models:/NAME/3), else the weights fingerprint."""
    parts = uri.rstrip("/").split("/")
    if uri.startswith("models:/") and parts[-1].isdigit():
        return parts[-1]
    return f"sha256:{fingerprint[:12]}"
