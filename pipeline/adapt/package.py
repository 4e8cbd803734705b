"""Models as data: weights (safetensors) plus a JSON description from which medxfer rebuilds the network.

A package is a folder of two files, and nothing in it is ever executed or unpickled:

* ``weights.safetensors``: the state dict (tensors only).
* ``model.json``: ``format``; ``files``, the sha256 of ``weights.safetensors``; ``architecture``,
  the `build_model` arguments (backbone, classes, channels, dims, inflation, pooling, ...);
  ``calibration``, the fitted calibrator's parameters (`pipeline.stats.apply_calibration`;
  null for a training checkpoint); ``metadata``, what the caller adds (prepare spec, classes,
  operating point, reference statistics, ...).

`write_package` returns the sha256 of both files. Callers record them outside the artifact store
(in the MLflow tracking store) and hand them back to `read_package`, which checks every file
against them before it parses or loads anything: a changed file, or a consistent swap of both,
is an error naming the file, and nothing of it is used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from pipeline.adapt.backbones import MedNet, build_model
from pipeline.errors import ConfigError, DataError
from pipeline.io import jsonable, write_bytes
from pipeline.stats import apply_calibration

FORMAT = "medxfer-model/1"
DESCRIPTION = "model.json"
WEIGHTS = "weights.safetensors"
ARCHITECTURE_KEYS = (
    "backbone",
    "num_classes",
    "in_channels",
    "dims",
    "inflation",
    "depth_padding",
    "slicewise",
    "pool",
    "keep_depth",
)


class CalibratedNet(nn.Module):
    """The packaged model: a network plus the calibration evaluation fitted; outputs calibrated probabilities.

    `forward(x)` takes prepared tensors (B, C, H, W) or (B, C, D, H, W) and returns probabilities
    (B, num_classes) float32: `pipeline.stats.apply_calibration(calibration, net(x))`, the same
    function evaluation used, so the registered model reproduces the evaluated probabilities.
    `net` is the uncalibrated network (a `MedNet`); `calibration` the fitted calibrator's
    `params()` (a plain dict; a number is read as a temperature).
    """

    def __init__(self, net: nn.Module, calibration: dict[str, Any] | float = 1.0):
        super().__init__()
        self.net = net
        if not isinstance(calibration, dict):
            calibration = {"method": "temperature", "temperature": float(calibration)}
        self.calibration = calibration

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x).float()
        probs = apply_calibration(self.calibration, logits.detach().cpu().numpy())
        return torch.as_tensor(probs, dtype=torch.float32, device=logits.device)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def write_package(folder: str | Path, model: nn.Module, metadata: dict[str, Any]) -> dict[str, str]:
    """Write `model` as a package (``model.json`` + ``weights.safetensors``) into `folder`, atomically per file.

    Args:
        folder: the package folder (created).
        model: a `MedNet` from `build_model` (a training checkpoint) or a `CalibratedNet` around one
            (the deployed model: its calibration is packaged too).
        metadata: JSON values stored under ``metadata`` (prepare spec, classes, operating point, ...).

    Returns:
        The sha256 (hex) of each file written: ``{"model.json": ..., "weights.safetensors": ...}``.

    Raises:
        ConfigError: the network was not built by `pipeline.adapt.build_model` (it cannot be rebuilt).
    """
    net, calibration = (model.net, model.calibration) if isinstance(model, CalibratedNet) else (model, None)
    if not isinstance(net, MedNet):
        raise ConfigError(
            f"cannot package a {type(net).__name__}: medxfer packages networks built by "
            "pipeline.adapt.build_model (it rebuilds them from their architecture, never unpickles them)"
        )
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    weights = save_safetensors(state, metadata={"format": FORMAT})
    description = {
        "format": FORMAT,
        "files": {WEIGHTS: sha256_bytes(weights)},
        "architecture": {k: net.architecture[k] for k in ARCHITECTURE_KEYS if k in net.architecture},
        "calibration": calibration,
        "metadata": jsonable(metadata),
    }
    text = json.dumps(description, indent=2, sort_keys=True, allow_nan=False).encode()
    write_bytes(folder / WEIGHTS, weights)
    write_bytes(folder / DESCRIPTION, text)
    return {DESCRIPTION: sha256_bytes(text), WEIGHTS: sha256_bytes(weights)}


def parse_record(record: str | None, source: str) -> dict[str, str] | None:
    """The sha256 record (a JSON object: file name → hex sha256) kept in the tracking store, or None.

    Raises:
        DataError: the record is not such an object (it was damaged).
    """
    if record is None:
        return None
    try:
        parsed = json.loads(record)
    except ValueError as exc:
        raise DataError(f"{source}: not a JSON sha256 record ({exc}); the tracking store's record is damaged") from exc
    if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
        raise DataError(f"{source}: expected a JSON object of file name → sha256, got {record[:200]!r}")
    return parsed


def _verified_bytes(path: Path, name: str, expected: str | None, source: str) -> bytes:
    """The bytes of `path` (`name` in messages), checked against the sha256 `expected` (from `source`)."""
    if not path.is_file():
        raise DataError(f"{name}: missing from the model package; it was removed or never written. Fix: {_FIX}")
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if expected is not None and actual != expected:
        raise DataError(
            f"{name}: sha256 {actual} differs from {expected} recorded in {source}; the artifact was changed "
            f"after medxfer wrote it, so nothing in it was loaded or run. Fix: {_FIX}"
        )
    return data


_FIX = "restore the artifact store from a trusted copy, or re-run the medxfer command that wrote it"


def read_package(
    folder: str | Path, expected: dict[str, str] | None = None, source: str = "the tracking store", label: str = ""
) -> tuple[nn.Module, dict[str, Any]]:
    """Verify and load a package written by `write_package`; rebuild the network with `build_model`.

    Every file is checked before it is parsed: ``model.json`` against ``expected`` (when given)
    and the weights against both ``expected`` and the description's own ``files``.

    Args:
        folder: the package folder.
        expected: the sha256 of each file as recorded when it was written (`write_package`'s
            return value, kept in the tracking store); None checks the weights against
            ``model.json`` alone (a local folder with no record).
        source: where `expected` came from, for the error message (e.g. "tag checkpoint_sha256 of run X").
        label: what the folder is, for messages (e.g. "the package of models:/NAME/1"; a downloaded
            copy's temporary path means nothing to the user); default: the folder's path.

    Returns:
        (model in eval mode, description): a `CalibratedNet` when a calibration was packaged, else
        the bare `MedNet`; the description is the parsed ``model.json``.

    Raises:
        DataError: a file is missing, differs from its record, or is not a valid package file.
    """
    folder = Path(folder)
    expected = dict(expected or {})
    unknown = sorted(set(expected) - {DESCRIPTION, WEIGHTS})
    if unknown:
        raise DataError(f"{source} records files {unknown} that a medxfer package does not have; the record is damaged")
    path, weights = folder / DESCRIPTION, folder / WEIGHTS
    named = {f: f"{f} in {label}" if label else str(folder / f) for f in (DESCRIPTION, WEIGHTS)}
    where = named[DESCRIPTION]
    description = _parse(where, _verified_bytes(path, where, expected.get(DESCRIPTION), source))
    files = description.get("files")
    if not isinstance(files, dict) or set(files) != {WEIGHTS}:
        raise DataError(f"{where}: 'files' must list {WEIGHTS} with its sha256, got {files!r}. Fix: {_FIX}")
    data = _verified_bytes(weights, named[WEIGHTS], expected.get(WEIGHTS), source)
    _verified_bytes(weights, named[WEIGHTS], str(files[WEIGHTS]), where)
    net = _rebuild(where, description.get("architecture"))
    try:
        state = load_safetensors(data)
        net.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, ValueError) as exc:
        raise DataError(
            f"{named[WEIGHTS]}: not the weights of the network {where} describes ({type(exc).__name__}: "
            f"{str(exc)[:300]}). Fix: {_FIX}"
        ) from exc
    calibration = description.get("calibration")
    model: nn.Module = net
    if calibration is not None:
        if not isinstance(calibration, dict):
            raise DataError(f"{where}: 'calibration' must be an object or null, got {calibration!r}. Fix: {_FIX}")
        try:
            apply_calibration(calibration, torch.zeros(1, net.num_classes).numpy())
        except DataError as exc:
            raise DataError(f"{where}: {exc}. Fix: {_FIX}") from exc
        model = CalibratedNet(net, calibration)
    return model.eval(), description


def _parse(path: str, data: bytes) -> dict[str, Any]:
    try:
        description = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a JSON model description ({exc}). Fix: {_FIX}") from exc
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        found = description.get("format") if isinstance(description, dict) else type(description).__name__
        raise DataError(f"{path}: expected a '{FORMAT}' model description, got {found!r}. Fix: {_FIX}")
    return description


def _rebuild(path: str, architecture: Any) -> MedNet:
    """The network `architecture` describes, with fresh weights (`build_model(weights="none")`)."""
    if not isinstance(architecture, dict) or "backbone" not in architecture:
        raise DataError(f"{path}: 'architecture' must be an object naming the backbone, got {architecture!r}")
    unknown = sorted(set(architecture) - set(ARCHITECTURE_KEYS))
    if unknown:
        raise DataError(
            f"{path}: unknown architecture keys {unknown} (expected {', '.join(ARCHITECTURE_KEYS)}); "
            "the description is damaged or from a newer medxfer"
        )
    try:
        net, _ = build_model(weights="none", **architecture)
    except (ConfigError, TypeError) as exc:
        raise DataError(f"{path}: cannot rebuild the network it describes: {exc}. Fix: {_FIX}") from exc
    return net
