"""Linear probe on cached features: the head trained by gradient descent, or fitted by logistic regression."""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pipeline.config import FinetuneConfig
from pipeline.errors import ConfigError, DataError
from pipeline.finetune.loop import EpochHook, autocast, finetune, val_auroc
from pipeline.finetune.losses import make_loss
from pipeline.finetune.weighting import class_weights
from pipeline.io import atomic_path, load_tensors, state_sha256
from pipeline.records import TrainResult

Features = tuple[torch.Tensor, torch.Tensor]  # (N, F) float32 features, (N,) int labels


@torch.no_grad()
def extract_features(
    features: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int,
    cache_file: Path | None = None,
    desc: str = "features",
) -> Features:
    """Pooled backbone features for every item, computed once (and cached to `cache_file`, atomically)."""
    if cache_file is not None and cache_file.exists():
        blob = load_tensors(cache_file, "feature cache", f"delete {cache_file} (a cache: it is recomputed)")
        if not isinstance(blob, dict) or not all(isinstance(blob.get(k), torch.Tensor) for k in ("x", "y")):
            raise DataError(
                f"{cache_file}: not a feature cache (expected tensors x and y). Fix: delete it (it is recomputed)"
            )
        return blob["x"], blob["y"]
    features.eval().to(device)
    xs, ys = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with Progress(transient=True) as bar:
        task = bar.add_task(f"[cyan]{desc}", total=len(dataset))  # type: ignore[arg-type]
        for x, y, _ in loader:
            with autocast(device):
                xs.append(features(x.to(device)).float().cpu())
            ys.append(y)
            bar.advance(task, len(y))
    out = torch.cat(xs), torch.cat(ys)
    if cache_file is not None:
        with atomic_path(cache_file, durable=False) as tmp:  # a cache: recomputed when lost
            torch.save({"x": out[0], "y": out[1]}, tmp)
    return out


def feature_cache_key(features: nn.Module, spec_hash: str, shas: list[str]) -> str:
    """Cache key of a feature table: the extractor (its structure and every tensor) × prepare spec × the images.

    Hashing the network itself, not the weights file, keeps features apart that the file alone
    does not tell apart: another inflation or depth padding, slicewise or not, another random
    initialisation (weights ``none`` with another seed), another channel folding.
    """
    h = hashlib.sha256(f"{features!r}|{spec_hash}|{state_sha256(features)}|".encode())
    for s in shas:
        h.update(s.encode())
    return h.hexdigest()[:24]


def _freeze_all_but_head(model: nn.Module) -> int:
    head = model.get_submodule("head")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    return sum(p.numel() for p in head.parameters())


def linear_probe(
    model: nn.Module,
    train_feats: Features,
    val_feats: Features,
    cfg: FinetuneConfig,
    n_classes: int,
    on_epoch: EpochHook | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    extra_state: dict | None = None,
) -> TrainResult:
    """Train only `model.head` on cached features (frozen backbone): seconds, not minutes.

    Runs in this process on CPU (even under torchrun); `checkpoint`, `resume` and `extra_state` as in `finetune`.
    """
    n_head = _freeze_all_but_head(model)
    train_ds = TensorDataset(*train_feats, torch.arange(len(train_feats[1])))
    val_ds = TensorDataset(*val_feats, torch.arange(len(val_feats[1])))
    probe_cfg = copy.copy(cfg)
    probe_cfg.device, probe_cfg.num_workers, probe_cfg.strategy, probe_cfg.bn = "cpu", 0, "finetune", "train"
    probe_cfg.compile, probe_cfg.head = False, "linear"
    result = finetune(
        _HeadOnly(model.get_submodule("head")),
        [("head", ["head"])],
        train_ds,
        val_ds,
        train_feats[1].numpy(),
        probe_cfg,
        n_classes,
        on_epoch,
        checkpoint=checkpoint,
        resume=resume,
        distributed=False,
        extra_state=extra_state,
    )
    result.model = model.cpu()
    result.trainable_by_phase = [n_head]
    return result


def logistic_head(
    model: nn.Module,
    train_feats: Features,
    val_feats: Features,
    cfg: FinetuneConfig,
    n_classes: int,
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    """Fit `model.head` by scikit-learn logistic regression on cached features (``finetune.head: logistic``).

    The features are standardised, `LogisticRegression(C=cfg.logistic_c, class_weight=...)` is
    fitted (multinomial for more than two classes), and the fit is folded back into the
    ``nn.Linear`` head: multi-class rows as they are; binary w, b as rows (−w/2, w/2) and
    (−b/2, b/2), so that softmax(head)[:, k] equals ``predict_proba`` exactly. One "epoch".

    Raises:
        ConfigError: the head is not an nn.Linear with `n_classes` outputs.
        DataError: the train split lacks a class.
    """
    t0 = time.perf_counter()
    head = model.get_submodule("head")
    if not isinstance(head, nn.Linear) or head.out_features != n_classes:
        raise ConfigError(
            f"finetune.head: logistic needs an nn.Linear head with {n_classes} outputs, got {head!r}; use head: linear"
        )
    x, y = train_feats[0].double().numpy(), train_feats[1].numpy().astype(int)
    if len(np.unique(y)) != n_classes:
        raise DataError(
            f"finetune.head logistic: the train split holds classes {np.unique(y).tolist()} of "
            f"{n_classes}; every class needs train images"
        )
    weights = class_weights(y, n_classes, cfg.class_weights)
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    clf = LogisticRegression(C=cfg.logistic_c, class_weight=dict(enumerate(weights)), max_iter=5000)
    clf.fit((x - mu) / sd, y)
    coef = clf.coef_ / sd
    bias = clf.intercept_ - coef @ mu
    if n_classes == 2:
        coef, bias = np.vstack([-coef / 2, coef / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    n_head = _freeze_all_but_head(model)
    model.cpu()
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(coef, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
    row = _head_row(head, train_feats, val_feats, make_loss(cfg.loss, weights, cfg.focal_gamma))
    seconds = time.perf_counter() - t0
    row.update(trainable_params=n_head, epoch_seconds=seconds, images_per_s=len(y) / max(seconds, 1e-9))
    if on_epoch is not None:
        on_epoch(0, row)
    return TrainResult(
        model=model,
        history={k: [float(v)] for k, v in row.items()},
        best_epoch=0,
        best_metric=row.get(cfg.early_stopping.metric, float("nan")),
        epochs_run=1,
        seconds=seconds,
        class_weights=weights.tolist(),
        trainable_by_phase=[n_head],
        device="cpu",
    )


@torch.no_grad()
def _head_row(head: nn.Module, train_feats: Features, val_feats: Features, loss_fn: nn.Module) -> dict[str, float]:
    train_logits, val_logits = head(train_feats[0].float()), head(val_feats[0].float())
    return {
        "train_loss": float(loss_fn(train_logits, train_feats[1].long())),
        "val_loss": float(loss_fn(val_logits, val_feats[1].long())),
        "val_auroc": val_auroc(val_feats[1].numpy(), val_logits.numpy()),
    }


class _HeadOnly(nn.Module):
    """Wraps the head so that its parameter names share the single prefix 'head'."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)
