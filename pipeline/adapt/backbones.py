"""MedNet: an ImageNet backbone's pooled-feature body, adapted to 1-channel 2D/2.5D/3D input, plus a new head."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import timm
import torch
import torchvision
from torch import nn

from pipeline.adapt.channels import adapt_first_conv
from pipeline.adapt.inflate import INFLATIONS, inflate_to_3d
from pipeline.adapt.layers3d import GlobalPool
from pipeline.adapt.registry import (
    DIMS,
    get_spec,
    load_into,
    load_state_dict_file,
    resolve_weights,
    sha256_file,
)
from pipeline.adapt.transfusion import WEIGHTS as TRANSFUSION
from pipeline.adapt.transfusion import transfuse
from pipeline.errors import ConfigError, DataError, did_you_mean
from pipeline.records import AdaptationSummary


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
    "timm-efficientnet": _Family(
        lambda a: timm.create_model(a, pretrained=False),
        _timm_body,
        "conv_stem",
        "classifier",
        {"conv_stem": "stem", "bn1": "stem", "blocks": "stage{}", "conv_head": "head_conv", "bn2": "head_conv"},
        "global_pool",
    ),
    "torchvision-resnet": _Family(
        lambda a: getattr(torchvision.models, a)(weights=None),
        _resnet_body,
        "conv1",
        "fc",
        {"conv1": "stem", "bn1": "stem", **{f"layer{i}": f"layer{i}" for i in range(1, 5)}},
        "avgpool",
    ),
    "torchvision-densenet": _Family(
        lambda a: getattr(torchvision.models, a)(weights=None),
        _densenet_body,
        "conv0",
        "classifier",
        {
            "conv0": "stem",
            "norm0": "stem",
            "norm5": "denseblock4",
            **{f"{p}{i}": f"denseblock{i}" for i in range(1, 5) for p in ("denseblock", "transition")},
        },
        "avgpool",
    ),
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

    def __init__(
        self, layers: OrderedDict[str, nn.Module], in_channels: int, slicewise: bool = False, pool: str = "avg"
    ):
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
            raise DataError(
                f"model input: expected {layout} with C={self.in_channels}, got shape "
                f"{tuple(x.shape)}; check prepare.dims/slices against model.in_channels"
            )
        if not self.slicewise:
            return super().forward(x)
        b, c, d, h, w = x.shape
        pooled = super().forward(x.transpose(1, 2).reshape(b * d, c, h, w))
        return _over_slices(pooled.reshape(b, d, -1), self.pool)


class MedNet(nn.Module):
    """An adapted backbone: ``forward(x) = head(features(x))`` → logits (B, num_classes).

    `architecture` holds the `build_model` arguments it was built with (JSON values, weights
    excepted): ``build_model(weights="none", **architecture)`` rebuilds the same network, into
    which its state dict loads (`pipeline.adapt.package` packages models that way).
    """

    def __init__(self, features: Features, num_features: int, num_classes: int, backbone: str):
        super().__init__()
        self.features = features
        self.head = nn.Linear(num_features, num_classes)
        self.num_features = num_features
        self.num_classes = num_classes
        self.backbone = backbone
        self.architecture: dict[str, Any] = {"backbone": backbone, "num_classes": num_classes}

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
            raise ConfigError(
                f"layer_groups: parameter '{pname}' is in {hits} groups of '{model.backbone}'; expected 1"
            )
    return list(groups.items())


def _check_options(
    num_classes: int, in_channels: int, dims: str, inflation: str, slicewise: bool, pool: str, keep_depth: int
) -> None:
    for field_name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{field_name}: must be a whole number >= 1, got {value!r}")
    if dims not in DIMS:
        raise ConfigError(f"prepare.dims: unknown '{dims}'{did_you_mean(dims, DIMS)}; use one of {', '.join(DIMS)}")
    if inflation not in INFLATIONS:
        raise ConfigError(
            f"model.inflation: unknown '{inflation}'{did_you_mean(inflation, INFLATIONS)}; "
            f"use one of {', '.join(INFLATIONS)}"
        )
    if slicewise and dims == "2d":
        raise ConfigError(
            "model.slicewise: applies to dims 2.5d or 3d (a stack of slices), not 2d; "
            "set slicewise: false or change prepare.dims"
        )
    if pool not in POOLS:
        raise ConfigError(f"model.pool: unknown '{pool}'{did_you_mean(pool, POOLS)}; use one of {', '.join(POOLS)}")
    if keep_depth and (dims != "3d" or slicewise):
        raise ConfigError(
            "model.keep_depth: applies to inflated 3D networks (prepare.dims 3d, slicewise false); set keep_depth: 0"
        )


def build_model(
    backbone: str = "tf_efficientnet_lite0",
    weights: str = "imagenet",
    *,
    num_classes: int = 2,
    in_channels: int = 1,
    dims: str = "2d",
    inflation: str = "i3d-mean",
    depth_padding: str = "replicate",
    weights_dir: str | Path | None = None,
    slicewise: bool = False,
    pool: str = "avg",
    keep_depth: int = 0,
) -> tuple[MedNet, AdaptationSummary]:
    """Build an ImageNet backbone adapted to a medical input, with a new classification head.

    Steps: resolve the local weights file (`resolve_weights`), load it strictly into the RGB
    ImageNet network (lukemelas EfficientNet files and old DenseNet keys are mapped first),
    fold the first convolution to `in_channels` (`adapt_first_conv`), inflate to 3D when
    `dims` is ``"3d"`` (`inflate_to_3d`), and attach ``nn.Linear(num_features, num_classes)``.

    Args:
        backbone: a name in `BACKBONES`.
        weights: ``"imagenet"``, ``"none"`` (from scratch), ``"transfusion"`` (random weights with
            each adapted ImageNet layer's mean and std, Raghu et al. 2019: `transfuse`) or a
            state-dict file path.
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
        load_into(net, load_state_dict_file(path), path, backbone)
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
    if str(weights) == TRANSFUSION:  # ImageNet statistics per layer, random values
        transfuse(features)
    model = MedNet(features, num_features, num_classes, backbone)
    model.architecture = {
        "backbone": backbone,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "dims": dims,
        "inflation": inflation,
        "depth_padding": depth_padding,
        "slicewise": slicewise,
        "pool": pool,
        "keep_depth": keep_depth,
    }
    summary = AdaptationSummary(
        backbone=backbone,
        weights=str(weights),
        weights_file=str(path) if path else None,
        weights_sha256=sha,
        dims=dims,
        in_channels=in_channels,
        channel_method=channel_method,
        inflation=inflation if inflated else None,
        depth_padding=depth_padding if inflated else None,
        keep_depth=keep_depth if inflated else None,
        pool=pool,
        num_classes=num_classes,
        missing_keys=missing,
        unexpected_keys=unexpected,
        total_params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        mean=spec.mean,
        std=spec.std,
        input_size=spec.input_size,
        interpolation=spec.interpolation,
    )
    return model, summary
