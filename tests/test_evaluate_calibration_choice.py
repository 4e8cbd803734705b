"""Calibration that helps: `choose_calibration` (auto and explicit) and the calibration panel's CIs.

Known answers come from simulated models whose miscalibration is set by construction: labels drawn
from softmax(z) make z calibrated; scaling z by 3 makes it overconfident (the ideal temperature is 3,
the calibration slope 1/3); adding a constant to the positive logit shifts the prior (temperature
cannot fix a shift, vector scaling can).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax as scipy_softmax

from pipeline.errors import ConfigError
from pipeline.evaluate import (
    WARNING_PHRASES,
    calibration_cis,
    calibration_slope_intercept,
    choose_calibration,
    ece,
    evaluation_summary,
)
from pipeline.evaluate.calibrate import patient_folds
from pipeline.report.fmt import note_level


def model(n: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Binary logits (N, 2) of a model whose true log-odds are z: reported as scale·z + shift."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.2, n)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(int)
    return np.column_stack([np.zeros(n), scale * z + shift]), y


def test_auto_fits_nothing_when_validation_is_too_small() -> None:
    z, y = model(400, seed=0, scale=3.0)
    keep = np.concatenate([np.flatnonzero(y == 1)[:12], np.flatnonzero(y == 0)[:100]])
    cal, choice = choose_calibration("auto", z[keep], y[keep])
    assert (choice.method, choice.smallest_class, choice.minimum, choice.n_val) == ("none", 12, 20, 112)
    assert "validation too small" in choice.reason and "12 image(s)" in choice.reason
    np.testing.assert_allclose(cal.transform(z), scipy_softmax(z, axis=1), atol=1e-12)


def test_auto_chooses_temperature_for_an_overconfident_model() -> None:
    z, y = model(1500, seed=1, scale=3.0)
    groups = np.arange(1500) // 3  # three images per patient
    cal, choice = choose_calibration("auto", z, y, groups)
    assert choice.method == "temperature"
    assert cal.temperature_ == pytest.approx(3.0, rel=0.15)
    assert choice.cv_nll["temperature"] < choice.cv_nll["none"]
    assert "lowered the out-of-fold validation NLL" in choice.reason


def test_auto_chooses_vector_scaling_for_a_shifted_model() -> None:
    z, y = model(3000, seed=2, shift=-1.5)  # calibrated slope, every risk underestimated
    _, choice = choose_calibration("auto", z, y)
    assert choice.method == "vector"
    assert choice.cv_nll["vector"] < choice.cv_nll["temperature"] < choice.cv_nll["none"]


def test_auto_keeps_softmax_for_a_calibrated_model_most_of_the_time() -> None:
    """Under the null (nothing to fix) a map is kept only when it beats softmax by > 1 SE: rarely, and then mildly."""
    chosen = []
    for seed in range(12):
        z, y = model(400, seed=100 + seed)
        cal, choice = choose_calibration("auto", z, y)
        chosen.append(choice.method)
        if choice.method == "temperature":
            assert 0.8 < cal.temperature_ < 1.25
    assert chosen.count("none") >= 9, chosen


def test_explicit_methods_are_fitted_but_flagged_when_undersized() -> None:
    z, y = model(60, seed=3, scale=3.0)
    cal, choice = choose_calibration("isotonic", z, y)
    assert (choice.method, choice.undersized, choice.minimum) == ("isotonic", True, 100)
    assert "may overfit" in choice.reason and cal.n_classes_ == 2
    z, y = model(600, seed=3, scale=3.0)
    _, big = choose_calibration("temperature", z, y)
    assert (big.method, big.undersized) == ("temperature", False)
    with pytest.raises(ConfigError, match=r"'isotonc'.*did you mean 'isotonic'.*auto"):
        choose_calibration("isotonc", z, y)


def test_patient_folds_keep_patients_together_and_stratify() -> None:
    rng = np.random.default_rng(4)
    codes = np.repeat(np.arange(103), rng.integers(1, 4, 103))
    label_of = (rng.random(103) < 0.2).astype(int)
    y = label_of[codes]
    folds = patient_folds(y, codes, k=5, seed=0)
    for p in range(103):
        assert len(set(folds[codes == p])) == 1
    for c in (0, 1):
        per_fold = np.bincount(folds[np.unique(codes[y == c], return_index=True)[1]], minlength=5)
        patients = np.bincount([folds[codes == p][0] for p in range(103) if label_of[p] == c], minlength=5)
        assert patients.max() - patients.min() <= 1, (c, patients, per_fold)
    np.testing.assert_array_equal(folds, patient_folds(y, codes, k=5, seed=0))


def test_calibration_panel_points_match_the_metrics_and_cis_cover_the_truth() -> None:
    z, y = model(600, seed=5, scale=3.0)
    groups = np.arange(600) // 2
    before = scipy_softmax(z, axis=1)
    after = scipy_softmax(z / 3.0, axis=1)  # the true model
    panel = calibration_cis(y, before, after, groups, n_boot=300, seed=0)
    assert panel["ece"]["before"]["value"] == pytest.approx(ece(before, y), abs=1e-12)
    assert panel["ece"]["diff"]["value"] == pytest.approx(ece(after, y) - ece(before, y), abs=1e-12)
    slope, intercept = calibration_slope_intercept(before[:, 1], y)
    assert panel["slope"]["before"]["value"] == pytest.approx(slope, abs=1e-12)
    assert panel["intercept"]["before"]["value"] == pytest.approx(intercept, abs=1e-12)
    low, high = panel["slope"]["before"]["ci"]
    assert low < 1 / 3 < high  # overconfident by 3: slope 1/3
    low, high = panel["slope"]["after"]["ci"]
    assert low < 1.0 < high
    low, high = panel["ece"]["diff"]["ci"]
    assert high < 0  # recalibrating to the true model clearly improves ECE
    assert calibration_cis(y, before, after, groups, n_boot=0)["ece"]["after"]["ci"] is None


def test_ece_worse_warning_only_when_the_ci_of_the_change_excludes_zero() -> None:
    """A calibration fitted on a different population (validation shifted, test not) makes test ECE worse."""
    zv, yv = model(800, seed=6, shift=-2.0)
    zt, yt = model(800, seed=7)  # test is calibrated as it is: the validation fit overshoots
    groups = np.arange(800)
    s = evaluation_summary(yv, zv, yt, zt, groups, n_boot=200, calibration="vector")
    assert s.metrics["calibration_worsened_ece"] == 1.0
    assert s.metrics["test_ece_change_ci_low"] > 0
    (text,) = [n for n in s.notes if "made test ECE worse" in n]
    assert note_level(text) == "warn"
    # same model on both splits: any change is sampling noise, so no warning even if the point is worse
    zv, yv = model(800, seed=8)
    s = evaluation_summary(yv, zv, yt, zt, groups, n_boot=200, calibration="temperature")
    assert s.metrics["calibration_worsened_ece"] == 0.0
    assert s.metrics["test_ece_change_ci_low"] <= 0 <= s.metrics["test_ece_change_ci_high"]
    assert not [n for n in s.notes if "made test ECE worse" in n]


def test_summary_records_the_choice_and_warns_on_undersized_explicit_fits() -> None:
    zv, yv = model(30, seed=9, scale=3.0)  # about 13 images in the rarest class
    zt, yt = model(300, seed=10, scale=3.0)
    s = evaluation_summary(yv, zv, yt, zt, np.arange(300), n_boot=50, calibration="temperature")
    assert s.calibration is not None and s.calibration.undersized
    assert s.metrics["calibration_undersized"] == 1.0
    (text,) = [n for n in s.notes if n.startswith("calibration: ")]
    assert any(p in text for p in WARNING_PHRASES) and note_level(text) == "warn"
    auto = evaluation_summary(yv, zv, yt, zt, np.arange(300), n_boot=50)
    assert auto.calibration is not None and auto.calibration.method == "none"
    np.testing.assert_allclose(auto.probs_test, scipy_softmax(zt, axis=1), atol=1e-12)
    assert auto.metrics["test_ece"] == auto.metrics["test_ece_uncalibrated"]
    assert auto.metrics["calibration_undersized"] == 0.0
