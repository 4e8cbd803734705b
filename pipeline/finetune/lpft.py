"""LP-FT (Kumar et al. 2022): a linear probe on the frozen backbone, then full fine-tuning from the probed head."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from pipeline.config import FinetuneConfig
from pipeline.finetune.checkpoint import check_fingerprint, fingerprint, load_state
from pipeline.finetune.loop import EpochHook, finetune
from pipeline.finetune.options import check_options
from pipeline.finetune.probe import Features, linear_probe
from pipeline.records import TrainResult

PHASES = ("probe", "finetune")  # the value of the `lpft_phase` metric is the index here
PhaseHook = Callable[[str, int], None]  # (phase name, first epoch of the phase), called as the phase starts

log = logging.getLogger("medxfer")


def phase_configs(cfg: FinetuneConfig) -> tuple[FinetuneConfig, FinetuneConfig]:
    """The two trainings of an lp-ft config: (linear probe, full fine-tuning).

    The probe is strategy linear-probe for ``lpft_probe_epochs`` epochs at ``lpft_probe_lr`` (None:
    as linear-probe trains the head, at ``head_lr``, else ``lr``); the fine-tuning is strategy
    finetune with the config's ``epochs``, ``lr``, ``head_lr`` and ``layer_lr_decay``.
    """
    probe = copy.copy(cfg)
    probe.strategy, probe.epochs = "linear-probe", cfg.lpft_probe_epochs
    if cfg.lpft_probe_lr is not None:
        probe.lr, probe.head_lr = cfg.lpft_probe_lr, None
    full = copy.copy(cfg)
    full.strategy = "finetune"
    return probe, full


def lp_ft(
    model: nn.Module,
    groups: list[tuple[str, list[str]]],
    train_ds: Dataset,
    val_ds: Dataset,
    y_train: np.ndarray,
    cfg: FinetuneConfig,
    n_classes: int,
    on_epoch: EpochHook | None = None,
    on_phase: PhaseHook | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    features: tuple[Features, Features] | None = None,
    distributed: bool = True,
) -> TrainResult:
    """Train with strategy lp-ft: the linear probe, then full fine-tuning starting from its best head.

    The probe is exactly what strategy linear-probe does with `phase_configs`' probe settings: on
    `features` (train, val cached features of the frozen backbone; one process, CPU) when given,
    else through the training loop on the images (augmentation, DDP). The fine-tuning then starts
    from the probe's best epoch: the head as probed, the backbone as it came in. Epochs are numbered
    on through both phases (probe 0 … P-1, fine-tuning P …, P the probe's epochs run); each metrics
    row carries ``lpft_phase`` (0 probe, 1 fine-tuning), `on_phase(name, first_epoch)` announces
    each phase, and the result's `trainable_by_phase` holds both phases' trainable parameter counts.
    The kept model is the fine-tuning's best epoch (early stopping watches each phase on its own).

    One `checkpoint` file holds the running phase's training state, tagged ``extra.lpft`` with the
    phase, the whole lp-ft config's fingerprint and, once fine-tuning runs, the probe's summary, so
    `resume` continues in either phase (bit-identical on CPU).

    Raises:
        ConfigError: bad options, or a checkpoint that is missing or from other settings.
    """
    check_options(cfg)
    probe_cfg, full_cfg = phase_configs(cfg)
    phase, saved_probe = "probe", None
    if resume:
        state = load_state(Path(checkpoint or ""))
        tag = (state.get("extra") or {}).get("lpft") or {}
        check_fingerprint(tag.get("config", state.get("config", {})), cfg, checkpoint or "")
        phase, saved_probe = tag.get("phase", "probe"), tag.get("probe")

    def shifted(offset: int, index: int) -> EpochHook:
        def hook(epoch: int, row: dict[str, float]) -> None:
            row["lpft_phase"] = float(index)
            if on_epoch is not None:
                on_epoch(epoch + offset, row)

        return hook

    base = {"config": fingerprint(cfg)}
    if phase == "probe":
        if on_phase is not None:
            on_phase("probe", 0)
        extra = {"lpft": {**base, "phase": "probe"}}
        if features is not None:
            probe = linear_probe(
                model, *features, probe_cfg, n_classes, shifted(0, 0), checkpoint, resume, extra_state=extra
            )
        else:
            probe = finetune(
                model,
                groups,
                train_ds,
                val_ds,
                y_train,
                probe_cfg,
                n_classes,
                shifted(0, 0),
                checkpoint=checkpoint,
                resume=resume,
                distributed=distributed,
                extra_state=extra,
            )
        resume = False  # the fine-tuning starts afresh from the probed head
        summary = _summary(probe)
    else:
        summary = saved_probe or {}
    log.info(
        "lp-ft: probe kept epoch %d of %d (%s %.4f); fine-tuning every layer from that head",
        summary.get("best_epoch", 0) + 1,
        summary.get("epochs_run", 0),
        cfg.early_stopping.metric,
        summary.get("best_metric", math.nan),
    )
    n_probe = int(summary.get("epochs_run", 0))  # fewer than lpft_probe_epochs when the probe stopped early
    if on_phase is not None:
        on_phase("finetune", n_probe)
    full = finetune(
        model,
        groups,
        train_ds,
        val_ds,
        y_train,
        full_cfg,
        n_classes,
        shifted(n_probe, 1),
        checkpoint=checkpoint,
        resume=resume,
        distributed=distributed,
        extra_state={"lpft": {**base, "phase": "finetune", "probe": summary}},
    )
    return _merge(summary, full)


def _summary(r: TrainResult) -> dict[str, Any]:
    """The probe's result without its model: plain values for the checkpoint."""
    return {
        "history": r.history,
        "best_epoch": r.best_epoch,
        "best_metric": r.best_metric,
        "epochs_run": r.epochs_run,
        "stopped_early": r.stopped_early,
        "seconds": r.seconds,
        "trainable_by_phase": r.trainable_by_phase,
        "resumed_from": r.resumed_from,
    }


def _merge(probe: dict[str, Any], full: TrainResult) -> TrainResult:
    """One result over both phases: the probe's epochs, then the fine-tuning's, numbered on; histories joined."""
    p_hist: dict[str, list[float]] = probe.get("history", {})
    n_p, n_f = probe.get("epochs_run", 0), full.epochs_run
    keys = list(dict.fromkeys([*p_hist, *full.history]))
    history = {
        k: [float(v) for v in p_hist.get(k, [math.nan] * n_p)]
        + [float(v) for v in full.history.get(k, [math.nan] * n_f)]
        for k in keys
    }
    history["lpft_phase"] = [0.0] * n_p + [1.0] * n_f  # as each epoch's row carried it
    if full.resumed_from >= 0:
        resumed = n_p + full.resumed_from
    else:
        resumed = probe.get("resumed_from", -1)
    return TrainResult(
        model=full.model,
        history=history,
        best_epoch=n_p + full.best_epoch,
        best_metric=full.best_metric,
        epochs_run=n_p + n_f,
        stopped_early=full.stopped_early,
        seconds=probe.get("seconds", 0.0) + full.seconds,
        class_weights=full.class_weights,
        trainable_by_phase=[*probe.get("trainable_by_phase", []), *full.trainable_by_phase],
        device=full.device,
        resumed_from=resumed,
    )
