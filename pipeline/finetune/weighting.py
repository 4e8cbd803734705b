"""Class imbalance: class weights computed on the train split only, and the (weighted) epoch sampler."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

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
        raise ConfigError(
            f"finetune.class_weights: unknown '{mode}'{did_you_mean(str(mode), MODES)}; "
            f"use one of {list(MODES)} or a list of {n_classes} numbers"
        )
    return w * n_classes / w.sum()


class EpochSampler(Sampler[int]):
    """The training order of one epoch as a pure function of (seed, epoch), sharded over processes.

    Uniform: a random permutation. Weighted: `n` draws with replacement, each index with
    probability ∝ its weight. Under DDP every rank draws the same global order and takes every
    `world`-th index from position `rank` (padded by repeating the first indices so all ranks
    get the same count), so rank r's batch b and the other ranks' batch b together are exactly
    batch b of the one-process order with the same global batch size. Call `set_epoch` before
    each epoch; a resumed run gets the same order without saving any generator state.
    """

    def __init__(self, n: int, weights: torch.Tensor | None = None, seed: int = 0, rank: int = 0, world: int = 1):
        self.n, self.weights, self.seed, self.rank, self.world = n, weights, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.n, generator=gen)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=gen)
        pad = len(self) * self.world - self.n
        if pad:
            order = torch.cat([order, order.repeat(math.ceil(pad / self.n))[:pad]])
        return iter(order[self.rank :: self.world].tolist())


def weighted_sampler(
    y_train: np.ndarray, seed: int = 0, rank: int = 0, world: int = 1, n_classes: int | None = None
) -> EpochSampler:
    """Draw classes in balance: each image with probability ∝ 1 / (its class's train count).

    The sampler balances by itself, independently of the loss's ``finetune.class_weights``: with
    loss weights ``none`` it still balances, and explicit loss weights do not change its draws.
    Combined with loss weights ``balanced`` the imbalance is corrected twice (the minority class
    is both over-sampled and up-weighted), which should usually be avoided.

    Args:
        y_train: integer train labels.
        seed: base seed; each epoch's order also depends on the epoch set by `set_epoch`.
        rank, world: this process and the number of processes (DDP).
        n_classes: number of classes (default: the largest label + 1).

    Returns:
        An `EpochSampler` of ``len(y_train)`` draws with replacement per epoch.
    """
    y = np.asarray(y_train, dtype=int)
    k = int(n_classes) if n_classes is not None else int(y.max(initial=-1)) + 1
    balanced = class_weights(y, k, "balanced")  # n / (k * n_c): the sampler's own, never the loss's
    per_sample = torch.as_tensor(balanced[y], dtype=torch.double)
    return EpochSampler(len(per_sample), per_sample, seed, rank, world)
