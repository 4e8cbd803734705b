"""Packaged models: load a model logged by `run.log_packaged` into a `records.Packaged`; verified, never unpickled."""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from pipeline import tracking
from pipeline.adapt.package import parse_record, read_package
from pipeline.errors import ConfigError, DataError
from pipeline.io import state_sha256
from pipeline.prepare import CT_WINDOWS, PRESET_MODALITIES, spec_from_dict
from pipeline.records import Packaged


def load_packaged(model_uri: str) -> Packaged:
    """Load a model logged by `run.packaging.log_packaged` and check its medxfer metadata.

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
        model, description = read_package(folder, parse_record(record, source), source, f"the package of {model_uri}")
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
        train_prevalence=_prevalence(meta.get("prevalence_train")),
    )


def _prevalence(value: Any) -> float | None:
    """The recorded training prevalence when it is a number in (0, 1), else None."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1
    return float(value) if ok else None


def prior_of(pkg: Packaged, prevalence: float) -> dict[str, Any]:
    """What `score --prevalence` needs of the model: the recorded training prevalence, binary models only.

    Returns:
        {"train_prevalence", "prevalence", "method", "decisions"} for ``<out>.metrics.json``.

    Raises:
        ConfigError: a model with more than two classes.
        DataError: a model packaged without its training prevalence.
    """
    if len(pkg.classes) != 2:
        raise ConfigError(
            f"--prevalence: prior-shift recalibration is for binary models; {pkg.uri} has "
            f"{len(pkg.classes)} classes {pkg.classes}. Fix: score without --prevalence"
        )
    if pkg.train_prevalence is None:
        raise DataError(
            f"--prevalence: model {pkg.uri} records no training prevalence (metadata prevalence_train; "
            "packaged by an older medxfer), so its prior cannot be shifted. Fix: evaluate its training run "
            "again (medxfer evaluate CONFIG --run RUN_ID) to repackage it, or score without --prevalence"
        )
    return {
        "train_prevalence": pkg.train_prevalence,
        "prevalence": prevalence,
        "positive_class": pkg.classes[1],
        "method": "prior shift (Saerens, Latinne & Decaestecker 2002): p' ∝ p·π'/π",
        "decisions": "the frozen threshold applied to the adjusted probability",
    }


def _version(uri: str, fingerprint: str) -> str:
    """Registry version when the URI names one (models:/NAME/3), else the weights fingerprint."""
    parts = uri.rstrip("/").split("/")
    if uri.startswith("models:/") and parts[-1].isdigit():
        return parts[-1]
    return f"sha256:{fingerprint[:12]}"
