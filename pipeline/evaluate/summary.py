"""The evaluation summary: calibrate on validation, then every test number an auditor needs, at once."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from rich.progress import Progress

from pipeline.errors import DataError
from pipeline.evaluate.calibrate import check_logits, choose_calibration, softmax
from pipeline.evaluate.metrics import (
    N_BINS,
    at_threshold,
    brier,
    brier_sum_over_classes,
    choose_operating_point,
    classwise_ece,
    discrimination,
    mce,
    nll,
    parse_rule,
    reliability_bins,
    scaled_brier,
)
from pipeline.evaluate.uncertainty import RATES, bootstrap_ci, calibration_cis, subgroup_metrics, threshold_cis
from pipeline.records import EvaluationSummary
from pipeline.stats import auroc, check_labels

MISSED_TARGET = "misses the target"  # the phrase of a missed-target note
ECE_WORSE = "calibration made test ECE worse"
NO_SIGNAL = "carries no ranking signal"
FLATTENED = "calibration flattened the output"
UNDERSIZED = "may overfit"
CONFOUNDED = "are confounded on test"  # two subgroup attributes that split the test images identically
# a note holding one of these phrases is a warning (the report shows it so); other notes are information
WARNING_PHRASES = (MISSED_TARGET, ECE_WORSE, NO_SIGNAL, FLATTENED, UNDERSIZED)


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


def _calibration_metrics(
    y: np.ndarray, probs: np.ndarray, raw: np.ndarray, groups: Any, n_bins: int, n_boot: int, seed: int
) -> tuple[dict[str, float], list[str]]:
    """Test calibration before (`raw`) and after (`probs`) calibration, with the panel's patient-bootstrap CIs.

    Flat names: `test_ece` (after), `test_ece_uncalibrated`, `test_ece_change` (after − before),
    each with `_ci_low`/`_ci_high`; `test_calibration_slope` / `_intercept` (after) and their
    `_uncalibrated` counterparts with CIs (binary tasks); Brier (one column, 0–1 scale for binary),
    scaled Brier, the two-class sum under its own name, NLL, MCE and class-wise ECE.
    `calibration_worsened_ece` is 1 when the CI of the ECE change lies wholly above 0, and only
    then is a note returned; a worse point estimate inside sampling error is not a finding.
    """
    out = {
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
    names = {
        ("ece", "after"): "test_ece",
        ("ece", "before"): "test_ece_uncalibrated",
        ("ece", "diff"): "test_ece_change",
        ("slope", "after"): "test_calibration_slope",
        ("slope", "before"): "test_calibration_slope_uncalibrated",
        ("intercept", "after"): "test_calibration_intercept",
        ("intercept", "before"): "test_calibration_intercept_uncalibrated",
    }
    panel = calibration_cis(y, raw, probs, groups, n_boot=n_boot, seed=seed, n_bins=n_bins)
    for (stat, part), name in names.items():
        entry = panel.get(stat, {}).get(part)
        if entry is None:
            continue
        out[name] = entry["value"]
        if entry["ci"] is not None:
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = entry["ci"]
    notes = []
    change_ci = panel["ece"]["diff"]["ci"]
    worse = change_ci is not None and change_ci[0] > 0
    out["calibration_worsened_ece"] = float(worse)
    if worse:
        notes.append(
            f"{ECE_WORSE}: {out['test_ece_uncalibrated']:.3f} → {out['test_ece']:.3f} "
            f"(change {out['test_ece_change']:+.3f}, 95% CI {change_ci[0]:+.3f} to {change_ci[1]:+.3f}, "
            "patient bootstrap); the calibration fitted on validation does not carry over to test"
        )
    return out, notes


def _operating_points(
    yv: np.ndarray,
    pv: np.ndarray,
    yt: np.ndarray,
    pt: np.ndarray,
    groups_test: Any,
    rules: tuple[str, ...] | list[str],
    n_boot: int,
    seed: int,
) -> tuple[list[dict], dict[str, float], list[str]]:
    """Choose each rule's threshold on validation, freeze it, and evaluate it on test with patient-bootstrap CIs.

    Each op's "test" dict gains `<rate>_ci` = [low, high] (or None) for sensitivity, specificity,
    PPV and NPV (`threshold_cis`, the AUROC CI's resamples). A rule with a target
    (sensitivity@T, specificity@T) whose test 95% CI lies wholly below T gets a "misses the target"
    note and `target_missed__<rule>` = 1.0 (else 0.0; no flag without a CI). A point estimate below
    T whose CI still reaches T is within sampling error of the target: no note, flag 0.0. Rules
    that chose exactly the same threshold get one note naming them.

    Returns:
        (ops, flat MLflow metrics, notes).
    """
    ops: list[dict[str, Any]] = []
    flat: dict[str, float] = {}
    notes: list[str] = []
    for k, rule in enumerate(rules):
        thr = choose_operating_point(yv, pv[:, 1], rule)
        test = at_threshold(yt, pt[:, 1], thr)
        cis = threshold_cis(yt, pt[:, 1], groups_test, thr, n_boot=n_boot, seed=seed)
        test.update({f"{name}_ci": cis[name] for name in RATES})
        op: dict[str, Any] = {"rule": rule, "threshold": thr, "val": at_threshold(yv, pv[:, 1], thr), "test": test}
        ops.append(op)
        rates = _flat("test_", test, RATES)
        if k == 0:
            flat.update(rates, threshold=thr)
        flat.update({metric_key(key, rule): v for key, v in rates.items()})
        for name in RATES:
            for end, v in zip(("_ci_low", "_ci_high"), cis[name] or (), strict=False):
                if k == 0:
                    flat[f"test_{name}{end}"] = v
                flat[metric_key(f"test_{name}", rule) + end] = v
        flat[metric_key("threshold", rule)] = thr
        kind, target = parse_rule(rule)
        if target is not None and cis[kind] is not None:
            low, high = cis[kind]  # type: ignore[misc]
            missed = high < target
            flat[metric_key("target_missed", rule)] = float(missed)
            if missed:
                notes.append(
                    f"{rule}: test {kind} {test[kind]:.2f} (95% CI {low:.2f}–{high:.2f}) {MISSED_TARGET} "
                    f"{target:.2f} met on validation (threshold {thr:.3f}, frozen)"
                )
    notes += _shared_thresholds(ops)
    return ops, flat, notes


def _confounded(attrs: Mapping[str, Any]) -> list[str]:
    """One note per pair of subgroup attributes whose values map one-to-one on test (every site has one
    manufacturer and vice versa): their subgroup rows are the same images, not independent findings."""
    values = {name: np.array(["missing" if v is None else str(v) for v in attrs[name]]) for name in attrs}
    names, notes = list(values), []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pairs = sorted(set(zip(values[a].tolist(), values[b].tolist(), strict=True)))
            if 1 < len(pairs) == len(set(values[a])) == len(set(values[b])):
                shown = ", ".join(f"{x} = {y}" for x, y in pairs[:6]) + (", …" if len(pairs) > 6 else "")
                notes.append(
                    f"subgroups {a} and {b} {CONFOUNDED}: each {a} has exactly one {b} ({shown}), so their rows "
                    "describe the same images; a difference between them cannot be attributed to either"
                )
    return notes


def _deployed(op: Mapping[str, Any]) -> dict[str, Any]:
    """Decision metrics at an operating point's frozen threshold: rule, threshold, confusion matrix (rows =
    true 0/1, columns = predicted 0/1), accuracy, balanced accuracy and F1 of the positive class."""
    t = op["test"]
    tp, fp, tn, fn = (int(t[k]) for k in ("tp", "fp", "tn", "fn"))
    n = tp + fp + tn + fn
    rates = [r for r in (t["sensitivity"], t["specificity"]) if r is not None]
    return {
        "rule": op["rule"],
        "threshold": float(op["threshold"]),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "accuracy": (tp + tn) / n,
        "balanced_accuracy": float(np.mean(rates)),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
    }


def _shared_thresholds(ops: list[dict[str, Any]]) -> list[str]:
    """One note per threshold that two or more rules chose (exactly equal floats)."""
    by_thr: dict[float, list[str]] = {}
    for op in ops:
        by_thr.setdefault(op["threshold"], []).append(str(op["rule"]))
    return [
        f"rules {', '.join(rules)} chose the same threshold {thr:.3f} on validation: "
        "their test operating points are identical"
        for thr, rules in by_thr.items()
        if len(rules) > 1
    ]


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
            f"validation AUROC is {shown}: the validation split {NO_SIGNAL} for this model, so the "
            "calibration, the early stopping and the operating points chosen on it are unreliable"
        )
    before, after = _spread(raw), _spread(calibrated)
    flat = after < FLAT_SPREAD and after < 0.1 * before
    metrics["calibration_flattened"] = float(flat)
    if flat:
        notes.append(
            f"{FLATTENED}: test probabilities spread {after:.4f} after vs {before:.4f} before "
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
    calibration: str = "auto",
    n_bins: int = N_BINS,
    groups_val: Any = None,
    progress: bool = False,
) -> EvaluationSummary:
    """Calibrate on validation, evaluate on test: the numbers an auditor needs, in one record.

    The calibrator is fitted on (logits_val, y_val) only (`choose_calibration`: "auto" fits a
    calibration only when the validation split is large enough and cross-validation on its patients,
    `groups_val`, shows it lowers the NLL); operating points are chosen on the
    calibrated validation probabilities and frozen for test; CIs resample test patients
    (n_boot = 0: no CIs). Ranking metrics (AUROC, AUPRC, val AUROC, subgroup AUROCs) use the
    uncalibrated softmax, which a calibration map cannot tie or flatten; calibration and decision
    metrics use the calibrated probabilities. The calibration panel (ECE, slope, intercept before
    and after, the ECE change) has patient-bootstrap CIs. Each frozen threshold gets patient-bootstrap CIs of
    test sensitivity, specificity, PPV and NPV; a target rule whose test CI excludes its target,
    rules sharing a threshold, a validation split without ranking signal, a calibration that
    flattens the output, one fitted on too small a validation split and one that makes test ECE
    worse (CI of the change above 0) are reported in `notes` (`WARNING_PHRASES` mark the warnings).
    Multi-class tasks get macro AUROC and no operating points (the rules are still validated).
    `progress` shows a console bar over the stages (calibration, then each set of bootstrap CIs).

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
    with Progress(transient=True, disable=not progress) as bar:
        stages = iter(STAGES)
        task = bar.add_task(f"evaluate: {next(stages)}", total=len(STAGES))

        def done() -> None:
            bar.update(task, advance=1, description=f"evaluate: {next(stages, 'done')}")

        return _summary(
            yv, zv, yt, zt, groups_test, rules, n_boot, seed, subgroups, calibration, n_bins, groups_val, done
        )


# the stages of `evaluation_summary` its progress bar names, in order
STAGES = ("fitting the calibration on val", "bootstrap CI of test AUROC", "bootstrap CIs of the calibration panel",
          "bootstrap CIs at each frozen threshold", "subgroups")  # fmt: skip


def _summary(
    yv: np.ndarray,
    zv: np.ndarray,
    yt: np.ndarray,
    zt: np.ndarray,
    groups_test: Any,
    rules: list[str],
    n_boot: int,
    seed: int,
    subgroups: Mapping[str, Any] | None,
    calibration: str,
    n_bins: int,
    groups_val: Any,
    done: Callable[[], None],
) -> EvaluationSummary:
    """`evaluation_summary` after input checks; `done()` marks the end of each of `STAGES`."""
    calibrator, choice = choose_calibration(calibration, zv, yv, groups_val, seed=seed)
    done()
    pv, pt, raw = calibrator.transform(zv), calibrator.transform(zt), softmax(zt)
    # ranking metrics from the uncalibrated scores (a calibration map may tie or flatten them);
    # decision metrics (accuracy, F1, confusion) from the calibrated probabilities the decisions use
    disc = {**discrimination(yt, pt), **_ranking(discrimination(yt, raw))}
    if n_boot > 0:
        point, low, high = bootstrap_ci(auroc, yt, raw, groups_test, n_boot=n_boot, seed=seed)
        auroc_ci = {"test_auroc_ci_low": low, "test_auroc_ci_high": high}
    else:  # n_boot = 0: point estimates only, no CIs
        value = auroc(yt, raw)
        if value is None:
            raise DataError("y_test: the test AUROC is undefined (one class present).")
        point, auroc_ci = value, {}
    done()
    metrics = {
        "test_auroc": point,
        **auroc_ci,
        **_flat("test_", disc, ("auprc", "accuracy", "balanced_accuracy", "f1")),
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
    calibration_metrics, notes = _calibration_metrics(yt, pt, raw, groups_test, n_bins, n_boot, seed)
    done()
    metrics.update(calibration_metrics, calibration_undersized=float(choice.undersized))
    if choice.undersized:
        notes.append(f"calibration: {choice.reason}")
    notes += _calibration_warnings(val_auroc, raw, pt, metrics)
    if zv.shape[1] == 2:
        ops, flat, op_notes = _operating_points(yv, pv, yt, pt, groups_test, rules, n_boot, seed)
        metrics.update(flat)
        notes += op_notes
    elif rules:
        notes.append(f"operating points {rules} skipped: defined for binary tasks only")
    done()
    threshold = ops[0]["threshold"] if ops else None
    if ops:  # the decisions the packaged model makes are at the first rule's frozen threshold
        deployed = _deployed(ops[0])
        disc["deployed"] = deployed
        metrics.update({f"test_{k}_at_threshold": deployed[k] for k in ("accuracy", "balanced_accuracy", "f1")})
    notes += _confounded(subgroups or {})
    groups_rows = subgroup_metrics(
        yt, pt, groups_test, subgroups or {}, threshold, n_boot=n_boot, seed=seed, scores=raw
    )
    done()
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
        calibration=choice,
    )
