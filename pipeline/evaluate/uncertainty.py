"""Uncertainty by patient: patient-level bootstrap CIs, paired (patient-clustered) comparisons, subgroups.

Conventions as in `pipeline.evaluate.metrics`; `groups` holds one patient pseudonym per row, and
every resampling draws patients (all of a patient's rows together), never rows. The DeLong test
of two AUROCs (image-level, or clustered by patient) is in `pipeline.evaluate.delong`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, DataError, did_you_mean
from pipeline.evaluate.delong import delong_test
from pipeline.evaluate.metrics import N_BINS, at_threshold, brier, calibration_slope_intercept, discrimination, ece, nll
from pipeline.stats import as_binary, auroc, check_groups, check_labels, check_probs

# --------------------------------------------------------------------------- uncertainty
METRICS: dict[str, Callable[[Any, Any], float | None]] = {
    "auroc": auroc,
    "auprc": lambda y, p: discrimination(y, p)["auprc"],
    "brier": lambda y, p: brier(p, y),
    "ece": lambda y, p: ece(p, y),
    "nll": lambda y, p: nll(p, y),
}


def _patient_resamples(y: np.ndarray, groups: Any, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield row indices of `n_boot` resamples that draw PATIENTS with replacement.

    A patient drawn k times contributes all of its rows k times. Resamples missing a class that
    is present in `y` are skipped (so fewer than n_boot may be yielded).
    """
    codes = check_groups(groups, len(y))
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
    interval = _percentile_ci(vals, alpha)
    if interval is None:
        raise DataError(
            "bootstrap_ci: no patient resample contained every class; the data has "
            "too few patients per class for a confidence interval."
        )
    return float(point), interval[0], interval[1]


def _percentile_ci(values: list[float | None], alpha: float) -> list[float] | None:
    """[low, high]: the (alpha/2, 1 − alpha/2) percentiles of the defined, finite values; None if none."""
    kept = [v for v in values if v is not None and np.isfinite(v)]
    if not kept:
        return None
    low, high = np.quantile(kept, [alpha / 2, 1 - alpha / 2])
    return [float(low), float(high)]


RATES = ("sensitivity", "specificity", "ppv", "npv")


def threshold_cis(
    y: Any, prob: Any, groups: Any, threshold: float, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, list[float] | None]:
    """Patient-bootstrap percentile CIs of sensitivity, specificity, PPV and NPV at a frozen threshold.

    The resamples are those of `bootstrap_ci` (`_patient_resamples`: patients drawn with
    replacement, a patient's images together; resamples missing a class skipped), so with the same
    `y`, `groups` and `seed` the operating-point CIs and the AUROC CI come from the same draws.
    All four rates are computed by `at_threshold` on each resample.

    Args:
        y: binary labels (N,). prob: P(class 1), (N,) or (N, 2). groups: one patient pseudonym per row.
        threshold: the frozen decision threshold (positive when prob ≥ threshold).
        n_boot: resamples to draw; 0 gives no CIs. seed: RNG seed. alpha: 0.05 for 95% intervals.

    Returns:
        {rate: [low, high] or None} for each of RATES. None when the rate is undefined on the full
        data (e.g. PPV with no positive calls), when n_boot is 0, or when no resample defines it;
        a rate undefined on some resamples is summarised over the resamples that define it.
    """
    p, labels = as_binary(y, prob)
    point = at_threshold(labels, p, threshold)
    draws: dict[str, list[float | None]] = {k: [] for k in RATES}
    if n_boot > 0 and any(point[k] is not None for k in RATES):
        for idx in _patient_resamples(labels, groups, n_boot, seed):
            rates = at_threshold(labels[idx], p[idx], threshold)
            for k in RATES:
                draws[k].append(rates[k])
    return {k: _percentile_ci(draws[k], alpha) if point[k] is not None else None for k in RATES}


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
    """Compare two models on the same cases by a patient-clustered paired bootstrap.

    Each resample draws patients with replacement (a patient's images travel together), and both
    models are scored on the same resample, so the CI of the difference reflects both the pairing
    and the correlation of a patient's images; it never treats images as independent. For AUROC,
    `delong_test(..., groups=...)` is the analytic counterpart; for ΔBrier and ΔNLL
    (metric="brier", "nll"; probabilities required) this bootstrap is the comparison to use.

    Args:
        y: labels (N,). prob_a, prob_b: the two models' probabilities (or scores for "auroc").
        groups: one patient pseudonym per row.
        n_boot: resamples drawn (those missing a class present in `y` are skipped). seed: RNG seed.
        metric: callable(y, prob) -> float | None, or a name in METRICS ("auroc", "brier", "nll", ...).
        alpha: the CI is the (alpha/2, 1 − alpha/2) percentile interval of the resampled differences.

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


def paired_comparison(
    y: Any, prob_a: Any, prob_b: Any, groups: Any, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Patient-clustered paired comparison of two binary models on the same cases (differences a − b).

    Args:
        y: binary labels (N,). prob_a, prob_b: P(class 1) of each model, (N,) or (N, 2).
        groups: one patient pseudonym per row. n_boot: bootstrap resamples (0: DeLong only). seed: RNG seed.

    Returns:
        {"n_images", "n_patients", "auroc": the clustered `delong_test` result, "brier" and "nll":
        the `paired_bootstrap` results (None when n_boot is 0)}.
    """
    codes = check_groups(groups, len(np.asarray(y)))
    out: dict[str, Any] = {
        "n_images": len(codes),
        "n_patients": int(codes.max()) + 1 if len(codes) else 0,
        "auroc": delong_test(y, prob_a, prob_b, groups=groups),
    }
    for metric in ("brier", "nll"):
        out[metric] = (
            paired_bootstrap(y, prob_a, prob_b, groups, n_boot=n_boot, seed=seed, metric=metric) if n_boot else None
        )
    return out


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
    scores: Any = None,
) -> list[dict[str, Any]]:
    """Per attribute value: size, prevalence, AUROC with patient-bootstrap CI, sens/spec at threshold.

    Binary `prob` is P(class 1) (N,) or (N, 2); an (N, C > 2) array gives macro AUROC only
    (n_pos, prevalence, sensitivity, specificity are then None). A subgroup with fewer than
    `min_cases` positives or negatives (multi-class: cases of any class present) is flagged
    `too_few=True` and its AUROC/CI left None; its counts and sens/spec are still reported.
    `scores` (same shape as `prob`; default `prob`) are what the AUROC ranks: pass the uncalibrated
    probabilities when `prob` is calibrated.
    """
    p = check_probs(prob, "prob")
    rank = p if scores is None else check_probs(scores, "scores")
    labels = check_labels(y, len(p), p.shape[1])
    binary = p.shape[1] == 2
    g = check_groups(groups, len(labels))
    present = np.bincount(labels, minlength=p.shape[1]) > 0  # classes absent overall are ignored
    rows = []
    for attr, values in attrs.items():
        vals = _attr_values(values, len(labels), attr)
        for value in sorted(set(vals.tolist())):
            m = vals == value
            ys, ps, rs = labels[m], p[m], rank[m]
            counts = np.bincount(ys, minlength=p.shape[1])
            row: dict[str, Any] = {
                "attribute": attr,
                "value": value,
                "n": int(m.sum()),
                "n_patients": len(np.unique(g[m])),
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
                row["auroc"], row["ci_low"], row["ci_high"] = _auroc_ci(ys, rs, g[m], n_boot, seed)
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


# --------------------------------------------------------------------------- calibration panel
def calibration_cis(
    y: Any,
    probs_before: Any,
    probs_after: Any,
    groups: Any,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    n_bins: int = N_BINS,
) -> dict[str, Any]:
    """Patient-bootstrap CIs of the calibration panel, before and after calibration, from the same resamples.

    ECE (top-label, `n_bins` equal-width bins) before and after and their paired difference
    (after − before: > 0 means calibration made ECE worse); for binary tasks also the calibration
    slope and intercept (Van Calster 2019, `calibration_slope_intercept`) before and after.
    Resamples draw patients (`_patient_resamples`), so with the same y, groups and seed they are
    the draws of the AUROC and operating-point CIs.

    Returns:
        {"ece": {"before", "after", "diff"}, "slope": {"before", "after"}, "intercept": {...}}, each
        entry {"value": point estimate, "ci": [low, high] or None}; slope and intercept only for
        binary tasks with both classes present. n_boot = 0 gives points without CIs.
    """
    before, after = check_probs(probs_before, "probs_before"), check_probs(probs_after, "probs_after")
    labels = check_labels(y, len(before), before.shape[1])
    binary = before.shape[1] == 2 and labels.min() != labels.max()

    def panel(idx: np.ndarray) -> dict[str, float]:
        yy, b, a = labels[idx], before[idx], after[idx]
        out = {"ece.before": ece(b, yy, n_bins), "ece.after": ece(a, yy, n_bins)}
        out["ece.diff"] = out["ece.after"] - out["ece.before"]
        if binary:
            out["slope.before"], out["intercept.before"] = calibration_slope_intercept(b[:, 1], yy)
            out["slope.after"], out["intercept.after"] = calibration_slope_intercept(a[:, 1], yy)
        return out

    point = panel(np.arange(len(labels)))
    draws: dict[str, list[float | None]] = {k: [] for k in point}
    if n_boot > 0:
        for idx in _patient_resamples(labels, groups, n_boot, seed):
            for k, v in panel(idx).items():
                draws[k].append(v)
    result: dict[str, Any] = {}
    for key, value in point.items():
        name, part = key.split(".")
        result.setdefault(name, {})[part] = {
            "value": float(value),
            "ci": _percentile_ci(draws[key], alpha) if n_boot > 0 else None,
        }
    return result
