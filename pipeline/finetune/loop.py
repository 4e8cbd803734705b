"""The fine-tuning loop: one readable function (strategies, checkpoints and resume, DDP), plus validation helpers."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from pipeline.config import FinetuneConfig
from pipeline.errors import ConfigError
from pipeline.finetune.checkpoint import (
    capture_rng,
    check_fingerprint,
    fingerprint,
    load_state,
    random_states,
    restore_rng,
    save_state,
)
from pipeline.finetune.distributed import (
    World,
    all_sum,
    broadcast,
    init_distributed,
    pick_device,
    wrap,
)
from pipeline.finetune.freezing import (
    apply_freezing,
    param_groups,
    set_bn_policy,
    trainable_group_indices,
)
from pipeline.finetune.losses import make_loss
from pipeline.finetune.options import check_options
from pipeline.finetune.weighting import EpochSampler, class_weights, weighted_sampler
from pipeline.records import TrainResult
from pipeline.stats import auroc

EpochHook = Callable[[int, dict[str, float]], None]


def val_auroc(y: np.ndarray, logits: np.ndarray) -> float:
    """`pipeline.stats.auroc` of softmax(logits) (float64) for the epoch history; NaN when undefined."""
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()
    value = auroc(np.asarray(y, dtype=np.int64), probs)
    return float("nan") if value is None else value


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 32,
    num_workers: int = 0,
    desc: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and labels (N,) in dataset order."""
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    logits, ys = [], []
    with Progress(transient=True, disable=desc is None) as bar:
        task = bar.add_task(desc or "", total=len(loader))
        for x, y, _ in loader:
            with autocast(device):
                logits.append(model(x.to(device)).float().cpu())
            ys.append(y)
            bar.advance(task)
    return torch.cat(logits).numpy(), torch.cat(ys).numpy()


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA; a disabled context on CPU (float32, as trained and scored there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _cosine_with_warmup(total_steps: int, warmup: int, offset: int = 0) -> Callable[[int], float]:
    """LR factor per optimizer step: linear warm-up, then cosine to 0; `offset` starts mid-schedule."""

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


@dataclass
class _Loop:
    """The mutable state of one run: what a checkpoint holds, besides the random-number states."""

    result: TrainResult
    best_state: dict[str, torch.Tensor]
    next_epoch: int = 0
    patience: int = 0
    phase: int = -1
    phase_start: int = 0
    n_trainable: int = 0
    optimizer: Any = None
    scheduler: Any = None
    net: Any = None  # what runs forward in training: the model, DDP(model) and/or torch.compile of it


def finetune(
    model: nn.Module,
    groups: list[tuple[str, list[str]]],
    train_ds: Dataset,
    val_ds: Dataset,
    y_train: np.ndarray,
    cfg: FinetuneConfig,
    n_classes: int,
    on_epoch: EpochHook | None = None,
    unfreeze_every: int | None = None,
    partial_freeze: int | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    distributed: bool = True,
    extra_state: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model` with strategy finetune | partial | gradual | linear-probe (uncached).

    Per epoch: (gradual: unfreeze the next group) → train one pass (AMP and channels_last on
    CUDA, clipped gradients, cosine schedule with warm-up) → validate → keep the best → call
    `on_epoch(epoch, row)` → write `checkpoint` → early stop. Under torchrun (WORLD_SIZE > 1)
    each process trains its shard of every global batch (``cfg.batch_size`` is the global
    batch) through DDP; rank 0 validates and writes the checkpoint, and every rank gets its row.

    Args:
        model, groups: the network and its named layer groups, stem → head.
        train_ds, val_ds: datasets yielding (x, y, index); y_train: the train labels.
        cfg: a FinetuneConfig. n_classes: number of classes.
        on_epoch: called after each epoch with the metrics row (rank 0's values on every rank).
        unfreeze_every, partial_freeze: override ``cfg.unfreeze_every`` / ``cfg.partial_freeze``.
        checkpoint: file for the training state, rewritten atomically after every epoch.
        resume: continue from `checkpoint` (same settings; bit-identical on CPU).
        distributed: False trains in this process alone even under torchrun.
        extra_state: plain values saved with every checkpoint under ``extra`` (lp-ft: its phase).

    Raises:
        ConfigError: bad options, or a checkpoint that is missing or from other settings.
    """
    if cfg.strategy == "lp-ft":
        raise ConfigError("finetune.strategy: lp-ft runs two trainings; call pipeline.finetune.lp_ft, not finetune")
    world = init_distributed(cfg.device) if distributed else World(device=pick_device(cfg.device))
    check_options(cfg, world.size)
    every = unfreeze_every or cfg.unfreeze_every
    n_frozen = cfg.partial_freeze if partial_freeze is None else partial_freeze
    torch.manual_seed(cfg.seed)
    model.to(world.device)
    if world.device.type == "cuda" and not any(p.dim() == 5 for p in model.parameters()):
        model.to(memory_format=torch.channels_last)
    weights = class_weights(y_train, n_classes, cfg.class_weights)
    loss_fn = make_loss(cfg.loss, weights, cfg.focal_gamma, world.device)
    loader, gen = _train_loader(train_ds, y_train, n_classes, cfg, world)
    rngs = random_states(train_ds)  # e.g. MONAI augmentation states, saved with each checkpoint
    st = _Loop(
        TrainResult(model=model, class_weights=weights.tolist(), device=str(world.device)),
        copy.deepcopy(model.state_dict()),
    )
    if resume:
        _restore(st, Path(checkpoint or ""), model, groups, cfg, len(loader), n_frozen, world, gen, rngs)
    start = time.time() - st.result.seconds
    for epoch in range(st.next_epoch, cfg.epochs if not st.result.stopped_early else 0):
        phase = epoch // every if cfg.strategy == "gradual" else 0
        if phase != st.phase:  # the trainable set changes: new freezing, optimizer, schedule, wrapper
            _enter_phase(st, model, groups, cfg, phase, epoch, len(loader), n_frozen, world)
        cast(EpochSampler, loader.sampler).set_epoch(epoch)  # the order of this epoch, on every rank
        row = _run_epoch(st, model, loader, val_ds, loss_fn, cfg, world)
        _update(st, model, epoch, row, cfg)
        st.result.seconds = time.time() - start
        if on_epoch is not None:
            on_epoch(epoch, row)
        if checkpoint is not None and world.lead:  # after logging: a checkpointed epoch is a logged epoch
            save_state(checkpoint, {**_pack(st, model, cfg, gen, rngs), "extra": extra_state or {}})
        if st.result.stopped_early:
            break
    model.load_state_dict(st.best_state)
    st.result.seconds = time.time() - start
    return st.result


def _train_loader(
    train_ds: Dataset, y_train: np.ndarray, n_classes: int, cfg: FinetuneConfig, world: World
) -> tuple[DataLoader, torch.Generator]:
    """This process's loader: its share (batch_size / world) of every global batch, in a per-epoch order.

    ``sampler: weighted`` balances the classes by itself (`weighted_sampler`), whatever the loss weights.
    """
    per_rank = cfg.batch_size // world.size
    if cfg.sampler == "weighted":
        sampler = weighted_sampler(y_train, cfg.seed, world.rank, world.size, n_classes)
    else:
        sampler = EpochSampler(len(train_ds), None, cfg.seed, world.rank, world.size)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(cfg.seed)  # seeds the workers' augmentation, nothing else
    loader = DataLoader(
        train_ds,
        batch_size=per_rank,
        sampler=sampler,
        generator=gen,
        num_workers=cfg.num_workers,
        drop_last=len(sampler) > per_rank,
        worker_init_fn=_seed_worker if cfg.num_workers else None,
        pin_memory=world.device.type == "cuda",
    )
    return loader, gen


def _seed_worker(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream (otherwise every epoch repeats the parent's)."""
    info = get_worker_info()
    for i, state in enumerate(random_states(info.dataset)):  # type: ignore[union-attr]
        state.seed((info.seed + i) % 2**32)  # type: ignore[union-attr]


def _enter_phase(
    st: _Loop,
    model: nn.Module,
    groups: list,
    cfg: FinetuneConfig,
    phase: int,
    epoch: int,
    steps: int,
    n_frozen: int,
    world: World,
    record: bool = True,
) -> None:
    trainable = trainable_group_indices(cfg.strategy, len(groups), phase=phase, partial_freeze=n_frozen)
    st.n_trainable = apply_freezing(model, groups, trainable)
    if record:
        st.result.trainable_by_phase.append(st.n_trainable)
    st.optimizer = torch.optim.AdamW(
        param_groups(model, groups, trainable, cfg.lr, cfg.layer_lr_decay, cfg.head_lr, cfg.weight_decay)
    )
    st.scheduler = torch.optim.lr_scheduler.LambdaLR(
        st.optimizer, _cosine_with_warmup(cfg.epochs * steps, max(1, steps // 2), offset=epoch * steps)
    )
    st.net = wrap(model, world)
    if cfg.compile:
        st.net = torch.compile(st.net)
    st.phase, st.phase_start = phase, epoch


def _train_epoch(
    net: nn.Module,
    model: nn.Module,
    loader: DataLoader,
    optimizer: Any,
    scheduler: Any,
    loss_fn: nn.Module,
    device: torch.device,
    bn: str,
    clip: float = 1.0,
) -> tuple[float, int]:
    """One pass over this process's share of the training data; returns (summed loss, images seen)."""
    net.train()
    set_bn_policy(model, bn)
    params = [p for p in model.parameters() if p.requires_grad]
    total, seen = torch.zeros((), dtype=torch.float64, device=device), 0
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if device.type == "cuda" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):  # forward in bf16 on CUDA; the loss in float32
            loss = loss_fn(net(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP, gradients are averaged over the processes here
        nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        total += loss.detach() * len(y)  # no .item(): one device sync per epoch, not per step
        seen += len(y)
    return float(total), seen


def _run_epoch(
    st: _Loop,
    model: nn.Module,
    loader: DataLoader,
    val_ds: Dataset,
    loss_fn: nn.Module,
    cfg: FinetuneConfig,
    world: World,
) -> dict[str, float]:
    """Train one epoch, then validate on rank 0; the metrics row, identical on every rank."""
    t0 = time.perf_counter()
    loss_sum, seen = _train_epoch(st.net, model, loader, st.optimizer, st.scheduler, loss_fn, world.device, cfg.bn)
    train_s = time.perf_counter() - t0
    loss_sum, seen_all = all_sum([loss_sum, seen], world)  # over all processes
    seen = int(seen_all)
    row: dict[str, float] | None = None
    if world.lead:
        val_logits, val_y = predict_logits(model, val_ds, world.device, cfg.batch_size, cfg.num_workers)
        val_loss = loss_fn(
            torch.as_tensor(val_logits, device=world.device), torch.as_tensor(val_y, device=world.device)
        )
        row = {
            "train_loss": loss_sum / max(1, seen),
            "val_loss": float(val_loss),
            "val_auroc": val_auroc(val_y, val_logits),
            "lr": st.optimizer.param_groups[-1]["lr"],
            "trainable_params": st.n_trainable,
            "epoch_seconds": time.perf_counter() - t0,
            "images_per_s": seen / max(1e-9, train_s),
        }
        row.update({f"lr_{g['name']}": g["lr"] for g in st.optimizer.param_groups[:-1]})
    return broadcast(row, world)


def _update(st: _Loop, model: nn.Module, epoch: int, row: dict[str, float], cfg: FinetuneConfig) -> None:
    """Record the row, keep the best weights, count patience."""
    r = st.result
    for key, value in row.items():
        r.history.setdefault(key, []).append(float(value))
    r.epochs_run = st.next_epoch = epoch + 1
    metric = cfg.early_stopping.metric
    if _better(metric, row[metric], r.best_metric):
        r.best_metric, r.best_epoch, st.patience = row[metric], epoch, 0
        st.best_state = copy.deepcopy(model.state_dict())
    else:
        st.patience += 1
        r.stopped_early = st.patience >= cfg.early_stopping.patience and st.next_epoch < cfg.epochs


def _pack(st: _Loop, model: nn.Module, cfg: FinetuneConfig, gen: torch.Generator, rngs: list) -> dict[str, Any]:
    r = st.result
    return {
        "model": model.state_dict(),
        "best_state": st.best_state,
        "optimizer": st.optimizer.state_dict(),
        "scheduler": st.scheduler.state_dict(),
        "next_epoch": st.next_epoch,
        "phase": st.phase,
        "phase_start": st.phase_start,
        "patience": st.patience,
        "history": r.history,
        "best_epoch": r.best_epoch,
        "best_metric": r.best_metric,
        "stopped_early": r.stopped_early,
        "seconds": r.seconds,
        "trainable_by_phase": r.trainable_by_phase,
        "config": fingerprint(cfg),
        "rng": capture_rng(gen, rngs),
    }


def _restore(
    st: _Loop,
    path: Path,
    model: nn.Module,
    groups: list,
    cfg: FinetuneConfig,
    steps: int,
    n_frozen: int,
    world: World,
    gen: torch.Generator,
    rngs: list,
) -> None:
    """Load a checkpoint into the loop: weights, optimizer and schedule of its phase, history, RNG states."""
    state = load_state(path)
    check_fingerprint(state["config"], cfg, path)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ConfigError(
            f"cannot resume: {path} does not fit this model ({str(exc).splitlines()[0]}); "
            "use the model.* settings of the interrupted run"
        ) from exc
    r = st.result
    r.history, r.best_epoch, r.best_metric = state["history"], state["best_epoch"], state["best_metric"]
    r.stopped_early, r.seconds, r.trainable_by_phase = (
        state["stopped_early"],
        state["seconds"],
        state["trainable_by_phase"],
    )
    r.epochs_run = r.resumed_from = st.next_epoch = state["next_epoch"]
    st.best_state, st.patience = state["best_state"], state["patience"]
    _enter_phase(st, model, groups, cfg, state["phase"], state["phase_start"], steps, n_frozen, world, record=False)
    st.optimizer.load_state_dict(state["optimizer"])
    st.scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"], gen, rngs)
