"""Calibration and discrimination metrics, operating points, patient-level bootstrap, DeLong, subgroups.

Conventions: `probs` is (N, C) (a 1-D array is read as P(class 1) of a binary task); `prob` is the
binary positive-class probability (N,) (an (N, 2) array is accepted, column 1 is used); `y` holds
integer class indices; `groups` holds one patient pseudonym per row. Undefined values (an AUROC
with one class present, a PPV with no positive calls) are returned as None, never as 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_curve

from pipeline.errors import ConfigError, DataError, did_you_mean
from pipeline.evaluate.calibrate import check_labels, check_logits, make_calibrator, softmax

N_BINS = 15
RULE_EXAMPLES = ("youden", "sensitivity@0.90", "specificity@0.95")


def _probs(probs: Any, name: str = "probs") -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = np.column_stack([1.0 - p, p])
    if p.ndim != 2 or p.shape[1] < 2 or len(p) == 0:
        raise DataError(f"{name}: expected probabilities shaped (N, C) or (N,) for binary, got {p.shape}.")
    if not np.all(np.isfinite(p)) or p.min() < -1e-9 or p.max() > 1 + 1e-9:
        raise DataError(
            f"{name}: expected finite values in [0, 1]; pass probabilities, not logits "
            "(use calibrate.softmax on logits)."
        )
    return p


def _xy(probs: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _probs(probs)
    return p, check_labels(y, len(p), p.shape[1])


def as_binary(y: Any, prob: Any, name: str = "prob", *, scores: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Validate a binary task: return (P(class 1) as (N,), labels in {0, 1}).

    With `scores=True` (rank-based metrics: AUROC, DeLong) any finite score is accepted.
    """
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]
    if p.ndim != 1 or len(p) == 0:
        raise DataError(
            f"{name}: expected the positive-class probability shaped (N,), got {p.shape}; "
            "this metric is defined for binary tasks only."
        )
    if scores:
        if not np.all(np.isfinite(p)):
            raise DataError(f"{name}: {int((~np.isfinite(p)).sum())} non-finite scores (NaN/inf).")
    else:
        p = _probs(p, name)[:, 1]
    return p, check_labels(y, len(p), 2)


# --------------------------------------------------------------------------- calibration
def reliability_bins(probs: Any, y: Any, n_bins: int = N_BINS) -> dict[str, Any]:
    """Top-label reliability table over `n_bins` equal-width confidence bins (lo, hi].

    Returns:
        dict with `edges` (n_bins+1), per-bin `count`, mean `confidence` and `accuracy`
        (NaN for empty bins), and `ece`, `mce`.
    """
    p, labels = _xy(probs, y)
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
    p, labels = _xy(probs, y)
    per_class = [_binned(p[:, c], (labels == c).astype(np.float64), n_bins)["ece"] for c in range(p.shape[1])]
    return float(np.mean(per_class))


def brier(probs: Any, y: Any) -> float:
    """Multi-class Brier score: mean over samples of Σ_c (p_c − 1[y = c])², in [0, 2].

    For a binary task this is exactly 2 × sklearn `brier_score_loss(y, p[:, 1])` (both classes
    contribute the same squared error); divide by 2 to compare with the one-column convention.
    """
    p, labels = _xy(probs, y)
    return float(np.mean(np.sum((p - np.eye(p.shape[1])[labels]) ** 2, axis=1)))


def nll(probs: Any, y: Any) -> float:
    """Mean negative log-likelihood of the true class (natural log; probabilities clipped at float eps)."""
    p, labels = _xy(probs, y)
    eps = np.finfo(np.float64).eps
    return float(-np.mean(np.log(np.clip(p[np.arange(len(p)), labels], eps, 1.0))))


def _logistic_fit(x: np.ndarray, y: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Unpenalised logistic regression y ~ x·beta + offset by Newton–Raphson."""
    beta = np.zeros(x.shape[1])
    for _ in range(100):
        mu = 1.0 / (1.0 + np.exp(-(offset + x @ beta)))
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
def _auc_binary(pos: np.ndarray, score: np.ndarray) -> float | None:
    """AUROC by the Mann–Whitney rank statistic (ties count 1/2); None if a class is absent."""
    n1 = int(pos.sum())
    n0 = len(pos) - n1
    if n1 == 0 or n0 == 0:
        return None
    ranks = stats.rankdata(score)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auroc(y: Any, probs: Any) -> float | None:
    """AUROC: binary on P(class 1) (or any 1-D score); multi-class the macro mean of one-vs-rest AUROCs."""
    if np.ndim(probs) == 1:
        score, pos = as_binary(y, probs, "probs", scores=True)
        return _auc_binary(pos == 1, score)
    p, labels = _xy(probs, y)
    if p.shape[1] == 2:
        return _auc_binary(labels == 1, p[:, 1])
    per = [_auc_binary(labels == c, p[:, c]) for c in range(p.shape[1])]
    defined = [a for a in per if a is not None]
    return float(np.mean(defined)) if defined else None


def discrimination(y: Any, probs: Any) -> dict[str, Any]:
    """Discrimination metrics at the arg-max decision (binary: P(class 1) ≥ 0.5).

    Returns:
        dict with auroc, auprc (binary: positive class; multi-class: macro over classes present,
        plus auroc_per_class/auprc_per_class lists), accuracy, balanced_accuracy, f1 (binary:
        positive class; multi-class: macro) and confusion_matrix (rows = true, cols = predicted).
    """
    p, labels = _xy(probs, y)
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
    per = [_auc_binary(labels == c, p[:, c]) for c in range(n_classes)]
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


# --------------------------------------------------------------------------- uncertainty
METRICS: dict[str, Callable[[Any, Any], float | None]] = {
    "auroc": auroc,
    "auprc": lambda y, p: discrimination(y, p)["auprc"],
    "brier": lambda y, p: brier(p, y),
    "ece": lambda y, p: ece(p, y),
}


def _patient_resamples(y: np.ndarray, groups: Any, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield row indices of `n_boot` resamples that draw PATIENTS with replacement.

    A patient drawn k times contributes all of its rows k times. Resamples missing a class that
    is present in `y` are skipped (so fewer than n_boot may be yielded).
    """
    g = np.asarray(groups)
    if g.shape != (len(y),):
        raise DataError(f"groups: expected one patient id per row, shape ({len(y)},), got {g.shape}.")
    _, codes = np.unique(g.astype(str), return_inverse=True)
    n_groups, n_classes = int(codes.max()) + 1, len(np.unique(y))
    rng = np.random.default_rng(seed)
    rows = np.arange(len(y))
    for _ in range(n_boot):
        weight = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[codes]
        idx = np.repeat(rows, weight)
        if len(np.unique(y[idx])) == n_classes:
            yield idx


def _metric_fn(metric: str | Callable[[Any, Any], float | None]) -> Callable[[Any, Any], Any]:
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise ConfigError(
            f"metric: unknown name '{metric}'{did_you_mean(metric, METRICS)}; "
            f"expected a callable(y, prob) or one of {', '.join(METRICS)}."
        )
    return METRICS[metric]


def bootstrap_ci(
    metric: str | Callable[[Any, Any], float | None],
    y: Any,
    prob: Any,
    groups: Any,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Point estimate and percentile CI of metric(y, prob), resampling patients (not images).

    Args:
        metric: callable(y, prob) -> float | None, or a name in METRICS ("auroc", "auprc", ...).
        groups: one patient pseudonym per row; a patient's images are drawn together.

    Returns:
        (point, low, high) with the (alpha/2, 1 − alpha/2) percentiles of the valid resamples.
    """
    fn = _metric_fn(metric)
    labels, p = np.asarray(y), np.asarray(prob)
    point = fn(labels, p)
    if point is None:
        raise DataError(
            "bootstrap_ci: the metric is undefined on the full data (e.g. AUROC with "
            "one class); it cannot be bootstrapped."
        )
    vals = [fn(labels[i], p[i]) for i in _patient_resamples(labels, groups, n_boot, seed)]
    vals = [v for v in vals if v is not None and np.isfinite(v)]
    if not vals:
        raise DataError(
            "bootstrap_ci: no patient resample contained every class; the data has "
            "too few patients per class for a confidence interval."
        )
    low, high = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return float(point), float(low), float(high)


def delong_test(y: Any, prob_a: Any, prob_b: Any) -> dict[str, float]:
    """Paired DeLong test (DeLong 1988; fast midrank form of Sun & Xu 2014) of two binary AUROCs.

    Returns:
        auc_a, auc_b, diff (a − b), se of the difference, z, two-sided p, and 95% ci_low/ci_high.
    """
    pa, labels = as_binary(y, prob_a, "prob_a", scores=True)
    pb, _ = as_binary(y, prob_b, "prob_b", scores=True)
    pos = labels == 1
    m, n = int(pos.sum()), int((~pos).sum())
    if m < 2 or n < 2:
        raise DataError(f"y: DeLong needs at least 2 positives and 2 negatives; got {m} and {n}.")
    v10, v01, aucs = [], [], []
    for s in (pa, pb):
        tz, tx, ty = stats.rankdata(s), stats.rankdata(s[pos]), stats.rankdata(s[~pos])
        aucs.append((tz[pos].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[pos] - tx) / n)  # per positive: share of negatives it outranks
        v01.append(1.0 - (tz[~pos] - ty) / m)  # per negative: share of positives above it
    cov = np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n
    diff = float(aucs[0] - aucs[1])
    se = float(np.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0)))
    if se > 0:
        z = diff / se
    else:
        z = 0.0 if diff == 0 else float(np.sign(diff) * np.inf)
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "diff": diff,
        "se": se,
        "z": float(z),
        "p": float(2 * stats.norm.sf(abs(z))),
        "ci_low": diff - 1.959964 * se,
        "ci_high": diff + 1.959964 * se,
    }


def paired_bootstrap(
    y: Any,
    prob_a: Any,
    prob_b: Any,
    groups: Any,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    metric: str | Callable[[Any, Any], float | None] = "auroc",
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Compare two models on the same cases by resampling patients; both see the same resamples.

    Returns:
        metric name, value_a, value_b, diff (a − b), percentile ci_low/ci_high of the difference,
        p (two-sided: 2 × the smaller share of resampled differences on either side of 0, ≤ 1)
        and n_boot (resamples used).
    """
    fn = _metric_fn(metric)
    labels, pa, pb = np.asarray(y), np.asarray(prob_a), np.asarray(prob_b)
    a, b = fn(labels, pa), fn(labels, pb)
    if a is None or b is None:
        raise DataError("paired_bootstrap: the metric is undefined on the full data.")
    diffs = np.array(
        [fn(labels[i], pa[i]) - fn(labels[i], pb[i]) for i in _patient_resamples(labels, groups, n_boot, seed)]
    )
    if len(diffs) == 0:
        raise DataError("paired_bootstrap: no patient resample contained every class.")
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))))
    return {
        "metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "metric"),
        "value_a": float(a),
        "value_b": float(b),
        "diff": float(a - b),
        "ci_low": float(low),
        "ci_high": float(high),
        "p": float(p),
        "n_boot": len(diffs),
    }


# --------------------------------------------------------------------------- subgroups
def _attr_values(values: Any, n: int, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=object)
    if v.shape != (n,):
        raise DataError(f"subgroups['{name}']: expected one value per row, shape ({n},), got {v.shape}.")
    missing = np.array([x is None or (isinstance(x, float) and np.isnan(x)) for x in v], dtype=bool)
    return np.where(missing, "missing", v.astype(str))


def subgroup_metrics(
    y: Any,
    prob: Any,
    groups: Any,
    attrs: Mapping[str, Any],
    threshold: float | None,
    n_boot: int = 200,
    seed: int = 0,
    min_cases: int = 10,
) -> list[dict[str, Any]]:
    """Per attribute value: size, prevalence, AUROC with patient-bootstrap CI, sens/spec at threshold.

    Binary `prob` is P(class 1) (N,) or (N, 2); an (N, C > 2) array gives macro AUROC only
    (n_pos, prevalence, sensitivity, specificity are then None). A subgroup with fewer than
    `min_cases` positives or negatives (multi-class: cases of any class present) is flagged
    `too_few=True` and its AUROC/CI left None; its counts and sens/spec are still reported.
    """
    p = _probs(prob, "prob")
    labels = check_labels(y, len(p), p.shape[1])
    binary = p.shape[1] == 2
    g = np.asarray(groups)
    if g.shape != (len(labels),):
        raise DataError(f"groups: expected one patient id per row, shape ({len(labels)},), got {g.shape}.")
    present = np.bincount(labels, minlength=p.shape[1]) > 0  # classes absent overall are ignored
    rows = []
    for attr, values in attrs.items():
        vals = _attr_values(values, len(labels), attr)
        for value in sorted(set(vals.tolist())):
            m = vals == value
            ys, ps = labels[m], p[m]
            counts = np.bincount(ys, minlength=p.shape[1])
            row: dict[str, Any] = {
                "attribute": attr,
                "value": value,
                "n": int(m.sum()),
                "n_patients": len(np.unique(g[m].astype(str))),
                "n_pos": int(counts[1]) if binary else None,
                "prevalence": float(counts[1] / m.sum()) if binary else None,
                "too_few": bool(counts[present].min() < min_cases),
                "auroc": None,
                "ci_low": None,
                "ci_high": None,
                "sensitivity": None,
                "specificity": None,
            }
            if not row["too_few"]:
                row["auroc"], row["ci_low"], row["ci_high"] = _auroc_ci(ys, ps, g[m], n_boot, seed)
            if binary and threshold is not None:
                op = at_threshold(ys, ps[:, 1], threshold)
                row.update(sensitivity=op["sensitivity"], specificity=op["specificity"])
            rows.append(row)
    return rows


def _auroc_ci(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_boot: int, seed: int
) -> tuple[float | None, float | None, float | None]:
    try:
        return bootstrap_ci(auroc, y, p, groups, n_boot=n_boot, seed=seed)
    except DataError:  # every resample lost a class (very few patients): report the point only
        return auroc(y, p), None, None


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
        "test_nll": nll(probs, y),
        "test_nll_uncalibrated": nll(raw, y),
        "ece_n_bins": n_bins,
    }
    if probs.shape[1] == 2 and y.min() != y.max():
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
) -> dict[str, Any]:
    """Calibrate on validation, evaluate on test: the numbers an auditor needs, in one dict.

    The calibrator is fitted on (logits_val, y_val) only; operating points are chosen on the
    calibrated validation probabilities and frozen for test; CIs resample test patients.
    Multi-class tasks get macro AUROC and no operating points (the rules are still validated).

    Returns:
        dict with "metrics" (flat MLflow names -> float), "temperature" (None unless
        calibration="temperature"), "operating_points", "subgroups", "calibrator",
        "probs_val", "probs_test", "probs_test_uncalibrated", "reliability", "notes".
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
    disc = discrimination(yt, pt)
    point, low, high = bootstrap_ci(auroc, yt, pt, groups_test, n_boot=n_boot, seed=seed)
    metrics = {
        "test_auroc": point,
        "test_auroc_ci_low": low,
        "test_auroc_ci_high": high,
        **_flat("test_", disc, ("auprc", "accuracy", "balanced_accuracy", "f1")),
        **_calibration_metrics(yt, pt, raw, n_bins),
        "test_n_images": float(len(yt)),
        "test_n_patients": float(len(np.unique(np.asarray(groups_test).astype(str)))),
    }
    val_auroc = auroc(yv, pv)
    if val_auroc is not None:
        metrics["val_auroc"] = val_auroc
    temperature = getattr(calibrator, "temperature_", None)
    if temperature is not None:
        metrics["temperature"] = float(temperature)
    ops: list[dict] = []
    notes = []
    if zv.shape[1] == 2:
        ops, flat = _operating_points(yv, pv, yt, pt, rules)
        metrics.update(flat)
    elif rules:
        notes.append(f"operating points {rules} skipped: defined for binary tasks only")
    threshold = ops[0]["threshold"] if ops else None
    groups_rows = subgroup_metrics(yt, pt, groups_test, subgroups or {}, threshold, n_boot=n_boot, seed=seed)
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
    return {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "temperature": temperature,
        "operating_points": ops,
        "subgroups": groups_rows,
        "calibrator": calibrator,
        "probs_val": pv,
        "probs_test": pt,
        "probs_test_uncalibrated": raw,
        "reliability": reliability,
        "discrimination": disc,
        "notes": notes,
    }
