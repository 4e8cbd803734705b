"""Class imbalance: class weights computed on the train split only, and a weighted sampler."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from pipeline.errors import ConfigError, did_you_mean

MODES = ("none", "balanced", "effective-number")


def class_weights(y_train: np.ndarray, n_classes: int, mode: Any = "balanced", beta: float = 0.999) -> np.ndarray:
    """Per-class loss weights, normalised to mean 1.

    Args:
        y_train: integer labels of the TRAIN split only.
        n_classes: number of classes.
        mode: "none" | "balanced" (n / (k * n_c)) | "effective-number" (Cui et al. 2019,
            (1 - beta) / (1 - beta**n_c)) | an explicit list of k weights.
        beta: for effective-number.
    """
    counts = np.bincount(np.asarray(y_train, dtype=int), minlength=n_classes).astype(float)
    if isinstance(mode, list | tuple):
        if len(mode) != n_classes:
            raise ConfigError(f"finetune.class_weights: {len(mode)} weights given for {n_classes} classes")
        w = np.asarray(mode, dtype=float)
    elif mode in (None, "none"):
        w = np.ones(n_classes)
    elif mode == "balanced":
        w = counts.sum() / (n_classes * np.maximum(counts, 1))
    elif mode == "effective-number":
        w = (1 - beta) / (1 - np.power(beta, np.maximum(counts, 1)))
    else:
        raise ConfigError(f"finetune.class_weights: unknown '{mode}'{did_you_mean(str(mode), MODES)}; "
                          f"use one of {list(MODES)} or a list of {n_classes} numbers")
    return w * n_classes / w.sum()


def weighted_sampler(y_train: np.ndarray, weights: np.ndarray, seed: int = 0) -> WeightedRandomSampler:
    """Sample each image with probability ∝ its class weight (with replacement, one epoch's worth)."""
    per_sample = torch.as_tensor(weights[np.asarray(y_train, dtype=int)], dtype=torch.double)
    gen = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(per_sample, num_samples=len(per_sample), replacement=True, generator=gen)
