"""`train`: prepare + adapt + fine-tune one config, resumable and DDP-aware, everything logged to MLflow."""

from __future__ import annotations

import copy
import json
import logging
import platform
import shlex
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline import tracking
from pipeline.adapt import MedNet, layer_groups, resolve_weights, write_package
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.finetune import (
    World,
    check_options,
    extract_features,
    feature_cache_key,
    finetune,
    init_distributed,
    linear_probe,
    logistic_head,
    lp_ft,
    pick_device,
    shutdown,
)
from pipeline.finetune.distributed import barrier, broadcast
from pipeline.finetune.probe import Features
from pipeline.prepare import make_spec
from pipeline.records import AdaptationSummary, Cohort, PrepareSpec, TrainResult
from pipeline.run.cohort import build_network, ensure_manifest, load_cohort, make_datasets, manifest_hash

if TYPE_CHECKING:
    pass

log = logging.getLogger("medxfer")


def train(
    cfg: Config,
    progress: bool = True,
    step: Callable[[str], None] | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """prepare + adapt + finetune; logs everything to MLflow and returns the run id.

    ``cfg.finetune.resume = RUN_ID`` (CLI ``train --resume RUN_ID``) continues an interrupted run:
    the same MLflow run, the training state from ``<manifest>/checkpoints/<run id>.pt`` (written
    after every epoch, removed when training ends), and a metric history that goes on without
    repeating a step. Under ``torchrun --nproc-per-node N`` each process trains its shard of every
    global batch (DDP); rank 0 alone ingests, logs to MLflow and writes files; all return the run id.
    `step` (see `run.demo.stepper`) announces the ingest and the training on the console. `tags`
    are set on a new run when it starts (`medxfer study`: its parent run and arm), with the run's own.

    Raises:
        ConfigError: bad finetune options, or a run that cannot be resumed (unknown, finished,
            other settings, checkpoint gone).
    """
    world = init_distributed(cfg.finetune.device)
    check_options(cfg.finetune, world.size, augment=cfg.prepare.augment.enabled)
    # an unknown backbone (get_spec inside) or absent weights fail before a long ingest
    resolve_weights(cfg.model.backbone, cfg.model.weights, cfg.model.weights_dir)
    if world.lead:
        tracking.connect(cfg.tracking.uri)
        if cfg.finetune.resume:
            _check_resumable(cfg)
    announce = step if step is not None and world.lead else (lambda message: None)
    if cfg.data.source:
        announce(f"ingesting {cfg.data.source} into the manifest {cfg.data.manifest}")
    else:
        announce(f"using the manifest in {cfg.data.manifest} (no data.source)")
    manifest_dir = ensure_manifest(cfg, progress) if world.lead else Path(cfg.data.manifest)
    barrier(world)
    cohort = load_cohort(manifest_dir, cfg.data.train_fraction, cfg.finetune.seed)
    torch.manual_seed(cfg.finetune.seed)  # the new head (and a from-scratch backbone) start from the seed
    model, summary = build_network(cfg, len(cohort.classes))
    spec = prepare_spec(cfg, summary)
    data = make_datasets(cfg, cohort, spec, augment=True)
    f = cfg.finetune
    epochs = "" if f.strategy == "linear-probe" and f.head == "logistic" else f", up to {f.epochs} epochs"
    if f.strategy == "lp-ft":
        epochs = f", up to {f.lpft_probe_epochs} probe + {f.epochs} fine-tuning epochs"
    announce(f"training {cfg.model.backbone} ({f.strategy}{epochs}) on {len(data['train'])} training units")
    if world.lead:
        run_id = _train_and_log(cfg, cohort, model, summary, spec, data, world, tags or {})
    else:
        run_id, resume = broadcast(None, world)
        _fit(cfg, cohort, model, summary, spec, data, world, run_id, resume)
    barrier(world)
    shutdown(world)
    return run_id


def prepare_spec(cfg: Config, summary: AdaptationSummary) -> PrepareSpec:
    """The PrepareSpec of a run: the config's prepare settings with the backbone's preprocessing.

    Normalisation (mean/std) and resize interpolation come from the backbone (`summary`, i.e. its
    registry entry: bilinear for torchvision ResNets/DenseNets, bicubic for timm EfficientNets);
    the input size stays ``prepare.size`` (the backbone's own is recorded in `summary.input_size`).

    Args:
        cfg: the run's config.
        summary: the adapted backbone (`build_network`).

    Returns:
        The spec saved with the model and used to prepare every split.
    """
    return make_spec(
        cfg.prepare.dims,
        cfg.prepare.preset,
        cfg.prepare.size,
        {"mean": summary.mean, "std": summary.std, "interpolation": summary.interpolation},
        spacing=cfg.prepare.spacing,
        slices=cfg.prepare.slices,
        reduce=cfg.prepare.reduce,
    )


# settings that may differ between an interrupted run and its resumption
RESUMABLE_PARAMS = (
    "finetune.resume",
    "finetune.device",
    "finetune.num_workers",
    "finetune.compile",
    "data.workers",
    "tracking.uri",
    "prepare.cache_dir",
)


def checkpoint_path(manifest_dir: str | Path, run_id: str) -> Path:
    """Where `train` keeps the resumable training state of a run."""
    return Path(manifest_dir) / "checkpoints" / f"{run_id}.pt"


def _first_logged(cfg: Config) -> Config:
    """The config as the run logged it at its start (before any --resume)."""
    fresh = copy.deepcopy(cfg)
    fresh.finetune.resume = None
    return fresh


def _check_resumable(cfg: Config) -> None:
    """Fail fast (before ingest) when `finetune.resume` names a run that cannot be continued."""
    run_id = cfg.finetune.resume or ""
    run = tracking.get_run(run_id)  # TrackingError when unknown
    if run["status"] == "FINISHED":
        raise ConfigError(
            f"finetune.resume: run {run_id} finished; there is nothing to resume. Start a new run "
            f"without --resume, or evaluate it: medxfer evaluate CONFIG --run {run_id}"
        )
    logged = run["params"]
    diffs = [
        f"{k}: {logged[k]!r} then, {v!r} now"
        for k, v in _first_logged(cfg).flat().items()
        if k in logged and k not in RESUMABLE_PARAMS and logged[k] != str(v)[:500]
    ]
    if diffs:
        raise ConfigError(
            f"finetune.resume: the config differs from the one run {run_id} started with:\n  - "
            + "\n  - ".join(diffs)
            + "\nresume with the original config file (only "
            f"{', '.join(RESUMABLE_PARAMS[1:])} may change), or start a new run"
        )


def _train_and_log(
    cfg: Config,
    cohort: Cohort,
    model: MedNet,
    summary: AdaptationSummary,
    spec: PrepareSpec,
    data: dict,
    world: World,
    extra_tags: dict[str, str],
) -> str:
    """Rank 0's part of `train`: open (or reopen) the MLflow run, fit, log the results."""
    fresh = _first_logged(cfg)
    tags = {
        "config_hash": fresh.hash(),
        "manifest_hash": manifest_hash(cohort.manifest_dir),
        "git_commit": tracking.git_commit(),
        "weights_sha256": summary.weights_sha256 or "none",
        "prepare_hash": spec.hash(),
        "stage": "train",
        **extra_tags,
    }
    resume_id = cfg.finetune.resume

    def on_lost(run_id: str) -> str:
        return _resume_hint(cfg, checkpoint_path(cohort.manifest_dir, run_id), run_id)

    start = tracking.start_run(cfg.experiment, run_id=resume_id, tags=None if resume_id else tags, on_lost=on_lost)
    with start as run_id:
        before = tracking.get_run(run_id) if resume_id else {"params": {}, "metrics": {}, "history": {}}
        done_steps = len(before["history"].get("epoch_seconds", []))
        ckpt = checkpoint_path(cohort.manifest_dir, run_id)
        resume = bool(resume_id) and ckpt.exists()
        if resume_id and not resume:  # interrupted before its first checkpoint: train from epoch 0 again
            if done_steps > 1:
                raise ConfigError(
                    f"finetune.resume: run {run_id} logged {done_steps} epochs but its training state "
                    f"{ckpt} is gone; start a new run without --resume"
                )
            log.warning("run %s has no training checkpoint yet: training restarts from epoch 1 in the same run", run_id)
        broadcast((run_id, resume), world)
        params = {
            **fresh.flat(),
            "weights_sha256": summary.weights_sha256 or "none",
            "classes": json.dumps(cohort.classes),
            "n_train": len(data["train"]),
            "n_val": len(data["val"]),
            "n_test": len(data["test"]),
        }
        new_params = {k: v for k, v in params.items() if k not in before["params"]}  # a param is set once
        if new_params:
            tracking.log_params(new_params)
        tracking.log_metrics({f"prevalence_{name}": v for name, v in cohort.prevalence().items()})
        tracking.log_json(fresh.as_dict(), "config.json")
        tracking.log_json(summary.as_dict(), "adaptation_summary.json")
        tracking.log_json(cohort.frame[["image_id", "subject_id", "split", "label"]].to_dict("list"), "splits.json")
        result = _fit(cfg, cohort, model, summary, spec, data, world, run_id, resume, done_steps)
        if result is None:  # only ranks other than 0 skip training (the cached-feature probe)
            raise RuntimeError("rank 0 of train() returned no result")
        if "epochs_run" not in before["metrics"]:
            tracking.log_metrics(
                {
                    "best_epoch": result.best_epoch + 1,  # epochs are numbered from 1 wherever people read them
                    "epochs_run": result.epochs_run,
                    "train_seconds": result.seconds,
                    "stopped_early": float(result.stopped_early),
                }
            )
        if resume_id:
            tracking.set_tags({"resumed_at_epoch": result.resumed_from + 1})  # numbered from 1, like the steps
        tracking.log_json(
            {
                "class_weights": result.class_weights,
                "trainable_by_phase": result.trainable_by_phase,
                "history": result.history,
                "device": result.device,
                "platform": platform.platform(),
                "torch": torch.__version__,
                "world_size": world.size,
            },
            "training_summary.json",
        )
        _log_checkpoint(result.model, fresh, cohort.classes, spec, summary)
    ckpt.unlink(missing_ok=True)  # training is complete and logged: the resumable state is no longer needed
    return run_id


def _resume_hint(cfg: Config, ckpt: Path, run_id: str) -> str:
    """What a lost tracking server leaves behind and the commands that continue the run."""
    config = shlex.quote(cfg.source_file) if cfg.source_file else "CONFIG"
    kept = (
        f"The training state of the last finished epoch is kept at {ckpt}."
        if ckpt.exists()
        else "No epoch had finished, so training starts again from epoch 1 in the same run."
    )
    return (
        f"{kept} Fix: restart the server (or point tracking.uri at it again), then continue: "
        f"medxfer train {config} --resume {run_id}   and evaluate it: medxfer evaluate {config} --run {run_id}"
    )


def _fit(
    cfg: Config,
    cohort: Cohort,
    model: MedNet,
    summary: AdaptationSummary,
    spec: PrepareSpec,
    data: dict,
    world: World,
    run_id: str,
    resume: bool,
    done_steps: int = 0,
) -> TrainResult | None:
    """Train with the configured strategy; rank 0 logs each epoch (steps below `done_steps` are already logged)."""
    ft, n_classes = cfg.finetune, len(cohort.classes)

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        if world.lead and epoch >= done_steps:
            tracking.log_metrics(row, step=epoch + 1)  # epoch numbers from 1: console, MLflow steps, report
            log.info(
                "epoch %3d/%d%s  train loss %.4f  val loss %.4f  val AUROC %.4f  (%.0f img/s)",
                epoch + 1,
                total_epochs,
                _phase_text(row),
                row["train_loss"],
                row["val_loss"],
                row["val_auroc"],
                row["images_per_s"],
            )

    total_epochs = ft.epochs + (ft.lpft_probe_epochs if ft.strategy == "lp-ft" else 0)
    ckpt = checkpoint_path(cohort.manifest_dir, run_id)
    if ft.strategy == "linear-probe" and not cfg.prepare.augment.enabled:  # cached features: rank 0 alone
        if not world.lead:
            return None
        feats = _features(cfg, cohort, model, spec, data)
        if ft.head == "logistic":
            return logistic_head(model, *feats, ft, n_classes, on_epoch)
        return linear_probe(model, *feats, ft, n_classes, on_epoch, checkpoint=ckpt, resume=resume)
    y_train = cohort.y(cohort.split("train"))
    loop_args = (model, layer_groups(model), data["train"], data["val"], y_train, ft, n_classes, on_epoch)
    if ft.strategy == "lp-ft":
        cached = not cfg.prepare.augment.enabled and world.size == 1  # the probe as linear-probe would run it

        def on_phase(phase: str, first_epoch: int) -> None:
            if world.lead:
                log.info("lp-ft phase %s from epoch %d", phase, first_epoch + 1)

        features = _features(cfg, cohort, model, spec, data) if cached else None
        return lp_ft(*loop_args, on_phase, checkpoint=ckpt, resume=resume, features=features)
    return finetune(*loop_args, checkpoint=ckpt, resume=resume)


def _phase_text(row: dict[str, float]) -> str:
    """' (probe)' / ' (fine-tune)' for an lp-ft epoch, else nothing."""
    if "lpft_phase" not in row:
        return ""
    return " (probe)" if row["lpft_phase"] == 0 else " (fine-tune)"


def _features(cfg: Config, cohort: Cohort, model: MedNet, spec: PrepareSpec, data: dict) -> tuple[Features, Features]:
    """(train, val) pooled features of the frozen backbone, from the feature cache or computed once into it."""
    device = pick_device(cfg.finetune.device)
    cache = Path(cfg.prepare.cache_dir or cohort.manifest_dir / "cache") / "features"
    out = []
    for name in ("train", "val"):
        key = feature_cache_key(model.features, spec.hash(), data[name].shas)
        out.append(
            extract_features(
                model.features,
                data[name],
                device,
                cfg.finetune.batch_size,
                cache / f"{key}.pt",
                desc=f"features ({name})",
            )
        )
    return out[0], out[1]


CHECKPOINT_TAG = "checkpoint_sha256"  # run tag: the sha256 of each file of the run's checkpoint package


def _log_checkpoint(
    model: torch.nn.Module, cfg: Config, classes: list[str], spec: PrepareSpec, summary: AdaptationSummary
) -> None:
    """Log the trained network as a package (``checkpoint/``: model.json + weights.safetensors, no pickle).

    The sha256 of both files goes to the run tag `CHECKPOINT_TAG`; evaluation checks the files against
    it before it reads them.
    """
    metadata = {"classes": classes, "prepare": spec.as_dict(), "adaptation": summary.as_dict(), "config": cfg.as_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        sha256 = write_package(Path(tmp) / "checkpoint", model, metadata)
        tracking.log_artifacts(Path(tmp) / "checkpoint", "checkpoint")
    tracking.set_tags({CHECKPOINT_TAG: json.dumps(sha256, sort_keys=True)})
