"""Composes the stages for `train`, `evaluate`, `run` and `demo`: the one place they meet."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import platform
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from pipeline import tracking
from pipeline.adapt import MedNet, build_model, layer_groups, resolve_weights
from pipeline.config import Config, save_config
from pipeline.errors import ConfigError, DataError
from pipeline.evaluate import (
    confusion_figure,
    evaluation_summary,
    pr_figure,
    reference_stats,
    reliability_figure,
    roc_figure,
    training_curves_figure,
)
from pipeline.finetune import (
    World,
    check_options,
    extract_features,
    feature_cache_key,
    finetune,
    init_distributed,
    linear_probe,
    logistic_head,
    pick_device,
    predict_logits,
    shutdown,
)
from pipeline.finetune.distributed import barrier, broadcast
from pipeline.ingest import ingest, load_manifest
from pipeline.io import jsonable
from pipeline.prepare import PreparedDataset, build_augment, make_spec, spec_from_dict
from pipeline.records import AdaptationSummary, Cohort, EvaluationSummary, PrepareSpec, TrainResult

if TYPE_CHECKING:
    from pipeline.synthetic import SyntheticCohort

log = logging.getLogger("medxfer")


def _sorted_classes(labels: pd.Series) -> list[str]:
    values = sorted(set(labels))
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def load_cohort(manifest_dir: str | Path) -> Cohort:
    """Labelled rows of a manifest; every split must hold both classes."""
    frame = load_manifest(manifest_dir)
    frame = frame[frame["label"].astype(str) != ""].reset_index(drop=True)
    if frame.empty:
        raise DataError(f"{manifest_dir}/manifest.parquet has no labelled images; check labels.csv patient_id values")
    classes = _sorted_classes(frame["label"].astype(str))
    frame["label"] = frame["label"].astype(str)
    for split in ("train", "val"):
        present = set(frame.loc[frame["split"] == split, "label"])
        if len(present) < 2:
            raise DataError(
                f"split '{split}' of {manifest_dir} holds classes {sorted(present)}; training needs at "
                "least two classes there: add patients or change data.split"
            )
    return Cohort(Path(manifest_dir), frame, classes)


def manifest_hash(manifest_dir: str | Path) -> str:
    return hashlib.sha256((Path(manifest_dir) / "manifest.parquet").read_bytes()).hexdigest()[:16]


def ensure_manifest(cfg: Config, progress: bool = True) -> Path:
    """Ingest `data.source` into `data.manifest` (incremental; unchanged files are reused)."""
    out = Path(cfg.data.manifest)
    if cfg.data.source:
        split = cfg.data.split
        ingest(
            cfg.data.source,
            cfg.data.labels or None,
            out,
            key_file=cfg.data.key_file,
            val=split.val,
            test=split.test,
            seed=split.seed,
            workers=cfg.data.workers,
            progress=progress,
        )
    elif not (out / "manifest.parquet").exists():
        raise ConfigError(
            f"data.manifest {out} holds no manifest.parquet and data.source is empty; "
            "set data.source to the archive or run `medxfer ingest` first"
        )
    return out


def _datasets(cfg: Config, cohort: Cohort, spec: PrepareSpec, augment: bool) -> dict[str, PreparedDataset]:
    cache = cfg.prepare.cache_dir or str(cohort.manifest_dir / "cache")
    out = {}
    for name in ("train", "val", "test"):
        rows = cohort.split(name)
        aug = None
        if augment and name == "train" and cfg.prepare.augment.enabled:
            a = cfg.prepare.augment
            aug = build_augment(
                cfg.prepare.dims,
                flip=a.flip,
                rotate_deg=a.rotate_deg,
                scale=a.scale,
                intensity=a.intensity,
                seed=cfg.finetune.seed,
            )
        paths = [str(cohort.manifest_dir / p) for p in rows["image_path"]]
        out[name] = PreparedDataset(paths, rows["content_sha256"].tolist(), cohort.y(rows).tolist(), spec, cache, aug)
    return out


def _build(cfg: Config, n_classes: int, weights: str | None = None) -> tuple[MedNet, AdaptationSummary]:
    m = cfg.model
    in_channels = cfg.prepare.slices if cfg.prepare.dims == "2.5d" and not m.slicewise else m.in_channels
    return build_model(
        m.backbone,
        weights or m.weights,
        num_classes=n_classes,
        in_channels=in_channels,
        dims="2d" if cfg.prepare.dims == "2.5d" and not m.slicewise else cfg.prepare.dims,
        inflation=m.inflation,
        depth_padding=m.depth_padding,
        weights_dir=m.weights_dir,
        slicewise=m.slicewise,
        pool=m.pool,
        keep_depth=m.keep_depth,
    )


def train(cfg: Config, progress: bool = True) -> str:
    """prepare + adapt + finetune; logs everything to MLflow and returns the run id.

    ``cfg.finetune.resume = RUN_ID`` (CLI ``train --resume RUN_ID``) continues an interrupted run:
    the same MLflow run, the training state from ``<manifest>/checkpoints/<run id>.pt`` (written
    after every epoch, removed when training ends), and a metric history that goes on without
    repeating a step. Under ``torchrun --nproc-per-node N`` each process trains its shard of every
    global batch (DDP); rank 0 alone ingests, logs to MLflow and writes files; all return the run id.

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
    manifest_dir = ensure_manifest(cfg, progress) if world.lead else Path(cfg.data.manifest)
    barrier(world)
    cohort = load_cohort(manifest_dir)
    torch.manual_seed(cfg.finetune.seed)  # the new head (and a from-scratch backbone) start from the seed
    model, summary = _build(cfg, len(cohort.classes))
    spec = make_spec(
        cfg.prepare.dims,
        cfg.prepare.preset,
        cfg.prepare.size,
        {"mean": summary.mean, "std": summary.std, "interpolation": "bicubic"},
        spacing=cfg.prepare.spacing,
        slices=cfg.prepare.slices,
        reduce=cfg.prepare.reduce,
    )
    data = _datasets(cfg, cohort, spec, augment=True)
    if world.lead:
        run_id = _train_and_log(cfg, cohort, model, summary, spec, data, world)
    else:
        run_id, resume = broadcast(None, world)
        _fit(cfg, cohort, model, summary, spec, data, world, run_id, resume)
    barrier(world)
    shutdown(world)
    return run_id


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
    cfg: Config, cohort: Cohort, model: MedNet, summary: AdaptationSummary, spec: PrepareSpec, data: dict, world: World
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
    }
    resume_id = cfg.finetune.resume
    with tracking.start_run(cfg.experiment, run_id=resume_id, tags=None if resume_id else tags) as run_id:
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
            log.warning("run %s has no training checkpoint yet: training restarts from epoch 0 in the same run", run_id)
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
        tracking.log_json(fresh.as_dict(), "config.json")
        tracking.log_json(summary.as_dict(), "adaptation_summary.json")
        tracking.log_json(cohort.frame[["image_id", "subject_id", "split", "label"]].to_dict("list"), "splits.json")
        result = _fit(cfg, cohort, model, summary, spec, data, world, run_id, resume, done_steps)
        if result is None:  # only ranks other than 0 skip training (the cached-feature probe)
            raise RuntimeError("rank 0 of train() returned no result")
        if "epochs_run" not in before["metrics"]:
            tracking.log_metrics(
                {
                    "best_epoch": result.best_epoch,
                    "epochs_run": result.epochs_run,
                    "train_seconds": result.seconds,
                    "stopped_early": float(result.stopped_early),
                }
            )
        if resume_id:
            tracking.set_tags({"resumed_at_epoch": result.resumed_from})
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
            tracking.log_metrics(row, step=epoch)
            log.info(
                "epoch %3d  train loss %.4f  val loss %.4f  val AUROC %.4f  (%.0f img/s)",
                epoch,
                row["train_loss"],
                row["val_loss"],
                row["val_auroc"],
                row["images_per_s"],
            )

    ckpt = checkpoint_path(cohort.manifest_dir, run_id)
    if ft.strategy == "linear-probe" and not cfg.prepare.augment.enabled:  # cached features: rank 0 alone
        if not world.lead:
            return None
        device = pick_device(ft.device)
        cache = Path(cfg.prepare.cache_dir or cohort.manifest_dir / "cache") / "features"
        feats = {}
        for name in ("train", "val"):
            key = feature_cache_key(model.features, spec.hash(), data[name].shas)
            feats[name] = extract_features(
                model.features, data[name], device, ft.batch_size, cache / f"{key}.pt", desc=f"features ({name})"
            )
        if ft.head == "logistic":
            return logistic_head(model, feats["train"], feats["val"], ft, n_classes, on_epoch)
        return linear_probe(
            model, feats["train"], feats["val"], ft, n_classes, on_epoch, checkpoint=ckpt, resume=resume
        )
    return finetune(
        model,
        layer_groups(model),
        data["train"],
        data["val"],
        cohort.y(cohort.split("train")),
        ft,
        n_classes,
        on_epoch,
        checkpoint=ckpt,
        resume=resume,
    )


def _log_checkpoint(
    model: torch.nn.Module, cfg: Config, classes: list[str], spec: PrepareSpec, summary: AdaptationSummary
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        torch.save(
            {
                "state_dict": model.state_dict(),
                "classes": classes,
                "prepare": spec.as_dict(),
                "adaptation": summary.as_dict(),
                "config": cfg.as_dict(),
            },
            path,
        )
        tracking.log_artifact(path, "checkpoint")


def _load_checkpoint(cfg: Config, run_id: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="medxfer-") as tmp:
        path = tracking.download_artifacts(run_id, "checkpoint/checkpoint.pt", tmp)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model, _ = _build(cfg, len(ckpt["classes"]), weights="none")
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt


def evaluate(cfg: Config, run_id: str, progress: bool = True) -> dict[str, float]:
    """Calibrate on val, measure on test, log metrics, predictions, figures; log and register the model."""
    tracking.connect(cfg.tracking.uri)
    cohort = load_cohort(cfg.data.manifest)
    model, ckpt = _load_checkpoint(cfg, run_id)
    spec = spec_from_dict(ckpt["prepare"])
    data = _datasets(cfg, cohort, spec, augment=False)
    device = pick_device(cfg.finetune.device)
    logits = {
        name: predict_logits(
            model, data[name], device, cfg.finetune.batch_size, desc=f"predict {name}" if progress else None
        )[0]
        for name in ("val", "test")
    }
    with tracking.start_run(cfg.experiment, run_id=run_id):
        return _evaluate_and_log(cfg, cohort, model, ckpt, logits, run_id, data["train"])


def _predictions(frame: pd.DataFrame, y: np.ndarray, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    out = pd.DataFrame({"image_id": frame["image_id"], "subject_id": frame["subject_id"], "y_true": y})
    if probs.shape[1] == 2:
        out["prob"] = probs[:, 1]
    else:
        for i, c in enumerate(classes):
            out[f"prob_{c}"] = probs[:, i]
    return out


def _evaluate_and_log(
    cfg: Config,
    cohort: Cohort,
    model: torch.nn.Module,
    ckpt: dict[str, Any],
    logits: dict[str, np.ndarray],
    run_id: str,
    train_data: PreparedDataset | None = None,
) -> dict[str, float]:
    val, test = cohort.split("val"), cohort.split("test")
    attrs = {a: test[a].astype(str).to_numpy() for a in cfg.evaluate.subgroups if a in test.columns}
    s = evaluation_summary(
        cohort.y(val),
        logits["val"],
        cohort.y(test),
        logits["test"],
        test["subject_id"].to_numpy(),
        operating_points=cfg.evaluate.operating_points,
        n_boot=cfg.evaluate.bootstrap,
        seed=cfg.finetune.seed,
        subgroups=attrs,
        calibration=cfg.evaluate.calibration,
    )
    metrics = dict(s.metrics)
    if "val_auroc" in metrics:  # the per-epoch history owns `val_auroc`; this is the calibrated final value
        metrics["val_auroc_final"] = metrics.pop("val_auroc")
    tracking.log_metrics(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        for name, frame, probs in (("val", val, s.probs_val), ("test", test, s.probs_test)):
            path = Path(tmp) / f"{name}.parquet"
            _predictions(frame, cohort.y(frame), probs, cohort.classes).to_parquet(path, index=False)
            tracking.log_artifact(path, "predictions")
    _log_figures(s, cohort, cohort.y(test), run_id)
    tracking.log_json(
        jsonable(
            {
                "operating_points": s.operating_points,
                "subgroups": s.subgroups,
                "notes": s.notes,
                "classes": cohort.classes,
                "discrimination": s.discrimination,
                "reliability": {k: s.reliability[k] for k in ("n_bins", "before", "after")},
            }
        ),
        "evaluation.json",
    )
    op = s.operating_points[0] if s.operating_points else {}
    meta = {
        "prepare": ckpt["prepare"],
        "classes": cohort.classes,
        "temperature": s.temperature or 1.0,
        "operating_point": {"rule": op.get("rule"), "threshold": op.get("threshold")},
        "adaptation": ckpt["adaptation"],
        "train_run_id": run_id,
    }
    packaged = tracking.CalibratedNet(model, s.temperature or 1.0)
    meta["modalities"] = sorted(set(cohort.split("train")["modality"].astype(str)) - {""})
    if train_data is not None:  # intensity and embedding statistics for score's domain-shift check
        meta["reference_stats"] = jsonable(reference_stats(packaged, train_data, batch_size=cfg.finetune.batch_size))
    example = data_example(ckpt["prepare"])
    info = tracking.log_model(packaged, example, meta, cfg.tracking.register_as)
    tracking.set_tags(
        {
            "stage": "evaluated",
            "model_uri": info["model_uri"],
            "registered_model": f"{info['registered_name']}/{info['version']}" if info["version"] else "",
        }
    )
    return metrics


def data_example(prepare: dict[str, Any]) -> np.ndarray:
    """A one-item input example of the prepared shape (for the model signature)."""
    spec = spec_from_dict(prepare)
    shape = (1, spec.channels, *spec.size)
    return np.zeros(shape, dtype=np.float32)


def _log_figures(s: EvaluationSummary, cohort: Cohort, y_test: np.ndarray, run_id: str) -> None:
    probs = s.probs_test
    rel = s.reliability
    figures = {
        "reliability.png": reliability_figure(rel["probs_before"], rel["probs_after"], rel["y"], rel["n_bins"]),
        "confusion.png": confusion_figure(s.discrimination["confusion_matrix"], cohort.classes),
    }
    if probs.shape[1] == 2:
        figures["roc.png"] = roc_figure(y_test, probs[:, 1], s.operating_points)
        figures["pr.png"] = pr_figure(y_test, probs[:, 1])
    history = tracking.get_run(run_id)["history"]
    curves = {k: history[k] for k in ("train_loss", "val_loss", "val_auroc") if k in history}
    if curves:
        figures["training_curves.png"] = training_curves_figure(curves)
    for name, fig in figures.items():
        tracking.log_figure(fig, f"figures/{name}")


def run(cfg: Config, report: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """ingest → train → evaluate → report, for one config. Returns run id, metrics and report path."""
    from pipeline.report import write_report

    tracking.connect(cfg.tracking.uri)  # fail fast, before any work
    run_id = train(cfg, progress)
    metrics = evaluate(cfg, run_id, progress)
    out = Path(report or Path("reports") / f"{cfg.experiment}.html")
    write_report(run_id, out, tracking_uri=cfg.tracking.uri, manifest_dir=cfg.data.manifest)
    with tracking.start_run(cfg.experiment, run_id=run_id):
        tracking.log_artifact(out, "report")
    return {"run_id": run_id, "metrics": metrics, "report": str(out)}


DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "cxr-demo.yaml"


def demo_config(root: Path, cohort: SyntheticCohort) -> Config:
    """The demo experiment (configs/cxr-demo.yaml) pointed at a generated cohort under `root`."""
    from pipeline.config import load_config

    cfg = load_config(DEMO_CONFIG)
    cfg.data.source, cfg.data.labels = str(cohort.archive_dir), str(cohort.labels_csv)
    cfg.data.manifest, cfg.data.key_file = str(root / "manifest"), str(root / "keys" / "pseudonym.key")
    cfg.tracking.uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    cfg.prepare.cache_dir = str(root / "cache")
    return cfg


def demo(out: str | Path = "medxfer-demo", n: int = 240, seed: int = 0) -> dict[str, Any]:
    """Generate a synthetic chest X-ray cohort under `out` and run the whole pipeline on it."""
    from pipeline.synthetic import make_cohort

    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log.info("1/5 generating a synthetic chest X-ray cohort of %d patients in %s", n, root / "cohort")
    cohort = make_cohort(root / "cohort", kind="cxr2d", n=n, seed=seed, progress=True)
    cfg = demo_config(root, cohort)
    save_config(cfg, root / "config.yaml")
    result = run(cfg, report=root / "report.html")
    m = result["metrics"]
    print(
        f"\nmedxfer demo finished: test AUROC {m['test_auroc']:.3f} "
        f"(95% CI {m.get('test_auroc_ci_low', float('nan')):.3f}–{m.get('test_auroc_ci_high', float('nan')):.3f}), "
        f"ECE {m['test_ece']:.3f} after temperature scaling (T = {m.get('temperature', 1.0):.2f}; "
        f"{m['test_ece_uncalibrated']:.3f} before)"
    )
    print(f"  report:       {result['report']}")
    print(f"  MLflow store: {cfg.tracking.uri}  (run {result['run_id']})")
    print(f"  open the UI:  mlflow ui --backend-store-uri {cfg.tracking.uri}")
    print(f"  config:       {root / 'config.yaml'}  (re-run with: medxfer run {root / 'config.yaml'})")
    return result
