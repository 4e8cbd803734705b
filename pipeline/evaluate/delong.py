"""DeLong test of two correlated binary AUROCs on the same cases: image-level, or clustered by patient.

Image-level: DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two or more correlated
receiver operating characteristic curves: a nonparametric approach", Biometrics 44:837–845, with the
placement values computed in O(n log n) as in Sun & Xu (2014), IEEE Signal Processing Letters
21:1389–1393. It treats every image as an independent case.

Clustered: Obuchowski (1997), "Nonparametric analysis of clustered ROC curve data", Biometrics
53:567–578, which keeps DeLong's structural components (placement values) but sums them per
cluster (patient) before taking variances, so a patient's correlated images count once, not as
independent cases. With one image per patient it is exactly DeLong's estimator.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import special

from pipeline.errors import DataError
from pipeline.stats import as_binary, check_groups

Z_95 = 1.959964  # standard normal 97.5% quantile: the 95% CI is diff ± Z_95 · se


def delong_test(y: Any, prob_a: Any, prob_b: Any, groups: Any = None) -> dict[str, Any]:
    """Paired test of AUROC(prob_a) − AUROC(prob_b) on the same cases; clustered by patient with `groups`.

    Placement values (structural components; ties count 1/2): for a positive unit x, V10(x) is the
    share of all N negatives it outranks; for a negative unit w, V01(w) is the share of all M
    positives ranked above it. AUC = mean V10 = mean V01.

    Without `groups` (image-level, DeLong 1988 / Sun & Xu 2014)::

        var(AUC) = S10 / M + S01 / N,  S10, S01 = sample (co)variances (ddof 1) of V10 over the M
        positives and of V01 over the N negatives; between models the same with cross-products.

    With `groups` (Obuchowski 1997): cluster i (patient) has m_i positive and n_i negative units,
    M = Σ m_i, N = Σ n_i, I clusters, of which I10 hold ≥ 1 positive and I01 ≥ 1 negative.
    V10_i = Σ of V10 over cluster i's positives, V01_i = Σ of V01 over its negatives (0 when it has
    none), and for models r, s (the small-sample factors use I10 and I01, the clusters that add to
    each sum, as the method's reference R code does: funcs_clusteredROC.R, Cleveland Clinic)::

        S10_rs = I10 / ((I10 − 1) M) · Σ_i (V10_i^r − m_i AUC^r)(V10_i^s − m_i AUC^s)
        S01_rs = I01 / ((I01 − 1) N) · Σ_i (V01_i^r − n_i AUC^r)(V01_i^s − n_i AUC^s)
        S11_rs = I / (I − 1)         · Σ_i (V10_i^r − m_i AUC^r)(V01_i^s − n_i AUC^s)
        cov(AUC^r, AUC^s) = S10_rs / M + S01_rs / N + (S11_rs + S11_sr) / (M N)

    (r = s gives var = S10/M + S01/N + 2 S11/(M N)), and var(diff) = var_a + var_b − 2 cov_ab.
    With one image per patient S11 = 0 and S10, S01 reduce to DeLong's: the two paths agree.

    Assumptions: patients are independent; a patient's images may be correlated in any way and
    may mix classes; the CI and p use the normal approximation, which needs a reasonable number
    of patients of each class (tens, not a handful).

    Args:
        y: binary labels (N,) in {0, 1}.
        prob_a, prob_b: scores of the two models, (N,) or (N, 2); any finite score is accepted.
        groups: one patient pseudonym per row; None treats every row as an independent case.

    Returns:
        auc_a, auc_b, diff (a − b), se of the difference, z, two-sided p, 95% ci_low/ci_high,
        clustered (whether `groups` was used) and n_clusters (the number of patients; None
        without `groups`).

    Raises:
        DataError: groups not one per row; fewer than 2 positives or 2 negatives; with groups,
            positives or negatives in fewer than 2 patients.
    """
    pa, labels = as_binary(y, prob_a, "prob_a", scores=True)
    pb, _ = as_binary(y, prob_b, "prob_b", scores=True)
    codes = None if groups is None else check_groups(groups, len(labels))
    pos = labels == 1
    m, n = int(pos.sum()), int((~pos).sum())
    if m < 2 or n < 2:
        raise DataError(f"y: DeLong needs at least 2 positives and 2 negatives; got {m} and {n}.")
    aucs, v10, v01 = _placements(pos, (pa, pb))
    if codes is None:
        cov = np.cov(v10) / m + np.cov(v01) / n
    else:
        cov = _clustered_cov(aucs, v10, v01, pos, codes)
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
        "p": float(2 * special.ndtr(-abs(z))),  # = 2 · norm.sf(|z|)
        "ci_low": diff - Z_95 * se,
        "ci_high": diff + Z_95 * se,
        "clustered": codes is not None,
        "n_clusters": None if codes is None else int(codes.max()) + 1,
    }


def _placements(pos: np.ndarray, scores: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs (K,), V10 (K, M) per positive and V01 (K, N) per negative of K scores, in O(n log n).

    Sun & Xu's midrank differences counted directly on sorted scores: V10(x) = (#neg < x + #neg ≤ x) / 2N,
    V01(w) = 1 − (#pos < w + #pos ≤ w) / 2M (so ties count 1/2).
    """
    v10, v01 = [], []
    for s in scores:
        x, w = s[pos], s[~pos]
        xs, ws = np.sort(x), np.sort(w)
        v10.append((np.searchsorted(ws, x, "left") + np.searchsorted(ws, x, "right")) / (2 * len(w)))
        v01.append(1.0 - (np.searchsorted(xs, w, "left") + np.searchsorted(xs, w, "right")) / (2 * len(x)))
    a10, a01 = np.array(v10), np.array(v01)
    return a10.mean(axis=1), a10, a01


def _clustered_cov(
    aucs: np.ndarray, v10: np.ndarray, v01: np.ndarray, pos: np.ndarray, codes: np.ndarray
) -> np.ndarray:
    """Obuchowski's (1997) covariance matrix (K, K) of K AUCs from per-unit placements and cluster codes."""
    k = int(codes.max()) + 1
    m_i = np.bincount(codes[pos], minlength=k).astype(np.float64)
    n_i = np.bincount(codes[~pos], minlength=k).astype(np.float64)
    i10, i01 = int(np.count_nonzero(m_i)), int(np.count_nonzero(n_i))
    if i10 < 2 or i01 < 2:
        raise DataError(
            "groups: the clustered DeLong needs positives in at least 2 patients and negatives in at "
            f"least 2; got positives in {i10} and negatives in {i01} of {k} patients."
        )
    big_m, big_n = m_i.sum(), n_i.sum()
    d10 = np.array([np.bincount(codes[pos], weights=v, minlength=k) for v in v10]) - np.outer(aucs, m_i)
    d01 = np.array([np.bincount(codes[~pos], weights=v, minlength=k) for v in v01]) - np.outer(aucs, n_i)
    s10 = i10 / ((i10 - 1) * big_m) * (d10 @ d10.T)
    s01 = i01 / ((i01 - 1) * big_n) * (d01 @ d01.T)
    s11 = k / (k - 1) * (d10 @ d01.T)
    return np.asarray(s10 / big_m + s01 / big_n + (s11 + s11.T) / (big_m * big_n))
