"""The evaluation summary: calibrate on validation, then every test number an auditor needs, at once."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.evaluate.calibrate import check_logits, make_calibrator, softmax
from pipeline.evaluate.metrics import (
    N_BINS,
    at_threshold,
    brier,
    brier_sum_over_classes,
    calibration_slope_intercept,
    choose_operating_point,
    classwise_ece,
    discrimination,
    ece,
    mce,
    nll,
    parse_rule,
    reliability_bins,
    scaled_brier,
)
from pipeline.evaluate.uncertainty import bootstrap_ci, subgroup_metrics
from pipeline.records import EvaluationSummary
from pipeline.stats import auroc, check_labels


# --------------------------------------------------------------------------- summary
def metric_key(*parts: str) -> str:
    """Join parts with "__" into an MLflow-safe metric name (only letters, digits, _ . - kept).

    MLflow rejects '=' and '@', so subgroup keys read `test_auroc__sex.F` and operating-point
    keys `test_sensitivity__sensitivity_at_0.90`.
    """
    joined = "__".join(p.replace("@", "_at_") for p in parts)
    return re.sub(r"[^\w.\-]", "_", joined)


def _flat(prefix: str, values: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    return {f"{prefix}{k}": float(values[k]) for k in keys if values.get(k) is not None}


def _calibration_metrics(y: np.ndarray, probs: np.ndarray, raw: np.ndarray, n_bins: int) -> dict:
    out = {
        "test_ece": ece(probs, y, n_bins),
        "test_ece_uncalibrated": ece(raw, y, n_bins),
        "test_mce": mce(probs, y, n_bins),
        "test_classwise_ece": classwise_ece(probs, y, n_bins),
        "test_brier": brier(probs, y),
        "test_brier_uncalibrated": brier(raw, y),
        "test_brier_sum_over_classes": brier_sum_over_classes(probs, y),
        "test_nll": nll(probs, y),
        "test_nll_uncalibrated": nll(raw, y),
        "ece_n_bins": n_bins,
    }
    if probs.shape[1] == 2 and y.min() != y.max():
        scaled = scaled_brier(probs, y)
        if scaled is not None:
            out["test_brier_scaled"] = scaled
        slope, intercept = calibration_slope_intercept(probs[:, 1], y)
        out.update(test_calibration_slope=slope, test_calibration_intercept=intercept)
    return out


def _operating_points(
    yv: np.ndarray, pv: np.ndarray, yt: np.ndarray, pt: np.ndarray, rules: tuple[str, ...] | list[str]
) -> tuple[list[dict], dict[str, float]]:
    ops: list[dict[str, Any]] = []
    flat: dict[str, float] = {}
    for k, rule in enumerate(rules):
        thr = choose_operating_point(yv, pv[:, 1], rule)
        op: dict[str, Any] = {
            "rule": rule,
            "threshold": thr,
            "val": at_threshold(yv, pv[:, 1], thr),
            "test": at_threshold(yt, pt[:, 1], thr),
        }
        ops.append(op)
        names = ("sensitivity", "specificity", "ppv", "npv")
        if k == 0:
            flat.update(_flat("test_", op["test"], names), threshold=thr)
        flat.update({metric_key(key, rule): v for key, v in _flat("test_", op["test"], names).items()})
        flat[metric_key("threshold", rule)] = thr
    return ops, flat


RANKING_KEYS = ("auroc", "auprc", "auroc_per_class", "auprc_per_class")
FLAT_SPREAD = 0.02  # calibrated probabilities with a spread below this (and < 10 % of the raw one) are flat


def _ranking(disc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: disc[k] for k in RANKING_KEYS if k in disc}


def _spread(probs: np.ndarray) -> float:
    """Mean over classes of the SD over rows: how much the probabilities differ between images."""
    return float(probs.std(axis=0).mean())


def _calibration_warnings(
    val_auroc: float | None, raw: np.ndarray, calibrated: np.ndarray, metrics: dict[str, float]
) -> list[str]:
    """Notes (and 0/1 MLflow flags) when validation carries no ranking signal or calibration flattens the output.

    `val_signal_absent`: the uncalibrated validation AUROC is undefined or ≤ 0.5, so a calibration
    fitted there is fitted to noise. `calibration_flattened`: the calibrated test probabilities
    spread less than `FLAT_SPREAD` and less than a tenth of the uncalibrated ones (a temperature
    at its bound does this); ranking metrics are unaffected, they use the uncalibrated scores.
    """
    notes = []
    absent = val_auroc is None or val_auroc <= 0.5
    metrics["val_signal_absent"] = float(absent)
    if absent:
        shown = "undefined" if val_auroc is None else f"{val_auroc:.3f}"
        notes.append(
            f"validation AUROC is {shown}: the validation split carries no ranking signal for this model, so the "
            "calibration, the early stopping and the operating points chosen on it are unreliable"
        )
    before, after = _spread(raw), _spread(calibrated)
    flat = after < FLAT_SPREAD and after < 0.1 * before
    metrics["calibration_flattened"] = float(flat)
    if flat:
        notes.append(
            f"calibration flattened the output: test probabilities spread {after:.4f} after vs {before:.4f} before "
            "(mean SD over images); discrimination metrics use the uncalibrated scores, but the calibrated "
            "probabilities and decisions carry almost no information"
        )
    return notes


def evaluation_summary(
    y_val: Any,
    logits_val: Any,
    y_test: Any,
    logits_test: Any,
    groups_test: Any,
    *,
    operating_points: tuple[str, ...] | list[str] = ("youden",),
    n_boot: int = 1000,
    seed: int = 0,
    subgroups: Mapping[str, Any] | None = None,
    calibration: str = "temperature",
    n_bins: int = N_BINS,
) -> EvaluationSummary:
    """Calibrate on validation, evaluate on test: the numbers an auditor needs, in one record.

    The calibrator is fitted on (logits_val, y_val) only; operating points are chosen on the
    calibrated validation probabilities and frozen for test; CIs resample test patients. Ranking
    metrics (AUROC, AUPRC, val AUROC, subgroup AUROCs) use the uncalibrated softmax, which a
    calibration map cannot tie or flatten; calibration and decision metrics use the calibrated
    probabilities. Notes warn when validation has no ranking signal or calibration flattens the output.
    Multi-class tasks get macro AUROC and no operating points (the rules are still validated).

    Returns:
        `records.EvaluationSummary`: flat MLflow metrics, the temperature (None unless
        calibration="temperature"), the fitted calibrator, operating points, subgroups, the
        val/test probabilities, reliability tables and notes.
    """
    zv, zt = check_logits(logits_val, "logits_val"), check_logits(logits_test, "logits_test")
    if zv.shape[1] != zt.shape[1]:
        raise DataError(f"logits_test: {zt.shape[1]} classes but logits_val has {zv.shape[1]}.")
    yv = check_labels(y_val, len(zv), zv.shape[1], "y_val")
    yt = check_labels(y_test, len(zt), zt.shape[1], "y_test")
    rules = list(operating_points)
    for rule in rules:
        parse_rule(rule)  # a typo fails before any work, binary or not
    calibrator = make_calibrator(calibration).fit(zv, yv)
    pv, pt, raw = calibrator.transform(zv), calibrator.transform(zt), softmax(zt)
    # ranking metrics from the uncalibrated scores (a calibration map may tie or flatten them);
    # decision metrics (accuracy, F1, confusion) from the calibrated probabilities the decisions use
    disc = {**discrimination(yt, pt), **_ranking(discrimination(yt, raw))}
    point, low, high = bootstrap_ci(auroc, yt, raw, groups_test, n_boot=n_boot, seed=seed)
    metrics = {
        "test_auroc": point,
        "test_auroc_ci_low": low,
        "test_auroc_ci_high": high,
        **_flat("test_", disc, ("auprc", "accuracy", "balanced_accuracy", "f1")),
        **_calibration_metrics(yt, pt, raw, n_bins),
        "test_n_images": float(len(yt)),
        "test_n_patients": float(len(np.unique(np.asarray(groups_test).astype(str)))),
    }
    val_auroc = auroc(yv, softmax(zv))
    if val_auroc is not None:
        metrics["val_auroc"] = val_auroc
    temperature = getattr(calibrator, "temperature_", None)
    if temperature is not None:
        metrics["temperature"] = float(temperature)
    ops: list[dict] = []
    notes = _calibration_warnings(val_auroc, raw, pt, metrics)
    if zv.shape[1] == 2:
        ops, flat = _operating_points(yv, pv, yt, pt, rules)
        metrics.update(flat)
    elif rules:
        notes.append(f"operating points {rules} skipped: defined for binary tasks only")
    threshold = ops[0]["threshold"] if ops else None
    groups_rows = subgroup_metrics(
        yt, pt, groups_test, subgroups or {}, threshold, n_boot=n_boot, seed=seed, scores=raw
    )
    metrics.update(
        {
            metric_key("test_auroc", f"{r['attribute']}.{r['value']}"): r["auroc"]
            for r in groups_rows
            if not r["too_few"] and r["auroc"] is not None
        }
    )
    reliability = {
        "n_bins": n_bins,
        "y": yt,
        "probs_before": raw,
        "probs_after": pt,
        "before": reliability_bins(raw, yt, n_bins),
        "after": reliability_bins(pt, yt, n_bins),
    }
    return EvaluationSummary(
        metrics={k: float(v) for k, v in metrics.items()},
        temperature=temperature,
        operating_points=ops,
        subgroups=groups_rows,
        calibrator=calibrator,
        probs_val=pv,
        probs_test=pt,
        probs_test_uncalibrated=raw,
        reliability=reliability,
        discrimination=disc,
        notes=notes,
    )
