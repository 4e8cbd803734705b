"""The per-batch Scorer shared by every engine, the dataset of image units and its collate function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.errors import DataError
from pipeline.evaluate import Embedder
from pipeline.finetune import autocast
from pipeline.prepare import build_transform, prepare_image
from pipeline.records import PrepareSpec

Item = tuple[int, "torch.Tensor | None", str, str]  # (unit index, prepared tensor or None, reason, detail)
Sink = Callable[[dict[str, np.ndarray]], None]  # receives `Scorer.score_items` results, in any order


def prepare_unit(path: str, spec: PrepareSpec, transform: Any) -> tuple[torch.Tensor | None, str, str]:
    """Prepare one unit; never raises on bad data.

    Args:
        path: the unit's NIfTI file. spec: the model's prepare spec. transform: `build_transform(spec)`.

    Returns:
        (tensor, "", "") or (None, "prepare-error", detail).
    """
    try:
        x = prepare_image(path, spec, transform)
    except DataError as exc:
        return None, "prepare-error", str(exc).replace(f"{path}: ", "").splitlines()[0][:300]
    if not torch.isfinite(x).all():
        return None, "prepare-error", "the prepared tensor holds NaN or inf values (an empty or constant image?)"
    return x, "", ""


class UnitDataset(Dataset):
    """Image units by index → `Item`; the transform is built lazily, once per DataLoader worker."""

    def __init__(self, paths: list[str], spec: PrepareSpec):
        self.paths, self.spec = list(paths), spec
        self._transform: Any = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item:
        if self._transform is None:
            self._transform = build_transform(self.spec)
        return (i, *prepare_unit(self.paths[i], self.spec, self._transform))


def collate_units(items: list[Item]) -> list[Item]:
    """Keep a batch as a list: failed units (None tensors) travel with the good ones."""
    return list(items)


class Scorer:
    """Runs a packaged model (`adapt.CalibratedNet`) on prepared batches: probabilities, pooled
    embeddings (captured from ``model.net.features`` when it exists) and intensity statistics."""

    def __init__(self, model: nn.Module, spec: PrepareSpec, device: torch.device, n_classes: int):
        """Move `model` to `device` (eval mode) and build the spec's transform.

        Args:
            model: the packaged model. spec: its prepare spec. device: where inference runs (bf16
                autocast on CUDA). n_classes: width of the probability output.
        """
        self.spec, self.device, self.n_classes = spec, device, n_classes
        self.transform = build_transform(spec)
        self.embedder = Embedder(model, device, autocast, input_shape=(spec.channels, *spec.size))
        self.model, self.dim = self.embedder.model, self.embedder.dim

    def prepare(self, path: str) -> tuple[torch.Tensor | None, str, str]:
        """Prepare one unit with the model's spec (see `prepare_unit`)."""
        return prepare_unit(path, self.spec, self.transform)

    def forward(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities (B, C) and pooled embeddings (B, D) of a prepared batch."""
        return self.embedder.forward(x)

    def score_items(self, items: list[Item]) -> dict[str, np.ndarray]:
        """Per-unit arrays for a batch: idx, probs (NaN when failed), emb, mean, std, reason, detail.

        Args:
            items: the batch's `Item`s (failed units hold None tensors and keep their reason).

        Returns:
            {"idx": (N,) int64, "probs": (N, n_classes) float32, "emb": (N, D) float32, "mean", "std":
            (N,) float64 intensity of the prepared tensor, "reason", "detail": (N,) str ("" when ok)}.
        """
        n = len(items)
        probs, emb = np.full((n, self.n_classes), np.nan, np.float32), np.zeros((n, self.dim), np.float32)
        mean, std = np.full(n, np.nan), np.full(n, np.nan)
        reasons, details = [it[2] for it in items], [it[3] for it in items]
        ok = [j for j, it in enumerate(items) if it[1] is not None]
        if ok:
            x = torch.stack([t for t in (items[j][1] for j in ok) if t is not None])
            try:
                probs[ok], e = self.forward(x)
                if e.shape[1] == self.dim:
                    emb[ok] = e
                flat = x.flatten(1).double()
                mean[ok], std[ok] = flat.mean(1).numpy(), flat.std(1).numpy()
            except (RuntimeError, DataError) as exc:  # a batch the model cannot run: rows, not a crash
                for j in ok:
                    reasons[j], details[j] = "inference-error", str(exc).splitlines()[0][:300]
        return {
            "idx": np.array([it[0] for it in items], dtype=np.int64),
            "probs": probs,
            "emb": emb,
            "mean": mean,
            "std": std,
            "reason": np.array(reasons, dtype=str),
            "detail": np.array(details, dtype=str),
        }
