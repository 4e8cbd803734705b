"""Transfusion initialisation (Raghu et al. 2019): random weights with the ImageNet weights' per-layer mean and std."""

from __future__ import annotations

import torch
from torch import nn

WEIGHTS = "transfusion"  # the model.weights value that asks for it


@torch.no_grad()
def transfuse(module: nn.Module, generator: torch.Generator | None = None) -> int:
    """Replace every convolution and linear layer's weights by i.i.d. normal draws with their own mean and std.

    Raghu et al. 2019 ("Transfusion: understanding transfer learning for medical imaging", the
    "Mean Var" initialisation; the draws are standardised so the mean and std are met exactly, not
    only in expectation): what ImageNet transfers may be only the scale of its weights, not
    their features. Applied to an ImageNet-initialised network after its input was adapted (channel
    folding, 3D inflation), so each layer keeps the statistics that network's layer had. Biases
    with more than one value are redrawn the same way. BatchNorm layers are reset (weight 1, bias 0,
    running statistics 0 and 1): their ImageNet running statistics describe activations of the
    pretrained features, which no longer exist.

    Args:
        module: the network, changed in place.
        generator: the random source (default torch's global one, which `train` seeds).

    Returns:
        The number of layers redrawn.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
            for p in (m.weight, m.bias):
                if p is not None and p.numel() > 1:
                    mean, std = p.mean(), p.std()
                    z = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                    p.copy_((z - z.mean()) / z.std() * std + mean)  # standardised: the moments exactly
            n += 1
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_parameters()
    return n
