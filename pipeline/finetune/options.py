"""Checks of the fine-tuning options that types alone do not catch (all problems at once)."""

from __future__ import annotations

import logging

from pipeline.config import FinetuneConfig
from pipeline.errors import ConfigError, did_you_mean

STOP_METRICS = ("val_auroc", "val_loss", "train_loss")

log = logging.getLogger("medxfer")


def check_options(cfg: FinetuneConfig, world_size: int = 1, augment: bool = False) -> None:
    """Validate a FinetuneConfig before any work; raise one ConfigError listing every problem.

    Logs a warning (logger ``medxfer``) for valid but doubtful combinations: ``sampler: weighted``
    with ``class_weights: balanced`` corrects the class imbalance twice.

    Args:
        cfg: the ``finetune`` section.
        world_size: number of training processes (the global batch is split over them).
        augment: whether ``prepare.augment.enabled`` is on (a cached-feature head cannot use it).
    """
    problems = []
    checks = (
        ("focal_gamma", cfg.focal_gamma >= 0, "must be ≥ 0 (0 is plain cross-entropy)"),
        ("unfreeze_every", cfg.unfreeze_every >= 1, "must be ≥ 1 epoch per gradual phase"),
        ("partial_freeze", cfg.partial_freeze >= 0, "must be ≥ 0 layer groups frozen from the stem"),
        ("logistic_c", cfg.logistic_c > 0, "must be > 0 (inverse L2 strength of the logistic head)"),
        ("lpft_probe_epochs", cfg.lpft_probe_epochs >= 1, "must be ≥ 1 epoch of linear probe before fine-tuning"),
        (
            "lpft_probe_lr",
            cfg.lpft_probe_lr is None or cfg.lpft_probe_lr > 0,
            "must be > 0, or null (the probe then trains at head_lr, else lr)",
        ),
    )
    for name, ok, rule in checks:
        if not ok:
            problems.append(f"finetune.{name}: {rule}, got {getattr(cfg, name)}")
    metric = cfg.early_stopping.metric
    if metric not in STOP_METRICS:
        problems.append(
            f"finetune.early_stopping.metric: unknown '{metric}'{did_you_mean(metric, STOP_METRICS)}; "
            f"use one of {list(STOP_METRICS)}"
        )
    if cfg.head == "logistic" and cfg.strategy != "linear-probe":
        problems.append(
            f"finetune.head: 'logistic' is fitted on cached features of a frozen backbone; it needs "
            f"strategy linear-probe, got '{cfg.strategy}' (use head: linear)"
        )
    if cfg.head == "logistic" and augment:
        problems.append(
            "finetune.head: 'logistic' needs cached features, which augmentation rules out; "
            "set prepare.augment.enabled: false or head: linear"
        )
    if cfg.batch_size % world_size:
        problems.append(
            f"finetune.batch_size: {cfg.batch_size} is the global batch and must divide evenly over "
            f"{world_size} processes; use a multiple of {world_size}"
        )
    if problems:
        raise ConfigError("invalid finetune options:\n  - " + "\n  - ".join(problems))
    probe_lr = cfg.lpft_probe_lr or cfg.head_lr or cfg.lr
    if cfg.strategy == "lp-ft" and cfg.lr > probe_lr:
        log.warning(
            "finetune.lr: lp-ft fine-tunes at lr %g, above the probe's %g; Kumar et al. (2022) fine-tune at a "
            "smaller learning rate than the probe so that the probed head is not undone (set lpft_probe_lr)",
            cfg.lr,
            probe_lr,
        )
    if cfg.sampler == "weighted" and cfg.class_weights == "balanced":
        log.warning(
            "finetune.sampler: weighted already draws the classes in balance; with class_weights: balanced "
            "the loss corrects the imbalance a second time (minority classes over-weighted). Usually set "
            "class_weights: none with sampler: weighted, or keep sampler: uniform"
        )
