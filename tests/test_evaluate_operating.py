"""Operating points with uncertainty: patient-bootstrap CIs at frozen thresholds, missed targets, shared thresholds."""

from __future__ import annotations

import re

import numpy as np
import pytest

import pipeline.evaluate as M

MLFLOW_SAFE = re.compile(r"^[/\w.\- ]*$")
RATES = ("sensitivity", "specificity", "ppv", "npv")


def _logits(p: np.ndarray) -> np.ndarray:
    """Two-class logits whose softmax gives P(class 1) = p (calibration="none" keeps it)."""
    return np.column_stack([np.zeros(len(p)), np.log(p / (1 - p))])


def _case(n_pos: int, n_hit: int, n_neg: int = 200, images: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test data: `n_hit` of `n_pos` positive patients score 0.8 (above the val threshold ~0.55), the rest 0.3.

    Negatives spread over (0.01, 0.5); each patient has `images` identical images.
    """
    p = np.concatenate([np.full(n_hit, 0.8), np.full(n_pos - n_hit, 0.3), np.linspace(0.01, 0.5, n_neg)])
    y = np.concatenate([np.ones(n_pos, int), np.zeros(n_neg, int)])
    groups = np.arange(len(y)).astype(str)
    return np.repeat(y, images), np.repeat(p, images), np.repeat(groups, images)


def _val() -> tuple[np.ndarray, np.ndarray]:
    """Validation: 200 positives evenly over [0.5, 0.99] (sensitivity@0.90 → threshold ~0.55), 200 negatives."""
    p = np.concatenate([np.linspace(0.5, 0.99, 200), np.linspace(0.01, 0.6, 200)])
    return np.concatenate([np.ones(200, int), np.zeros(200, int)]), p


def _summary(test, rules=("sensitivity@0.90",), n_boot=200, val=None):
    yv, pv = val or _val()
    yt, pt, gt = test
    return M.evaluation_summary(
        yv, _logits(pv), yt, _logits(pt), gt, operating_points=rules, n_boot=n_boot, seed=3, calibration="none"
    )


def test_threshold_cis_contain_the_point_and_are_reproducible() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.35 * y + 0.65 * rng.random(300), 0, 1)
    groups = np.arange(300) // 3
    point = M.at_threshold(y, p, 0.5)
    cis = M.threshold_cis(y, p, groups, 0.5, n_boot=300, seed=7)
    for k in RATES:
        low, high = cis[k]
        assert low <= point[k] <= high and high - low < 0.3, k
    assert M.threshold_cis(y, p, groups, 0.5, n_boot=300, seed=7) == cis
    assert M.threshold_cis(y, p, groups, 0.5, n_boot=300, seed=8) != cis
    none = M.threshold_cis(y, p, groups, 1.01, n_boot=50, seed=7)  # nothing called positive
    assert none["ppv"] is None and none["sensitivity"] == [0.0, 0.0]
    assert M.threshold_cis(y, p, groups, 0.5, n_boot=0) == dict.fromkeys(RATES)


def test_threshold_cis_resample_patients_not_images() -> None:
    """Every image of every patient twice: the same patient draws, so exactly the same CIs."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120)
    p = np.clip(0.3 * y + 0.7 * rng.random(120), 0, 1)
    groups = np.array([f"p{i}" for i in range(120)])
    once = M.threshold_cis(y, p, groups, 0.5, n_boot=200, seed=0)
    twice = M.threshold_cis(np.repeat(y, 2), np.repeat(p, 2), np.repeat(groups, 2), 0.5, n_boot=200, seed=0)
    assert twice == once
    by_image = M.threshold_cis(np.repeat(y, 2), np.repeat(p, 2), np.arange(240), 0.5, n_boot=200, seed=0)
    width = lambda c: c[1] - c[0]  # noqa: E731
    assert width(by_image["sensitivity"]) < width(once["sensitivity"])  # images as independent: too narrow


def test_summary_stores_cis_and_flat_metrics_with_the_auroc_seed() -> None:
    test = _case(100, 80)
    out = _summary(test, rules=("youden", "sensitivity@0.90"))
    m = out.metrics
    op = out.operating_points[1]
    cis = M.threshold_cis(test[0], test[1], test[2], op["threshold"], n_boot=200, seed=3)
    for k in RATES:
        assert op["test"][f"{k}_ci"] == cis[k]
        assert m[f"test_{k}__sensitivity_at_0.90_ci_low"] == cis[k][0]
        assert m[f"test_{k}__sensitivity_at_0.90_ci_high"] == cis[k][1]
        assert m[f"test_{k}_ci_low"] == out.operating_points[0]["test"][f"{k}_ci"][0]  # the first rule, unprefixed
    assert "target_missed__youden" not in m
    assert all(MLFLOW_SAFE.match(k) for k in m)


def test_missed_target_with_a_tight_ci_is_noted_and_flagged() -> None:
    out = _summary(_case(200, 120))  # test sensitivity 0.60 over 200 positive patients
    op = out.operating_points[0]
    assert op["val"]["sensitivity"] >= 0.90 and op["test"]["sensitivity"] == pytest.approx(0.60)
    low, high = op["test"]["sensitivity_ci"]
    assert low < 0.60 < high < 0.70
    assert out.metrics["target_missed__sensitivity_at_0.90"] == 1.0
    (text,) = [n for n in out.notes if M.MISSED_TARGET in n]
    expected = f"sensitivity@0.90: test sensitivity 0.60 (95% CI {low:.2f}–{high:.2f}) misses the target 0.90"
    assert text.startswith(expected)


def test_point_below_target_with_a_wide_ci_is_not_a_miss() -> None:
    out = _summary(_case(25, 22))  # 0.88 over 25 positive patients: the CI reaches 0.90
    op = out.operating_points[0]
    assert op["test"]["sensitivity"] == pytest.approx(0.88)
    assert op["test"]["sensitivity_ci"][1] >= 0.90
    assert out.metrics["target_missed__sensitivity_at_0.90"] == 0.0
    assert out.notes == []


def test_rules_sharing_a_threshold_are_named() -> None:
    """Separable validation: youden, sensitivity@1.0 and specificity@1.0 all pick the lowest positive score."""
    val = (np.array([1] * 50 + [0] * 50), np.concatenate([np.linspace(0.6, 0.9, 50), np.linspace(0.1, 0.4, 50)]))
    out = _summary(_case(50, 40), rules=("youden", "sensitivity@1.0", "specificity@1.0", "sensitivity@0.5"), val=val)
    shared = [n for n in out.notes if "same threshold" in n]
    assert shared == [
        "rules youden, sensitivity@1.0, specificity@1.0 chose the same threshold 0.600 on validation: "
        "their test operating points are identical"
    ]


def test_no_bootstrap_gives_no_cis_and_no_crash() -> None:
    out = _summary(_case(200, 120), n_boot=0)
    assert out.operating_points[0]["test"]["sensitivity_ci"] is None
    assert not any("_ci_" in k or k.startswith("target_missed") for k in out.metrics)
    assert "test_auroc" in out.metrics and out.notes == []


def test_deployed_decision_metrics_are_at_the_first_rules_threshold() -> None:
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score

    rng = np.random.default_rng(11)
    yv, yt = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    pv = np.clip(0.15 + 0.5 * yv + rng.normal(0, 0.2, 300), 0.01, 0.99)
    pt = np.clip(0.15 + 0.5 * yt + rng.normal(0, 0.2, 300), 0.01, 0.99)
    out = M.evaluation_summary(
        yv,
        _logits(pv),
        yt,
        _logits(pt),
        np.arange(300),
        operating_points=["sensitivity@0.95", "youden"],
        n_boot=0,
        calibration="none",
    )
    dep = out.discrimination["deployed"]
    thr = out.operating_points[0]["threshold"]
    assert dep["rule"] == "sensitivity@0.95" and dep["threshold"] == thr != 0.5
    pred = (pt >= thr).astype(int)
    assert dep["confusion_matrix"] == confusion_matrix(yt, pred).tolist()
    assert dep["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(yt, pred), abs=1e-12)
    assert out.metrics["test_f1_at_threshold"] == pytest.approx(f1_score(yt, pred), abs=1e-12)
    assert out.metrics["test_accuracy_at_threshold"] == pytest.approx(np.mean(pred == yt), abs=1e-12)
    assert out.discrimination["confusion_matrix"] == confusion_matrix(yt, (pt >= 0.5).astype(int)).tolist()


def test_confounded_subgroup_attributes_are_named() -> None:
    """site and manufacturer split the test images identically: one note; sex crosses them: none for sex."""
    rng = np.random.default_rng(12)
    yv, yt = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    pv, pt = (np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, 200), 0.01, 0.99) for y in (yv, yt))
    site = rng.choice(["site-A", "site-B", "site-C"], 200)
    maker = np.array([{"site-A": "GE", "site-B": "Philips", "site-C": "SIEMENS"}[s] for s in site])
    sex = rng.choice(["F", "M"], 200)
    out = M.evaluation_summary(
        yv,
        _logits(pv),
        yt,
        _logits(pt),
        np.arange(200),
        n_boot=0,
        calibration="none",
        subgroups={"sex": sex, "site": site, "manufacturer": maker},
    )
    (text,) = [n for n in out.notes if M.CONFOUNDED in n]
    assert text.startswith("subgroups site and manufacturer are confounded on test")
    assert "site-A = GE, site-B = Philips, site-C = SIEMENS" in text
    maker[0] = "Philips" if site[0] == "site-A" else "GE"  # one image breaks the one-to-one map
    out = M.evaluation_summary(
        yv,
        _logits(pv),
        yt,
        _logits(pt),
        np.arange(200),
        n_boot=0,
        calibration="none",
        subgroups={"site": site, "manufacturer": maker},
    )
    assert not [n for n in out.notes if M.CONFOUNDED in n]
