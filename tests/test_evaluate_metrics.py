"""Tests for pipeline.evaluate (metrics, uncertainty, summary): known answers, scikit-learn agreement, DeLong."""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy import stats
from scipy.special import expit, softmax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    roc_auc_score,
)

import pipeline.evaluate as M
from pipeline.errors import ConfigError, DataError

MLFLOW_SAFE = re.compile(r"^[/\w.\- ]*$")  # mlflow.utils.validation (Windows form, the strictest)


def random_probs(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + 1.2 * np.eye(n_classes)[y]
    return softmax(logits, axis=1), y


# ---------------------------------------------------------------- against scikit-learn
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_match_sklearn(seed: int) -> None:
    p, y = random_probs(300, 2, seed)
    d = M.discrimination(y, p)
    pred = p.argmax(axis=1)
    assert d["auroc"] == pytest.approx(roc_auc_score(y, p[:, 1]), abs=1e-12)
    assert d["auprc"] == pytest.approx(average_precision_score(y, p[:, 1]), abs=1e-12)
    assert d["accuracy"] == pytest.approx(np.mean(pred == y))
    assert d["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert d["f1"] == pytest.approx(f1_score(y, pred))
    assert d["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    # the headline Brier is sklearn's one-column Brier; the two-class sum is twice it, under its own name
    assert M.brier(p, y) == pytest.approx(brier_score_loss(y, p[:, 1]), abs=1e-12)
    assert M.brier_sum_over_classes(p, y) == pytest.approx(2 * brier_score_loss(y, p[:, 1]), abs=1e-12)
    assert M.brier(p[:, 1], y) == pytest.approx(M.brier(p, y))  # 1-D binary input accepted
    prevalence = np.mean(y)
    assert M.scaled_brier(p, y) == pytest.approx(1 - brier_score_loss(y, p[:, 1]) / (prevalence * (1 - prevalence)))
    assert M.scaled_brier(np.full(len(y), prevalence), y) == pytest.approx(0.0, abs=1e-12)  # the prevalence: 0
    assert M.nll(p, y) == pytest.approx(log_loss(y, p), abs=1e-12)


def test_multiclass_metrics_match_sklearn() -> None:
    p, y = random_probs(400, 4, seed=3)
    d = M.discrimination(y, p)
    pred = p.argmax(axis=1)
    assert d["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    onehot = np.eye(4)[y]
    assert d["auprc"] == pytest.approx(average_precision_score(onehot, p, average="macro"))
    per = roc_auc_score(onehot, p, average=None)
    np.testing.assert_allclose(d["auroc_per_class"], per)
    assert d["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert d["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert d["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    assert M.nll(p, y) == pytest.approx(log_loss(y, p))
    assert M.brier(p, y) == pytest.approx(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def test_auroc_handles_ties_like_sklearn_and_one_class_is_undefined() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 200)
    score = np.round(rng.random(200) + 0.3 * y, 1)  # many ties
    assert M.auroc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert M.auroc(np.zeros(5, dtype=int), np.linspace(0, 1, 5)) is None


# ---------------------------------------------------------------- calibration known answers
# five binary predictions: confidence (max prob), and whether arg-max is correct
#   0.90 ok, 0.88 ok -> bin (13/15, 14/15]: acc 1, conf 0.89, gap 0.11, weight 2/5
#   0.82 wrong       -> bin (12/15, 13/15]: gap 0.82
#   0.62 ok          -> bin ( 9/15, 10/15]: gap 0.38
#   0.55 wrong       -> bin ( 8/15,  9/15]: gap 0.55
KNOWN_P1 = np.array([0.90, 0.88, 0.18, 0.38, 0.55])
KNOWN_Y = np.array([1, 1, 1, 0, 0])


def test_ece_and_mce_hand_computed() -> None:
    probs = np.column_stack([1 - KNOWN_P1, KNOWN_P1])
    assert M.ece(probs, KNOWN_Y) == pytest.approx((2 * 0.11 + 0.82 + 0.38 + 0.55) / 5)  # 0.394
    assert M.mce(probs, KNOWN_Y) == pytest.approx(0.82)
    # a single bin: |mean accuracy − mean confidence| = |3/5 − 3.77/5|
    assert M.ece(probs, KNOWN_Y, n_bins=1) == pytest.approx(0.154)
    table = M.reliability_bins(probs, KNOWN_Y)
    assert table["count"].tolist() == [0] * 8 + [1, 1, 0, 0, 1, 2, 0]
    assert table["accuracy"][13] == 1.0
    assert table["confidence"][13] == pytest.approx(0.89)


def test_ece_is_zero_for_perfectly_calibrated_bins_and_bins_are_right_closed() -> None:
    # ten predictions of confidence exactly 1.0, all correct: last bin, gap 0
    assert M.ece(np.tile([0.0, 1.0], (10, 1)), np.ones(10, dtype=int)) == 0.0
    # confidence 0.7 in 1 bin of width 1 with 7/10 correct -> ECE 0
    probs = np.tile([0.3, 0.7], (10, 1))
    y = np.array([1] * 7 + [0] * 3)
    assert M.ece(probs, y, n_bins=1) == pytest.approx(0.0, abs=1e-12)
    # a confidence on an edge belongs to the bin below it: 0.5 with 2 bins is in (0, 0.5]
    edge = M.reliability_bins(np.array([[0.5, 0.5], [0.2, 0.8]]), np.array([0, 1]), n_bins=2)
    assert edge["count"].tolist() == [1, 1]


def test_classwise_ece_matches_a_loop() -> None:
    p, y = random_probs(500, 3, seed=8)
    expected = []
    for c in range(3):
        total = 0.0
        for b in range(15):
            lo, hi = b / 15, (b + 1) / 15
            in_bin = (p[:, c] > lo) & (p[:, c] <= hi) if b else (p[:, c] <= hi)
            if in_bin.any():
                total += in_bin.sum() * abs(np.mean(y[in_bin] == c) - p[in_bin, c].mean())
        expected.append(total / len(y))
    assert M.classwise_ece(p, y) == pytest.approx(np.mean(expected), abs=1e-12)


def test_calibration_slope_and_intercept() -> None:
    rng = np.random.default_rng(9)
    lp = rng.normal(0, 2, 40000)
    p = expit(lp)
    # outcomes generated from a model whose true slope is 0.5 (the predictions are overconfident)
    y = (rng.random(lp.size) < expit(0.5 * lp)).astype(int)
    slope, _ = M.calibration_slope_intercept(p, y)
    assert slope == pytest.approx(0.5, abs=0.03)
    ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(lp[:, None], y)
    assert slope == pytest.approx(ref.coef_[0, 0], abs=1e-6)
    # outcomes from risks shifted by +0.7 on the logit scale: intercept (slope fixed at 1) ≈ 0.7
    y2 = (rng.random(lp.size) < expit(0.7 + lp)).astype(int)
    slope2, intercept2 = M.calibration_slope_intercept(p, y2)
    assert intercept2 == pytest.approx(0.7, abs=0.05)
    assert slope2 == pytest.approx(1.0, abs=0.05)


# ---------------------------------------------------------------- operating points
# negatives 0.1 0.2 0.3 0.35 0.6 ; positives 0.4 0.7 0.8 0.9
OP_Y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
OP_P = np.array([0.1, 0.2, 0.3, 0.35, 0.6, 0.4, 0.7, 0.8, 0.9])


def test_youden_known_example() -> None:
    # t=0.4: sens 4/4, spec 4/5 -> J 0.80 (best); t=0.7: sens 3/4, spec 1 -> J 0.75
    assert M.choose_operating_point(OP_Y, OP_P, "youden") == pytest.approx(0.4)
    op = M.at_threshold(OP_Y, OP_P, 0.4)
    assert (op["tp"], op["fp"], op["tn"], op["fn"]) == (4, 1, 4, 0)
    assert op["sensitivity"] == 1.0
    assert op["specificity"] == pytest.approx(0.8)
    assert op["ppv"] == pytest.approx(0.8)
    assert op["npv"] == 1.0


def test_sensitivity_and_specificity_rules_known_example() -> None:
    assert M.choose_operating_point(OP_Y, OP_P, "sensitivity@0.75") == pytest.approx(0.7)
    assert M.choose_operating_point(OP_Y, OP_P, "sensitivity@0.9") == pytest.approx(0.4)
    assert M.choose_operating_point(OP_Y, OP_P, "specificity@0.8") == pytest.approx(0.4)
    assert M.choose_operating_point(OP_Y, OP_P, "specificity@1.0") == pytest.approx(0.7)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sensitivity_rule_meets_target_with_best_specificity(seed: int) -> None:
    p, y = random_probs(300, 2, seed)
    thr = M.choose_operating_point(y, p[:, 1], "sensitivity@0.90")
    assert M.at_threshold(y, p[:, 1], thr)["sensitivity"] >= 0.90
    higher = np.min(p[:, 1][p[:, 1] > thr])  # the next stricter threshold misses the target
    assert M.at_threshold(y, p[:, 1], higher)["sensitivity"] < 0.90
    thr_s = M.choose_operating_point(y, p[:, 1], "specificity@0.95")
    assert M.at_threshold(y, p[:, 1], thr_s)["specificity"] >= 0.95
    lower = np.max(p[:, 1][p[:, 1] < thr_s])
    assert M.at_threshold(y, p[:, 1], lower)["specificity"] < 0.95


def test_at_threshold_matches_confusion_matrix_and_undefined_is_none() -> None:
    p, y = random_probs(200, 2, seed=5)
    op = M.at_threshold(y, p[:, 1], 0.3)
    tn, fp, fn, tp = confusion_matrix(y, (p[:, 1] >= 0.3).astype(int)).ravel()
    assert (op["tn"], op["fp"], op["fn"], op["tp"]) == (tn, fp, fn, tp)
    assert M.at_threshold(y, p[:, 1], 1.5)["ppv"] is None  # nothing called positive


@pytest.mark.parametrize(
    ("rule", "match"),
    [
        ("sensitivty@0.90", r"unknown rule 'sensitivty@0.90' \(did you mean 'sensitivity@0.90'\?\)"),
        ("yuoden", r"did you mean 'youden'"),
        ("f1", r"expected 'youden', 'sensitivity@<target>'"),
        ("sensitivity@90", r"fraction in \(0, 1\], e.g. sensitivity@0.90"),
        ("specificity@", r"unknown rule"),
    ],
)
def test_unknown_rule_is_config_error_with_hint(rule: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        M.choose_operating_point(OP_Y, OP_P, rule)


def test_operating_point_needs_both_classes() -> None:
    with pytest.raises(DataError, match="needs both classes"):
        M.choose_operating_point(np.zeros(4, dtype=int), np.linspace(0, 1, 4), "youden")


# ---------------------------------------------------------------- bootstrap
def patient_cohort(n_patients: int, copies: int, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_patients)
    prob = expit(rng.normal(size=n_patients) + 1.0 * (2 * y - 1))
    ids = np.array([f"pt{i:03d}" for i in range(n_patients)])
    return np.repeat(y, copies), np.repeat(prob, copies), np.repeat(ids, copies)


def test_bootstrap_resamples_patients_not_images() -> None:
    y1, p1, g1 = patient_cohort(80, copies=1, seed=0)
    y20, p20, g20 = patient_cohort(80, copies=20, seed=0)  # same patients, each image 20 times
    single = M.bootstrap_ci("auroc", y1, p1, g1, n_boot=300, seed=1)
    by_patient = M.bootstrap_ci("auroc", y20, p20, g20, n_boot=300, seed=1)
    by_image = M.bootstrap_ci("auroc", y20, p20, np.arange(len(y20)), n_boot=300, seed=1)
    # AUROC does not change when every drawn patient brings 20 identical images: the
    # patient-level CI is exactly the one of the one-image-per-patient cohort ...
    np.testing.assert_allclose(by_patient, single, atol=1e-12)
    # ... while image-level resampling pretends to have 20x the data and shrinks the CI ~4.5x
    width = single[2] - single[1]
    assert by_image[2] - by_image[1] < 0.4 * width
    assert single[1] < single[0] < single[2]


def test_bootstrap_is_seeded() -> None:
    y, p, g = patient_cohort(60, copies=3, seed=2)
    a = M.bootstrap_ci(M.auroc, y, p, g, n_boot=100, seed=7)
    assert a == M.bootstrap_ci(M.auroc, y, p, g, n_boot=100, seed=7)
    assert a != M.bootstrap_ci(M.auroc, y, p, g, n_boot=100, seed=8)


def test_bootstrap_skips_resamples_with_one_class() -> None:
    y = np.array([1, 1] + [0] * 10)
    p = np.linspace(0.05, 0.95, 12)[::-1]
    seen: list[int] = []

    def metric(yy: np.ndarray, pp: np.ndarray) -> float | None:
        seen.append(len(np.unique(yy)))
        return M.auroc(yy, pp)

    point, low, high = M.bootstrap_ci(metric, y, p, np.arange(12), n_boot=200, seed=0)
    assert set(seen) == {2}  # the metric never saw a single-class resample
    assert 1 + 50 < len(seen) < 1 + 200  # some resamples were skipped, most were kept
    assert low <= point <= high == 1.0


def test_bootstrap_bad_inputs() -> None:
    with pytest.raises(DataError, match="one patient id per row"):
        M.bootstrap_ci("auroc", OP_Y, OP_P, ["a", "b"])
    with pytest.raises(ConfigError, match="did you mean 'auroc'"):
        M.bootstrap_ci("aucroc", OP_Y, OP_P, np.arange(9))
    with pytest.raises(DataError, match="undefined on the full data"):
        M.bootstrap_ci("auroc", np.zeros(5, dtype=int), np.linspace(0, 1, 5), np.arange(5))


# ---------------------------------------------------------------- DeLong
def delong_brute_force(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong 1988 by the definition: O(m·n) placement values with psi = 1, 1/2, 0."""
    v10, v01 = [], []
    for s in (a, b):
        x, w = s[y == 1], s[y == 0]
        psi = (x[:, None] > w[None, :]) + 0.5 * (x[:, None] == w[None, :])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    s10, s01 = np.cov(v10), np.cov(v01)
    m, n = len(v10[0]), len(v01[0])
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    z = (v10[0].mean() - v10[1].mean()) / np.sqrt(var)
    return float(z), float(2 * stats.norm.sf(abs(z)))


@pytest.mark.parametrize("seed", [0, 1])
def test_delong_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 150)
    a = np.round(rng.normal(size=150) + 1.0 * y, 1)  # rounded: ties within and across classes
    b = np.round(0.6 * a + rng.normal(size=150) + 0.3 * y, 1)
    result = M.delong_test(y, a, b)
    z, p = delong_brute_force(y, a, b)
    assert result["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert result["auc_b"] == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert result["z"] == pytest.approx(z, rel=1e-9)
    assert result["p"] == pytest.approx(p, rel=1e-9)
    assert result["ci_low"] < result["diff"] < result["ci_high"]


def test_delong_identical_models_and_too_few_cases() -> None:
    p, y = random_probs(100, 2, seed=4)
    same = M.delong_test(y, p[:, 1], p[:, 1])
    assert (same["diff"], same["z"], same["p"]) == (0.0, 0.0, 1.0)
    with pytest.raises(DataError, match="at least 2 positives"):
        M.delong_test(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.3]), np.array([0.3, 0.2, 0.1]))


def test_paired_bootstrap_detects_a_better_model_and_is_seeded() -> None:
    y, good, g = patient_cohort(120, copies=2, seed=5)
    rng = np.random.default_rng(0)
    noise = rng.random(len(y))
    res = M.paired_bootstrap(y, noise, good, g, n_boot=300, seed=3)
    assert res["metric"] == "auroc"
    assert res["value_b"] > res["value_a"]
    assert res["diff"] == pytest.approx(res["value_a"] - res["value_b"])
    assert res["ci_high"] < 0
    assert res["p"] < 0.01
    assert res == M.paired_bootstrap(y, noise, good, g, n_boot=300, seed=3)


# ---------------------------------------------------------------- subgroups and summary
def test_subgroup_metrics_flags_small_groups() -> None:
    y, p, g = patient_cohort(200, copies=1, seed=6)
    site = np.where(np.arange(200) < 185, "A", "B")  # B: 15 cases, so < 10 of one class
    sex = np.array(["F", "M"] * 100, dtype=object)
    sex[:3] = None
    rows = M.subgroup_metrics(y, p, g, {"site": site, "sex": sex}, threshold=0.5, n_boot=50)
    by = {(r["attribute"], r["value"]): r for r in rows}
    assert set(by) == {("site", "A"), ("site", "B"), ("sex", "F"), ("sex", "M"), ("sex", "missing")}
    b = by[("site", "B")]
    assert b["n"] == 15
    assert min(b["n_pos"], 15 - b["n_pos"]) < 10
    assert b["too_few"] is True
    assert b["auroc"] is None
    assert b["ci_low"] is None
    assert b["sensitivity"] is not None  # counts and rates are still reported
    a = by[("site", "A")]
    assert a["too_few"] is False
    assert a["auroc"] == pytest.approx(roc_auc_score(y[:185], p[:185]))
    assert a["ci_low"] <= a["auroc"] <= a["ci_high"]
    assert a["prevalence"] == pytest.approx(y[:185].mean())
    assert by[("sex", "missing")]["n"] == 3


def overconfident_logits(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, n_classes))
    y = (rng.random(n)[:, None] > np.cumsum(softmax(z, axis=1), axis=1)).sum(axis=1)
    return 5.0 * z, y


def test_evaluation_summary_binary() -> None:
    zv, yv = overconfident_logits(3000, 2, seed=0)
    zt, yt = overconfident_logits(1000, 2, seed=1)
    groups = np.array([f"p{i // 2}" for i in range(1000)])
    sex = np.where(np.arange(1000) % 2 == 0, "F", "M")
    site = np.where(np.arange(1000) < 990, "north", "tiny site")
    out = M.evaluation_summary(
        yv,
        zv,
        yt,
        zt,
        groups,
        operating_points=("youden", "sensitivity@0.90"),
        n_boot=100,
        subgroups={"sex": sex, "site": site},
    )
    m = out.metrics
    assert out.temperature == pytest.approx(5.0, rel=0.1) == m["temperature"]
    assert m["test_ece"] < m["test_ece_uncalibrated"]
    assert m["test_auroc"] == pytest.approx(roc_auc_score(yt, zt[:, 1] - zt[:, 0]))
    assert m["test_auroc_ci_low"] < m["test_auroc"] < m["test_auroc_ci_high"]
    first = out.operating_points[0]
    assert first["rule"] == "youden"
    assert m["test_sensitivity"] == first["test"]["sensitivity"]
    assert out.operating_points[1]["val"]["sensitivity"] >= 0.90
    assert "test_auroc__sex.F" in m
    assert "test_auroc__site.north" in m
    assert not any("tiny" in k for k in m)  # too_few groups get no metric
    assert all(MLFLOW_SAFE.match(k) for k in m), [k for k in m if not MLFLOW_SAFE.match(k)]
    assert all(isinstance(v, float) for v in m.values())
    for key in (
        "test_auprc",
        "test_specificity",
        "test_ppv",
        "test_npv",
        "test_mce",
        "test_brier",
        "test_nll",
        "test_accuracy",
        "test_balanced_accuracy",
        "val_auroc",
    ):
        assert key in m
    assert out.reliability["after"]["ece"] == pytest.approx(m["test_ece"])


def test_evaluation_summary_multiclass_and_bad_config() -> None:
    zv, yv = overconfident_logits(1500, 3, seed=2)
    zt, yt = overconfident_logits(600, 3, seed=3)
    groups = np.arange(600).astype(str)
    out = M.evaluation_summary(yv, zv, yt, zt, groups, n_boot=50, operating_points=("youden",))
    # ranking metrics use the uncalibrated softmax (multi-class temperature scaling changes OvR rankings)
    expected = roc_auc_score(yt, out.probs_test_uncalibrated, multi_class="ovr", average="macro")
    assert out.metrics["test_auroc"] == pytest.approx(expected)
    assert out.operating_points == []
    assert "binary tasks only" in out.notes[0]
    assert "test_sensitivity" not in out.metrics
    with pytest.raises(ConfigError, match="did you mean 'isotonic'"):
        M.evaluation_summary(yv, zv, yt, zt, groups, calibration="isotonc")
    with pytest.raises(ConfigError, match="did you mean 'youden'"):
        M.evaluation_summary(yv, zv, yt, zt, groups, operating_points=("yuoden",))


def _failing_validation(seed: int) -> tuple[np.ndarray, ...]:
    """A model that ranks test well but whose validation split is anti-correlated with it (no signal)."""
    rng = np.random.default_rng(seed)
    yv, yt = rng.integers(0, 2, 80), rng.integers(0, 2, 120)
    zv = np.column_stack([np.zeros(80), -2.0 * (yv - 0.5) + rng.normal(0, 1, 80)])  # inverted on val
    zt = np.column_stack([np.zeros(120), 2.0 * (yt - 0.5) + rng.normal(0, 1, 120)])
    return yv, zv, yt, zt, np.arange(120).astype(str)


@pytest.mark.parametrize("calibration", ["temperature", "isotonic", "vector", "none"])
def test_calibration_never_destroys_ranking(calibration: str) -> None:
    """Regression: an isotonic map fitted on a signal-less val split is constant, so test AUROC read 0.500."""
    yv, zv, yt, zt, groups = _failing_validation(seed=4)
    out = M.evaluation_summary(yv, zv, yt, zt, groups, n_boot=50, calibration=calibration)
    raw_auroc = roc_auc_score(yt, zt[:, 1])
    assert out.metrics["test_auroc"] == pytest.approx(raw_auroc, abs=1e-12)
    assert out.metrics["test_auroc"] > 0.8
    assert out.metrics["test_auroc_ci_low"] <= raw_auroc <= out.metrics["test_auroc_ci_high"]
    assert out.metrics["val_signal_absent"] == 1.0
    assert any("no ranking signal" in n for n in out.notes)


def test_flattened_calibration_is_flagged_and_the_temperature_is_bounded() -> None:
    yv, zv, yt, zt, groups = _failing_validation(seed=4)
    iso = M.evaluation_summary(yv, zv, yt, zt, groups, n_boot=20, calibration="isotonic")
    assert np.ptp(iso.probs_test[:, 1]) < 0.05  # the map is (nearly) constant: the old headline was 0.5
    assert iso.metrics["calibration_flattened"] == 1.0
    assert any("calibration flattened the output" in n for n in iso.notes)
    temp = M.evaluation_summary(yv, zv, yt, zt, groups, n_boot=20, calibration="temperature")
    assert temp.temperature == pytest.approx(20.0)  # runs to its bound instead of 1000
    healthy = M.evaluation_summary(*_healthy(), n_boot=20, calibration="temperature")
    assert healthy.metrics["calibration_flattened"] == 0.0 and healthy.metrics["val_signal_absent"] == 0.0
    assert healthy.notes == []


def _healthy() -> tuple[np.ndarray, ...]:
    zv, yv = overconfident_logits(400, 2, seed=5)
    zt, yt = overconfident_logits(300, 2, seed=6)
    return yv, zv, yt, zt, np.arange(300).astype(str)
