"""2D → 3D network conversion, module by module, with I3D weight inflation (Carreira & Zisserman 2017)."""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from timm.layers import BatchNormAct2d, Conv2dSame, SelectAdaptivePool2d, SEModule
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn
from torch.nn.modules.utils import _pair

from pipeline.adapt.layers3d import (
    AvgPool3dDepthSafe,
    BatchNormAct3d,
    GlobalPool,
    InflatedConv3d,
    MaxPool3dDepthSafe,
    SqueezeExcite3d,
)
from pipeline.errors import ConfigError, did_you_mean

INFLATIONS: tuple[str, ...] = ("i3d-mean", "i3d-center")
DEPTH_PADDINGS: tuple[str, ...] = ("replicate", "zeros")


class _How(NamedTuple):
    method: str
    depth_padding: str


def inflate_conv_weight(weight: torch.Tensor, method: str = "i3d-mean") -> torch.Tensor:
    """Inflate a 2D kernel (out, in, kh, kw) to 3D (out, in, kh, kh, kw); depth = kernel height.

    ``i3d-mean`` repeats the 2D kernel along depth and divides by the depth, so a volume that is
    constant along depth gives the 2D response on every slice whose window lies inside the
    volume. ``i3d-center`` puts the 2D kernel on the central depth slice and zeros elsewhere,
    so each output slice is the 2D response of its input slice. The input is not modified.

    Raises:
        ConfigError: unknown method or a kernel that is not 4-dimensional.
    """
    _check_method(method)
    if weight.ndim != 4:
        raise ConfigError(f"inflate: expected a 2D kernel (out, in, kh, kw), got shape {tuple(weight.shape)}")
    w = weight.detach()
    depth = w.shape[2]
    if method == "i3d-mean":
        return w.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth
    out = torch.zeros((w.shape[0], w.shape[1], depth, *w.shape[2:]), dtype=w.dtype, device=w.device)
    out[:, :, depth // 2] = w
    return out


def _check_method(method: str) -> None:
    if method not in INFLATIONS:
        raise ConfigError(
            f"model.inflation: unknown '{method}'{did_you_mean(method, INFLATIONS)}; use one of {', '.join(INFLATIONS)}"
        )


def _triple(v: object) -> tuple:
    h, w = _pair(v)
    return (h, h, w)


def _conv(conv: nn.Conv2d, how: _How) -> nn.Conv3d:
    same = type(conv) is Conv2dSame or conv.padding == "same"
    pad = (0, 0, 0) if same or conv.padding == "valid" else _triple(conv.padding)
    spatial_mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    new = InflatedConv3d(
        conv.in_channels,
        conv.out_channels,
        _triple(conv.kernel_size),
        stride=_triple(conv.stride),
        dilation=_triple(conv.dilation),
        groups=conv.groups,
        bias=conv.bias is not None,
        pad=pad,
        same=same,
        depth_padding=how.depth_padding,
        spatial_mode=spatial_mode,
    )
    new.weight = nn.Parameter(
        inflate_conv_weight(conv.weight, how.method).contiguous(), requires_grad=conv.weight.requires_grad
    )
    if conv.bias is not None:
        new.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
    return new


def _batchnorm(bn: nn.BatchNorm2d) -> nn.BatchNorm3d:
    args = (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new = BatchNormAct3d(*args, drop=bn.drop, act=bn.act) if type(bn) is BatchNormAct2d else nn.BatchNorm3d(*args)
    new.load_state_dict(bn.state_dict())
    for p_new, p_old in zip(new.parameters(recurse=False), bn.parameters(recurse=False), strict=True):
        p_new.requires_grad_(p_old.requires_grad)
    return new


def _pool(pool: nn.MaxPool2d | nn.AvgPool2d) -> nn.Module:
    if isinstance(pool, nn.MaxPool2d):
        return MaxPool3dDepthSafe(
            _triple(pool.kernel_size),
            _triple(pool.stride),
            _triple(pool.padding),
            _triple(pool.dilation),
            return_indices=pool.return_indices,
            ceil_mode=pool.ceil_mode,
        )
    kh = _pair(pool.kernel_size)[0]
    divisor = None if pool.divisor_override is None else pool.divisor_override * kh
    return AvgPool3dDepthSafe(
        _triple(pool.kernel_size),
        _triple(pool.stride),
        _triple(pool.padding),
        ceil_mode=pool.ceil_mode,
        count_include_pad=pool.count_include_pad,
        divisor_override=divisor,
    )


def _adaptive(pool: nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d) -> nn.Module:
    size = pool.output_size
    h, w = (size, size) if not isinstance(size, tuple | list) else size
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        return nn.AdaptiveAvgPool3d((h, h, w))
    return nn.AdaptiveMaxPool3d((h, h, w))


def _select_pool(pool: SelectAdaptivePool2d) -> GlobalPool:
    flatten = isinstance(pool.flatten, nn.Flatten) or getattr(pool.pool, "flatten", False) is True
    inner_size = getattr(pool.pool, "output_size", 1)
    if inner_size not in (1, (1, 1), [1, 1]):
        raise ConfigError(
            f"inflate: SelectAdaptivePool2d with output size {inner_size} is not supported; "
            "only global pooling (output size 1) inflates"
        )
    return GlobalPool(pool.pool_type, flatten=flatten)


def _squeeze_excite(se: nn.Module, how: _How) -> SqueezeExcite3d:
    names = ("conv_reduce", "act1", "conv_expand") if type(se) is SqueezeExcite else ("fc1", "bn", "act", "fc2")
    path = {n: _convert(se.get_submodule(n), how) for n in names}
    gate = _convert(se.get_submodule("gate"), how)
    return SqueezeExcite3d(path, gate, add_maxpool=bool(getattr(se, "add_maxpool", False)))


def _replacement(m: nn.Module, how: _How) -> nn.Module | None:
    """The 3D counterpart of one module, or None when it has none (recurse into its children).

    Types are matched exactly: a subclass may change `forward` (e.g. timm's MaxPool2dSame), so
    it is left alone and reported by `_leftover_2d` instead of being converted wrongly.
    """
    t = type(m)
    if isinstance(m, nn.Conv2d) and t in (nn.Conv2d, Conv2dSame):
        return _conv(m, how)
    if isinstance(m, nn.BatchNorm2d) and t in (nn.BatchNorm2d, BatchNormAct2d):
        return _batchnorm(m)
    if isinstance(m, nn.MaxPool2d | nn.AvgPool2d) and t in (nn.MaxPool2d, nn.AvgPool2d):
        return _pool(m)
    if isinstance(m, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d) and t in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d):
        return _adaptive(m)
    if isinstance(m, SelectAdaptivePool2d) and t is SelectAdaptivePool2d:
        return _select_pool(m)
    if t in (SqueezeExcite, SEModule):
        return _squeeze_excite(m, how)
    if isinstance(m, nn.Dropout2d) and t is nn.Dropout2d:
        return nn.Dropout3d(m.p, inplace=m.inplace)
    if isinstance(m, nn.InstanceNorm2d) and t is nn.InstanceNorm2d:
        new = nn.InstanceNorm3d(m.num_features, m.eps, float(m.momentum or 0.1), m.affine, m.track_running_stats)
        new.load_state_dict(m.state_dict())
        return new
    return None


def _convert(m: nn.Module, how: _How) -> nn.Module:
    """Convert `m` in place where it has children; return its replacement."""
    new = _replacement(m, how)
    if new is not None:
        new.train(m.training)
        return new
    for name, child in list(m.named_children()):
        setattr(m, name, _convert(child, how))
    return m


def _leftover_2d(module: nn.Module) -> list[str]:
    """Names of modules that still look two-dimensional after conversion."""
    bad_types = (
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool2d,
        nn.Dropout2d,
        nn.InstanceNorm2d,
    )
    return [
        f"{name or '<root>'} ({type(m).__name__})"
        for name, m in module.named_modules()
        if isinstance(m, bad_types) or "2d" in type(m).__name__.lower()
    ]


def _triple3(v: int | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, tuple | list) else (v, v, v)


def _keep_depth(net: nn.Module, levels: int) -> None:
    """Give the first `levels` downsampling levels a depth stride of 1, in place.

    A level is every strided conv or pool that sees the same in-plane input size (found by a
    forward pass of a small probe volume), so a residual block's shortcut keeps depth with its
    main path. Strided convs keep their inflated depth kernel (neighbouring slices still mix);
    strided pools become in-plane only. A depth-constant volume still gives the 2D features.
    """
    kinds = (InflatedConv3d, MaxPool3dDepthSafe, AvgPool3dDepthSafe)
    strided = [m for m in net.modules() if isinstance(m, kinds) and _triple3(m.stride)[0] > 1]  # type: ignore[arg-type]
    if not levels or not strided:
        return
    seen: dict[nn.Module, int] = {}

    def record(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.setdefault(mod, int(args[0].shape[-1]))

    hooks = [m.register_forward_pre_hook(record) for m in strided]
    first = next(m for m in net.modules() if isinstance(m, InflatedConv3d))
    modes = {m: m.training for m in net.modules()}  # restored one by one: frozen BatchNorm stays in eval
    try:
        net.eval()
        with torch.no_grad():
            net(first.weight.new_zeros(1, first.in_channels, 1, 64, 64))
    finally:
        for m, training in modes.items():
            m.training = training
        for h in hooks:
            h.remove()
    kept = set(sorted(set(seen.values()), reverse=True)[:levels])  # input sizes of the first levels
    for m in strided:
        if seen.get(m) not in kept:
            continue
        m.stride = (1, *_triple3(m.stride)[1:])  # type: ignore[arg-type]
        if not isinstance(m, InflatedConv3d):
            k, p = _triple3(m.kernel_size), _triple3(m.padding)  # type: ignore[arg-type]
            m.kernel_size, m.padding = (1, *k[1:]), (0, *p[1:])  # type: ignore[assignment]
            if isinstance(m, MaxPool3dDepthSafe):
                m.dilation = (1, *_triple3(m.dilation)[1:])  # type: ignore[assignment]


def inflate_to_3d(
    module: nn.Module, method: str = "i3d-mean", depth_padding: str = "replicate", keep_depth: int = 0
) -> nn.Module:
    """Convert a 2D network into its 3D counterpart, inflating its weights; the input is untouched.

    Converts Conv2d (grouped and depthwise included; timm's ``Conv2dSame`` and torch's "same"
    keep TF-'same' padding) to `InflatedConv3d`, BatchNorm2d (timm's ``BatchNormAct2d`` too),
    max/avg pooling, adaptive and timm ``SelectAdaptivePool2d`` global pooling, timm squeeze-excite
    blocks, Dropout2d and InstanceNorm2d; activations and other modules are kept. Kernels, strides, paddings and
    dilations gain a depth entry equal to their height entry. Pooling windows edge-pad the depth
    axis when a volume is thinner than the window, so thin volumes go through.

    Args:
        module: the 2D network; it is deep-copied first and never modified.
        method: ``"i3d-mean"`` or ``"i3d-center"`` (see `inflate_conv_weight`).
        depth_padding: ``"replicate"`` (default: a depth-constant volume gives the 2D network's
            features at any depth, so thin volumes keep ImageNet-like activations) or ``"zeros"``
            (the original I3D, exact on interior slices only; see `InflatedConv3d`).
        keep_depth: how many of the first downsampling levels halve height and width only (depth
            stride 1), for thick slices: with 2.5 mm slices of 0.35 mm pixels, 3 levels bring the
            in-plane step (2.8 mm) to the slice step before depth is halved. 0 (the default)
            halves depth wherever the 2D network halves height, as I3D does.

    Returns:
        The converted 3D module, in the same train/eval mode as `module`.

    Raises:
        ConfigError: unknown method or depth padding, or a module that has no 3D counterpart here (named).
    """
    _check_method(method)
    if depth_padding not in DEPTH_PADDINGS:
        hint = did_you_mean(depth_padding, DEPTH_PADDINGS)
        raise ConfigError(
            f"model.depth_padding: unknown '{depth_padding}'{hint}; use one of {', '.join(DEPTH_PADDINGS)}"
        )
    if not isinstance(keep_depth, int) or keep_depth < 0:
        raise ConfigError(f"model.keep_depth: expected a whole number >= 0, got {keep_depth!r}")
    converted = _convert(copy.deepcopy(module), _How(method, depth_padding))
    leftover = _leftover_2d(converted)
    if leftover:
        raise ConfigError(
            f"inflate: no 3D counterpart for {len(leftover)} module(s): {', '.join(leftover[:5])}; "
            "use dims 2d/2.5d or slicewise=True for this backbone"
        )
    _keep_depth(converted, keep_depth)
    return converted
