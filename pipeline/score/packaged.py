"""Packaged models: load a model logged by `tracking.log_model` into a `records.Packaged`."""

from __future__ import annotations

from typing import Any

import torch

from pipeline import tracking
from pipeline.errors import DataError
from pipeline.io import state_sha256
from pipeline.prepare import CT_WINDOWS, PRESET_MODALITIES, spec_from_dict
from pipeline.records import Packaged


def load_packaged(model_uri: str) -> Packaged:
    """Load a model logged by `tracking.log_model` and check its medxfer metadata.

    Args:
        model_uri: ``models:/NAME/VERSION|latest``, ``models:/NAME@alias``, ``runs:/ID/model`` or a path.

    Returns:
        The model (in eval mode) and what scoring reads from its metadata.

    Raises:
        TrackingError: the URI cannot be loaded. DataError: the model has no medxfer metadata.
    """
    model, meta = tracking.load_model(model_uri)
    missing = [k for k in ("prepare", "classes") if not meta.get(k)]
    if missing:
        raise DataError(
            f"model {model_uri} carries no medxfer metadata {missing} (found keys {sorted(meta)}); "
            "it was not packaged by `medxfer evaluate`. Fix: score a model logged with "
            "tracking.log_model(..., metadata={'prepare': ..., 'classes': ...})"
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
