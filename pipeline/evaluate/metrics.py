"""Calibration and discrimination metrics and operating points: pure functions of (y, probs).

Conventions: `probs` is (N, C) (a 1-D array is read as P(class 1) of a binary task); `prob` is the
binary positive-class probability (N,) (an (N, 2) array is accepted, column 1 is used); `y` holds
integer class indices; `groups` holds one patient pseudonym per row. Undefined values (an AUROC
with one class present, a PPV with no positive calls) are returned as None, never as 0.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from scipy.special import expit
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_curve

from pipeline.errors import ConfigError, DataError, did_you_mean
from pipeline.stats import as_binary, auc_binary, auroc, check_xy

N_BINS = 15
RULE_EXAMPLES = ("youden", "sensitivity@0.90", "specificity@0.95")


# --------------------------------------------------------------------------- calibration
def reliability_bins(probs: Any, y: Any, n_bins: int = N_BINS) -> dict[str, Any]:
    """Top-label reliability table over `n_bins` equal-width confidence bins (lo, hi].

    Returns:
        dict with `edges` (n_bins+1), per-bin `count`, mean `confidence` and `accuracy`
        (NaN for empty bins), and `ece`, `mce`.
    """
    p, labels = check_xy(probs, y)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == labels).astype(np.float64)
    return _binned(conf, correct, n_bins)


def _binned(conf: np.ndarray, target: np.ndarray, n_bins: int) -> dict[str, Any]:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.digitize(conf, edges[1:-1], right=True)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=target, minlength=n_bins) / count
    gap = np.abs(acc - mean_conf)
    filled = count > 0
    return {
        "edges": edges,
        "count": count.astype(int),
        "confidence": mean_conf,
        "accuracy": acc,
        "ece": float(np.sum(count[filled] * gap[filled]) / len(conf)),
        "mce": float(gap[filled].max()),
    }


def ece(probs: Any, y: Any, n_bins: int = N_BINS) -> float:
    """Top-label expected calibration error: Σ_bins (n_b/N)·|acc_b − conf_b|, equal-width bins (lo, hi]."""
    return float(reliability_bins(probs, y, n_bins)["ece"])


def mce(probs: Any, y: Any, n_bins: int = N_BINS) -> float:
    """Maximum calibration error: the largest |acc_b − conf_b| over non-empty top-label bins."""
    return float(reliability_bins(probs, y, n_bins)["mce"])


def classwise_ece(probs: Any, y: Any, n_bins: int = N_BINS) -> float:
    """Class-wise ECE (Kull et al. 2019): mean over classes c of the ECE of P(c) against [y == c]."""
    p, labels = check_xy(probs, y)
    per_class = [_binned(p[:, c], (labels == c).astype(np.float64), n_bins)["ece"] for c in range(p.shape[1])]
    return float(np.mean(per_class))


def brier(probs: Any, y: Any) -> float:
    """Brier score on the usual scale: binary, mean (P(class 1) − y)² in [0, 1] (sklearn `brier_score_loss`);
    multi-class, Brier's original mean over samples of Σ_c (p_c − 1[y = c])², in [0, 2]."""
    p, labels = check_xy(probs, y)
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - labels) ** 2))
    return brier_sum_over_classes(p, labels)


def brier_sum_over_classes(probs: Any, y: Any) -> float:
    """Mean over samples of Σ_c (p_c − 1[y = c])², in [0, 2]; for a binary task exactly 2 × `brier`."""
    p, labels = check_xy(probs, y)
    return float(np.mean(np.sum((p - np.eye(p.shape[1])[labels]) ** 2, axis=1)))


def scaled_brier(probs: Any, y: Any) -> float | None:
    """1 − Brier / Brier of always predicting the observed prevalence (binary; None when one class).

    1 is perfect, 0 is no better than the prevalence, below 0 is worse (Steyerberg et al. 2010).
    """
    p, labels = check_xy(probs, y)
    prevalence = float(np.mean(labels == 1))
    reference = prevalence * (1.0 - prevalence)
    if p.shape[1] != 2 or reference == 0.0:
        return None
    return 1.0 - brier(p, labels) / reference


def nll(probs: Any, y: Any) -> float:
    """Mean negative log-likelihood of the true class (natural log; probabilities clipped at float eps)."""
    p, labels = check_xy(probs, y)
    eps = np.finfo(np.float64).eps
    return float(-np.mean(np.log(np.clip(p[np.arange(len(p)), labels], eps, 1.0))))


def _logistic_fit(x: np.ndarray, y: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Unpenalised logistic regression y ~ x·beta + offset by Newton–Raphson."""
    beta = np.zeros(x.shape[1])
    for _ in range(100):
        mu = expit(offset + x @ beta)  # no overflow on a separable resample
        hess = x.T @ (x * (mu * (1.0 - mu))[:, None]) + 1e-12 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, x.T @ (y - mu))
        beta += step
        if np.max(np.abs(step)) < 1e-10:
            break
    return beta


def calibration_slope_intercept(prob: Any, y: Any) -> tuple[float, float]:
    """Calibration slope and intercept of a binary model (Van Calster et al. 2019).

    slope: coefficient b of logit P(y=1) = a + b·logit(p) (ideal 1; < 1 means overconfident).
    intercept: calibration-in-the-large, a in logit P(y=1) = a + logit(p) with the slope fixed
    at 1 (ideal 0; > 0 means risks are underestimated on average).
    """
    p, labels = as_binary(y, prob)
    if labels.min() == labels.max():
        raise DataError(f"y: calibration slope needs both classes present; got only class {labels[0]}.")
    lp = np.log(np.clip(p, 1e-12, 1 - 1e-12) / np.clip(1 - p, 1e-12, 1 - 1e-12))
    t = labels.astype(np.float64)
    ones = np.ones((len(p), 1))
    slope = _logistic_fit(np.column_stack([ones, lp]), t, np.zeros(len(p)))[1]
    intercept = _logistic_fit(ones, t, lp)[0]
    return float(slope), float(intercept)


# --------------------------------------------------------------------------- discrimination
def discrimination(y: Any, probs: Any) -> dict[str, Any]:
    """Discrimination metrics at the arg-max decision (binary: P(class 1) ≥ 0.5).

    Returns:
        dict with auroc, auprc (binary: positive class; multi-class: macro over classes present,
        plus auroc_per_class/auprc_per_class lists), accuracy, balanced_accuracy, f1 (binary:
        positive class; multi-class: macro) and confusion_matrix (rows = true, cols = predicted).
    """
    p, labels = check_xy(probs, y)
    n_classes = p.shape[1]
    pred = p.argmax(axis=1)
    cm = confusion_matrix(labels, pred, labels=list(range(n_classes)))
    rows = cm.sum(axis=1)
    out: dict[str, Any] = {
        "n": len(labels),
        "accuracy": float(np.trace(cm) / len(labels)),
        "balanced_accuracy": float(np.mean(np.diag(cm)[rows > 0] / rows[rows > 0])),
        "confusion_matrix": cm.tolist(),
    }
    auprc = [float(average_precision_score(labels == c, p[:, c])) if rows[c] else None for c in range(n_classes)]
    if n_classes == 2:
        out.update(auroc=auroc(labels, p), auprc=auprc[1], f1=float(f1_score(labels, pred, zero_division=0)))
        return out
    per = [auc_binary(labels == c, p[:, c]) for c in range(n_classes)]
    out.update(
        auroc=auroc(labels, p),
        auroc_per_class=per,
        auprc_per_class=auprc,
        auprc=_mean_defined(auprc),
        f1=float(f1_score(labels, pred, average="macro", labels=list(range(n_classes)), zero_division=0)),
    )
    return out


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


# --------------------------------------------------------------------------- operating points
def parse_rule(rule: str) -> tuple[str, float | None]:
    """Parse "youden" | "sensitivity@T" | "specificity@T" (0 < T ≤ 1) into (kind, target).

    Raises:
        ConfigError: unknown rule, with the accepted forms and a "did you mean".
    """
    kind, _, target = str(rule).partition("@")
    if kind == "youden" and not target:
        return kind, None
    if kind in ("sensitivity", "specificity") and re.fullmatch(r"\d*\.?\d+", target):
        value = float(target)
        if 0.0 < value <= 1.0:
            return kind, value
        raise ConfigError(
            f"evaluate.operating_points: '{rule}' has target {value}; write it as a "
            f"fraction in (0, 1], e.g. {kind}@0.90."
        )
    raise ConfigError(
        f"evaluate.operating_points: unknown rule '{rule}'{did_you_mean(str(rule), RULE_EXAMPLES)}; "
        "expected 'youden', 'sensitivity@<target>' (e.g. sensitivity@0.90) or "
        "'specificity@<target>' (e.g. specificity@0.95)."
    )


def choose_operating_point(y_val: Any, prob_val: Any, rule: str) -> float:
    """Pick a decision threshold on validation data; predict positive when prob ≥ threshold.

    youden: maximises sensitivity + specificity − 1 (highest threshold on ties).
    sensitivity@T: the highest threshold whose sensitivity ≥ T (so the best specificity).
    specificity@T: the lowest threshold whose specificity ≥ T (so the best sensitivity).

    Raises:
        ConfigError: unknown rule. DataError: validation data lacks one of the classes.
    """
    kind, target = parse_rule(rule)
    p, labels = as_binary(y_val, prob_val, "prob_val")
    if labels.min() == labels.max():
        raise DataError(
            f"y_val: operating point '{rule}' needs both classes in the validation "
            f"split; only class {labels[0]} is present. Enlarge the validation split."
        )
    goal = 0.0 if target is None else target - 1e-12  # tolerance for float targets like 0.9
    fpr, tpr, thr = roc_curve(labels, p, drop_intermediate=False)
    thr = thr.astype(np.float64)
    thr[0] = np.nextafter(p.max(), np.inf)  # sklearn puts +inf there: "call nothing positive"
    if kind == "youden":
        i = int(np.argmax(tpr - fpr))
    elif kind == "sensitivity":
        i = int(np.argmax(tpr >= goal))
    else:
        i = int(np.nonzero(1.0 - fpr >= goal)[0][-1])
    return float(thr[i])


def _ratio(num: int, den: int) -> float | None:
    return float(num / den) if den else None


def at_threshold(y: Any, prob: Any, threshold: float) -> dict[str, Any]:
    """Confusion counts and rates when predicting positive for prob ≥ threshold (None if undefined)."""
    p, labels = as_binary(y, prob)
    pred = p >= threshold
    pos = labels == 1
    tp, fp = int(np.sum(pred & pos)), int(np.sum(pred & ~pos))
    fn, tn = int(np.sum(~pred & pos)), int(np.sum(~pred & ~pos))
    return {
        "threshold": float(threshold),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }
