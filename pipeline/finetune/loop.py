"""The fine-tuning loop: one readable function, plus the cached-feature linear probe."""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pipeline.errors import ConfigError
from pipeline.finetune.freezing import apply_freezing, param_groups, set_bn_policy, trainable_group_indices
from pipeline.finetune.weighting import class_weights, weighted_sampler

EpochHook = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    """What training returns; the model holds the best epoch's weights."""

    model: nn.Module
    history: dict[str, list[float]] = field(default_factory=dict)
    best_epoch: int = 0
    best_metric: float = float("nan")
    epochs_run: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    class_weights: list[float] = field(default_factory=list)
    trainable_by_phase: list[int] = field(default_factory=list)
    device: str = "cpu"


def pick_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"finetune.device: '{name}' requested but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def auroc(y: np.ndarray, logits: np.ndarray) -> float:
    """Binary AUROC of softmax[:, 1], macro one-vs-rest for more classes; NaN if one class only."""
    if len(np.unique(y)) < 2:
        return float("nan")
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1]))))


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 32,
                   num_workers: int = 0, desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and labels (N,) in dataset order."""
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    logits, ys = [], []
    with Progress(transient=True, disable=desc is None) as bar:
        task = bar.add_task(desc or "", total=len(loader))
        for x, y, _ in loader:
            with _autocast(device):
                logits.append(model(x.to(device)).float().cpu())
            ys.append(y)
            bar.advance(task)
    return torch.cat(logits).numpy(), torch.cat(ys).numpy()


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _cosine_with_warmup(total_steps: int, warmup: int, offset: int = 0) -> Callable[[int], float]:
    """LR factor per optimizer step: linear warm-up, then cosine to 0; `offset` resumes mid-schedule."""

    def factor(step: int) -> float:
        step += offset
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _better(metric: str, new: float, best: float) -> bool:
    if math.isnan(new):
        return False
    if math.isnan(best):
        return True
    return new < best if metric.endswith("loss") else new > best


def _train_epoch(model, loader, optimizer, scheduler, loss_fn, device, bn, clip=1.0) -> tuple[float, int]:
    """One pass over the training data; returns (mean loss, images seen)."""
    model.train()
    set_bn_policy(model, bn)
    total, seen = 0.0, 0
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if device.type == "cuda" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(y)
        seen += len(y)
    return total / max(1, seen), seen


def finetune(model: nn.Module, groups: list[tuple[str, list[str]]], train_ds: Dataset, val_ds: Dataset,
             y_train: np.ndarray, cfg: Any, n_classes: int, on_epoch: EpochHook | None = None,
             unfreeze_every: int = 1, partial_freeze: int = 2) -> TrainResult:
    """Train `model` with strategy finetune | partial | gradual | linear-probe (uncached).

    Steps per epoch: (gradual: unfreeze the next group) → train one pass (AMP on CUDA, clipped
    gradients, cosine schedule with warm-up) → validate → log → keep the best → early stop.
    """
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.to(device)
    weights = class_weights(y_train, n_classes, cfg.class_weights)
    loss_fn = nn.CrossEntropyLoss(weight=torch.as_tensor(weights, dtype=torch.float32, device=device))
    sampler = weighted_sampler(y_train, weights, cfg.seed) if cfg.sampler == "weighted" else None
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        generator=gen, num_workers=cfg.num_workers, drop_last=len(train_ds) > cfg.batch_size)
    steps = cfg.epochs * len(loader)
    result = TrainResult(model=model, class_weights=weights.tolist(), device=str(device))
    best_state, patience = copy.deepcopy(model.state_dict()), 0
    metric, start, phase_of = cfg.early_stopping.metric, time.time(), -1
    optimizer = scheduler = None
    for epoch in range(cfg.epochs):
        phase = epoch // unfreeze_every if cfg.strategy == "gradual" else 0
        if phase != phase_of:  # (re)build the optimizer when the trainable set changes
            trainable = trainable_group_indices(cfg.strategy, len(groups), phase=phase, partial_freeze=partial_freeze)
            n_trainable = apply_freezing(model, groups, trainable)
            result.trainable_by_phase.append(n_trainable)
            optimizer = torch.optim.AdamW(param_groups(model, groups, trainable, cfg.lr, cfg.layer_lr_decay,
                                                       cfg.head_lr, cfg.weight_decay))
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, _cosine_with_warmup(steps, max(1, len(loader) // 2), offset=epoch * len(loader)))
            phase_of = phase
        t0 = time.time()
        train_loss, seen = _train_epoch(model, loader, optimizer, scheduler, loss_fn, device, cfg.bn)
        val_logits, val_y = predict_logits(model, val_ds, device, cfg.batch_size, cfg.num_workers)
        row = {"train_loss": train_loss, "val_auroc": auroc(val_y, val_logits),
               "val_loss": float(loss_fn(torch.as_tensor(val_logits, device=device), torch.as_tensor(val_y, device=device))),
               "lr": optimizer.param_groups[-1]["lr"], "trainable_params": n_trainable,
               "epoch_seconds": time.time() - t0, "images_per_s": seen / max(1e-9, time.time() - t0)}
        _record(result, epoch, row, on_epoch)
        if _better(metric, row.get(metric, float("nan")), result.best_metric):
            result.best_metric, result.best_epoch, patience = row[metric], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            patience += 1
            if patience >= cfg.early_stopping.patience:
                result.stopped_early = True
                break
    model.load_state_dict(best_state)
    result.seconds = time.time() - start
    return result


def _record(result: TrainResult, epoch: int, row: dict[str, float], on_epoch: EpochHook | None) -> None:
    for key, value in row.items():
        result.history.setdefault(key, []).append(float(value))
    result.epochs_run = epoch + 1
    if on_epoch is not None:
        on_epoch(epoch, row)


@torch.no_grad()
def extract_features(features: nn.Module, dataset: Dataset, device: torch.device, batch_size: int,
                     cache_file: Path | None = None, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled backbone features for every item, computed once (and cached to `cache_file`)."""
    if cache_file is not None and cache_file.exists():
        blob = torch.load(cache_file, weights_only=True)
        return blob["x"], blob["y"]
    features.eval().to(device)
    xs, ys = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with Progress(transient=True) as bar:
        task = bar.add_task(f"[cyan]{desc}", total=len(dataset))
        for x, y, _ in loader:
            with _autocast(device):
                xs.append(features(x.to(device)).float().cpu())
            ys.append(y)
            bar.advance(task, len(y))
    out = torch.cat(xs), torch.cat(ys)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        torch.save({"x": out[0], "y": out[1]}, tmp)
        tmp.replace(cache_file)
    return out


def feature_cache_key(weights_sha: str | None, spec_hash: str, shas: list[str]) -> str:
    """Cache key of a feature table: model weights × prepare spec × the images, in order."""
    h = hashlib.sha256(f"{weights_sha}|{spec_hash}|".encode())
    for s in shas:
        h.update(s.encode())
    return h.hexdigest()[:24]


def linear_probe(model: nn.Module, train_feats: tuple[torch.Tensor, torch.Tensor],
                 val_feats: tuple[torch.Tensor, torch.Tensor], cfg: Any, n_classes: int,
                 on_epoch: EpochHook | None = None) -> TrainResult:
    """Train only `model.head` on cached features (frozen backbone): seconds, not minutes."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)
    train_ds, val_ds = TensorDataset(*train_feats, torch.arange(len(train_feats[1]))), \
        TensorDataset(*val_feats, torch.arange(len(val_feats[1])))
    probe_cfg = copy.copy(cfg)
    probe_cfg.device, probe_cfg.num_workers, probe_cfg.strategy, probe_cfg.bn = "cpu", 0, "finetune", "train"
    head_groups = [("head", ["head"])]
    result = finetune(_HeadOnly(model.head), head_groups, train_ds, val_ds, train_feats[1].numpy(),
                      probe_cfg, n_classes, on_epoch)
    result.model = model.cpu()
    result.trainable_by_phase = [sum(p.numel() for p in model.head.parameters())]
    return result


class _HeadOnly(nn.Module):
    """Wraps the head so that its parameter names share the single prefix ''."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)
