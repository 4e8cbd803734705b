"""Training losses: cross-entropy and focal loss, both with per-class weights."""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError, did_you_mean

LOSSES = ("ce", "focal")


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): ``w_y · (1 − p_y)^gamma · (−log p_y)``.

    Reduced like ``nn.CrossEntropyLoss(weight)``: the sum divided by the sum of the weights of
    the targets in the batch, so gamma = 0 gives exactly the weighted cross-entropy. Larger
    gamma down-weights examples the model already gets right (p_y near 1).
    """

    def __init__(self, weight: torch.Tensor | None = None, gamma: float = 2.0):
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"finetune.focal_gamma: must be ≥ 0, got {gamma}")
        self.gamma = float(gamma)
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1).gather(1, target.view(-1, 1)).squeeze(1)
        loss = -((1.0 - log_p.exp()).clamp_min(0.0) ** self.gamma) * log_p
        if self.weight is None:
            return loss.mean()
        w = cast(torch.Tensor, self.weight)[target]
        return (w * loss).sum() / w.sum()


def make_loss(
    name: str, weights: np.ndarray | None, gamma: float = 2.0, device: torch.device | str = "cpu"
) -> nn.Module:
    """The training loss named by ``finetune.loss``.

    Args:
        name: "ce" (cross-entropy) or "focal".
        weights: per-class weights (from `class_weights`), or None.
        gamma: focal-loss focusing parameter (≥ 0; 0 is cross-entropy).
        device: where the weights live.

    Raises:
        ConfigError: unknown loss name or negative gamma.
    """
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=device)
    if name == "ce":
        return nn.CrossEntropyLoss(weight=w)
    if name == "focal":
        return FocalLoss(w, gamma).to(device)
    raise ConfigError(f"finetune.loss: unknown '{name}'{did_you_mean(name, LOSSES)}; use one of {list(LOSSES)}")
