"""First-convolution channel adaptation: fold a pretrained RGB kernel to k input channels."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from pipeline.errors import ConfigError


def fold_rgb_weight(weight: torch.Tensor, in_channels: int) -> tuple[torch.Tensor, str]:
    """Fold an RGB convolution kernel to `in_channels` input channels (timm's rule).

    1 channel: the sum of the R, G and B kernels, so a gray image replicated to RGB gives the
    same activations as the gray image alone. k channels: the RGB kernels repeated cyclically
    (R, G, B, R, ...) up to k, rescaled by 3/k so that the expected activation is unchanged.
    3 channels: an unchanged copy.

    Args:
        weight: kernel shaped (out, 3, *kernel); it is not modified.
        in_channels: wanted number of input channels (>= 1).

    Returns:
        (new weight shaped (out, in_channels, *kernel), method), where method is
        ``"none"``, ``"sum-fold RGB->1"`` or ``"repeat-rescale RGB->k"``.

    Raises:
        ConfigError: `in_channels` < 1 or the kernel does not have 3 input channels.
    """
    if int(in_channels) != in_channels or in_channels < 1:
        raise ConfigError(f"model.in_channels: must be a whole number >= 1, got {in_channels!r}")
    if weight.ndim < 3 or weight.shape[1] != 3:
        raise ConfigError(
            f"first convolution: expected an RGB kernel (out, 3, ...), got shape "
            f"{tuple(weight.shape)}; channel folding needs ImageNet RGB weights"
        )
    w = weight.detach()
    if in_channels == 3:
        return w.clone(), "none"
    if in_channels == 1:
        return w.sum(dim=1, keepdim=True), "sum-fold RGB->1"
    reps = math.ceil(in_channels / 3)
    repeat = [1, reps] + [1] * (w.ndim - 2)
    return w.repeat(*repeat)[:, :in_channels] * (3.0 / in_channels), f"repeat-rescale RGB->{in_channels}"


def adapt_first_conv(conv: nn.Conv2d, in_channels: int, *, pretrained: bool = True) -> tuple[nn.Conv2d, str]:
    """Return a copy of `conv` that takes `in_channels` inputs; `conv` itself is not modified.

    The copy keeps the layer's class (e.g. timm's ``Conv2dSame``), stride, padding and bias.

    Args:
        conv: the network's first convolution, with 3 input channels and groups == 1.
        in_channels: wanted number of input channels (>= 1).
        pretrained: True folds the pretrained RGB kernel (`fold_rgb_weight`); False (training
            from scratch) gives a freshly initialised kernel of the new shape.

    Returns:
        (new convolution, channel_method), the method as recorded in ``AdaptationSummary``.

    Raises:
        ConfigError: bad `in_channels`, or a grouped first convolution.
    """
    if int(in_channels) != in_channels or in_channels < 1:
        raise ConfigError(f"model.in_channels: must be a whole number >= 1, got {in_channels!r}")
    if conv.groups != 1:
        raise ConfigError(
            f"first convolution has groups={conv.groups}; channel adaptation supports "
            "only ordinary (groups=1) first convolutions"
        )
    new = copy.deepcopy(conv)
    if in_channels == conv.in_channels:
        return new, "none"
    if pretrained:
        weight, method = fold_rgb_weight(conv.weight, in_channels)
        new.in_channels = int(in_channels)
        new.weight = nn.Parameter(weight.contiguous(), requires_grad=conv.weight.requires_grad)
        return new, method
    new.in_channels = int(in_channels)
    shape = (conv.out_channels, int(in_channels), *conv.kernel_size)
    new.weight = nn.Parameter(torch.empty(shape, dtype=conv.weight.dtype, device=conv.weight.device))
    new.reset_parameters()
    return new, f"random-init {in_channels} channel{'s' if in_channels != 1 else ''} (no pretrained weights)"
