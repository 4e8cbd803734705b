"""`evaluate`: calibrate on val, measure on test once, log predictions and figures, package and register the model."""

from __future__ import annotations

import logging
import shlex
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import torch

from pipeline import tracking
from pipeline.adapt import CalibratedNet, parse_record, read_package
from pipeline.config import Config
from pipeline.errors import DataError
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
    pick_device,
    predict_logits,
)
from pipeline.io import jsonable
from pipeline.prepare import PreparedDataset, spec_from_dict
from pipeline.records import Cohort, EvaluationSummary
from pipeline.run.cohort import count_test_evaluation, load_cohort, make_datasets
from pipeline.run.packaging import log_packaged
from pipeline.run.training import CHECKPOINT_TAG

if TYPE_CHECKING:
    pass

log = logging.getLogger("medxfer")


def _load_checkpoint(run_id: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The run's trained network, rebuilt from its checkpoint package after checking it against the run's record.

    Returns:
        (the network, the checkpoint's metadata: classes, prepare, adaptation, config).

    Raises:
        DataError: the run has no record of its checkpoint (trained by an earlier medxfer, whose
            pickled checkpoint.pt is not loaded), or a file differs from the record.
    """
    tags = tracking.get_run(run_id)["tags"]
    source = f"tag {CHECKPOINT_TAG} of run {run_id}"
    if CHECKPOINT_TAG not in tags:
        raise DataError(
            f"run {run_id} has no {CHECKPOINT_TAG} tag: it did not finish training, or an earlier medxfer trained "
            "it, whose checkpoint.pt is a pickle that medxfer no longer loads (unpickling runs code). "
            "Fix: train the config again (medxfer train CONFIG) and evaluate the new run"
        )
    record = parse_record(tags[CHECKPOINT_TAG], source)
    with tempfile.TemporaryDirectory(prefix="medxfer-") as tmp:
        folder = tracking.download_artifacts(run_id, "checkpoint", tmp)
        model, description = read_package(folder, record, source, f"artifact checkpoint/ of run {run_id}")
    metadata = description.get("metadata")
    missing = [k for k in ("classes", "prepare", "adaptation") if not isinstance(metadata, dict) or k not in metadata]
    if missing:
        raise DataError(f"{source}: the checkpoint's model.json lacks metadata {missing}; it was not written by train")
    return model, cast(dict[str, Any], metadata)


def evaluate(
    cfg: Config, run_id: str, progress: bool = True, step: Callable[[str], None] | None = None
) -> dict[str, float]:
    """Calibrate on val, measure on test, log metrics, predictions, figures; log and register the model.

    `step` (see `run.demo.stepper`) announces the evaluation on the console; `progress` shows bars
    for the predictions, the bootstrap stages and the training-set statistics packaged with the model.
    """
    tracking.connect(cfg.tracking.uri)
    if step is not None:
        step(
            "evaluating: predicting val and test, calibrating on val, patient-bootstrap CIs on test "
            f"({cfg.evaluate.bootstrap} resamples), then packaging and registering the model"
        )
    cohort = load_cohort(cfg.data.manifest, cfg.data.train_fraction, cfg.finetune.seed)
    model, ckpt = _load_checkpoint(run_id)
    spec = spec_from_dict(ckpt["prepare"])
    data = make_datasets(cfg, cohort, spec, augment=False)
    device = pick_device(cfg.finetune.device)
    logits = {
        name: predict_logits(
            model, data[name], device, cfg.finetune.batch_size, desc=f"predict {name}" if progress else None
        )[0]
        for name in ("val", "test")
    }
    split_id, times = count_test_evaluation(cohort.manifest_dir, cohort.split("test")["image_id"].tolist(), run_id)
    with tracking.start_run(cfg.experiment, run_id=run_id, on_lost=_evaluate_again_hint(cfg)):
        tracking.set_tags({"test_split_id": split_id, "test_evaluations": times})
        return _evaluate_and_log(cfg, cohort, model, ckpt, logits, run_id, data["train"], progress)


def _evaluate_again_hint(cfg: Config) -> Callable[[str], str]:
    config = shlex.quote(cfg.source_file) if cfg.source_file else "CONFIG"
    return lambda run_id: (
        "Training is logged and nothing is lost; this evaluation is incomplete. Fix: restart the server, "
        f"then evaluate again: medxfer evaluate {config} --run {run_id}"
    )


def _predictions(
    frame: pd.DataFrame, y: np.ndarray, probs: np.ndarray, classes: list[str], raw: np.ndarray | None = None
) -> pd.DataFrame:
    """predictions/<split>.parquet: image_id, subject_id, y_true and the calibrated probabilities.

    Binary: `prob` = calibrated P(class 1), and with `raw` (the uncalibrated softmax) also
    `prob_uncalibrated`, the scores the logged test AUROC ranks (`medxfer compare` uses them).
    """
    out = pd.DataFrame({"image_id": frame["image_id"], "subject_id": frame["subject_id"], "y_true": y})
    if probs.shape[1] == 2:
        out["prob"] = probs[:, 1]
        if raw is not None:
            out["prob_uncalibrated"] = raw[:, 1]
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
    progress: bool = False,
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
        groups_val=val["subject_id"].to_numpy(),
        progress=progress,
    )
    metrics = dict(s.metrics)
    if "val_auroc" in metrics:  # the per-epoch history owns `val_auroc`; this is the evaluated (best-epoch) model's
        metrics["val_auroc_evaluated_model"] = metrics.pop("val_auroc")
    tracking.log_metrics(metrics)
    if s.calibration is not None:
        tracking.set_tags({"calibration_method": s.calibration.method})
    with tempfile.TemporaryDirectory() as tmp:
        for name, frame, probs, raw in (
            ("val", val, s.probs_val, None),
            ("test", test, s.probs_test, s.probs_test_uncalibrated),
        ):
            path = Path(tmp) / f"{name}.parquet"
            _predictions(frame, cohort.y(frame), probs, cohort.classes, raw).to_parquet(path, index=False)
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
                "calibration": asdict(s.calibration) if s.calibration is not None else None,
            }
        ),
        "evaluation.json",
    )
    op = s.operating_points[0] if s.operating_points else {}
    calibration = s.calibrator.params()
    meta = {
        "prepare": ckpt["prepare"],
        "classes": cohort.classes,
        "temperature": s.temperature or 1.0,
        "calibration": calibration,
        "operating_point": {"rule": op.get("rule"), "threshold": op.get("threshold")},
        "adaptation": ckpt["adaptation"],
        "train_run_id": run_id,
    }
    prevalence = cohort.prevalence()  # binary: the train split's positive share, π of `score --prevalence`
    if "train" in prevalence:
        meta["prevalence_train"] = prevalence["train"]
    packaged = CalibratedNet(model, calibration)  # the evaluated calibration, whatever it is
    meta["modalities"] = sorted(set(cohort.split("train")["modality"].astype(str)) - {""})
    if train_data is not None:  # intensity and embedding statistics for score's domain-shift check
        stats = reference_stats(
            packaged,
            train_data,
            batch_size=cfg.finetune.batch_size,
            desc="training-set statistics" if progress else None,
        )
        meta["reference_stats"] = jsonable(stats)
    example = data_example(ckpt["prepare"])
    log.info("packaging the model with its calibration and threshold; registering it as %s", cfg.tracking.register_as)
    info = log_packaged(packaged, example, meta, cfg.tracking.register_as)
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


def _confusion(s: EvaluationSummary, classes: list[str]) -> Any:
    """The confusion figure at the deployed operating point (binary with rules), else at the arg-max."""
    deployed = s.discrimination.get("deployed")
    if deployed:
        title = f"Confusion matrix at the {deployed['rule']} threshold {deployed['threshold']:.3f}"
        return confusion_figure(deployed["confusion_matrix"], classes, title)
    return confusion_figure(s.discrimination["confusion_matrix"], classes, "Confusion matrix (arg-max)")


def _log_figures(s: EvaluationSummary, cohort: Cohort, y_test: np.ndarray, run_id: str) -> None:
    probs = s.probs_test
    rel = s.reliability
    figures = {
        "reliability.png": reliability_figure(rel["probs_before"], rel["probs_after"], rel["y"], rel["n_bins"]),
        "confusion.png": _confusion(s, cohort.classes),
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
