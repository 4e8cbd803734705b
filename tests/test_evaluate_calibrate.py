"""Tests for pipeline.evaluate.calibrate: temperature, vector and isotonic scaling."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax as scipy_softmax

from pipeline.errors import ConfigError, DataError
from pipeline.evaluate.calibrate import (
    IsotonicCalibrator,
    TemperatureScaler,
    VectorScaler,
    make_calibrator,
    softmax,
)
from pipeline.evaluate.metrics import classwise_ece, ece, nll


def calibrated_logits(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a perfectly calibrated model: labels are drawn from softmax(logits)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, n_classes))
    p = scipy_softmax(z, axis=1)
    y = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return z, y


def test_softmax_matches_scipy_and_is_stable() -> None:
    z = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, -1000.0]])
    p = softmax(z)
    np.testing.assert_allclose(p, scipy_softmax(z, axis=1), rtol=1e-12)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[1], [0.5, 0.5, 0.0], atol=1e-12)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_temperature_recovers_overconfidence_factor(n_classes: int) -> None:
    z, y = calibrated_logits(20000, n_classes, seed=n_classes)
    overconfident = 5.0 * z
    scaler = TemperatureScaler().fit(overconfident, y)
    assert scaler.temperature_ == pytest.approx(5.0, rel=0.08)
    calibrated = scaler.transform(overconfident)
    raw = softmax(overconfident)
    assert ece(calibrated, y) < 0.02 < 0.1 < ece(raw, y)
    assert nll(calibrated, y) < nll(raw, y)
    assert scaler.nll_after_ < scaler.nll_before_
    # dividing by T > 0 never changes the arg-max: accuracy is unchanged, row for row
    np.testing.assert_array_equal(calibrated.argmax(axis=1), overconfident.argmax(axis=1))


def test_temperature_of_a_calibrated_model_is_about_one() -> None:
    z, y = calibrated_logits(20000, 3, seed=7)
    assert TemperatureScaler().fit(z, y).temperature_ == pytest.approx(1.0, abs=0.06)


def test_temperature_fit_is_deterministic_and_underconfidence_gives_t_below_one() -> None:
    z, y = calibrated_logits(5000, 2, seed=11)
    t1 = TemperatureScaler().fit(z / 3.0, y).temperature_
    t2 = TemperatureScaler().fit(z / 3.0, y).temperature_
    assert t1 == t2
    assert t1 == pytest.approx(1 / 3.0, rel=0.1)


def test_vector_scaler_learns_per_class_scale() -> None:
    z, y = calibrated_logits(20000, 3, seed=3)
    scaler = VectorScaler().fit(4.0 * z, y)
    # softmax is shift-invariant, so compare the scale; the bias is only defined up to a constant
    np.testing.assert_allclose(scaler.scale_, 0.25, atol=0.03)
    b = scaler.bias_ - scaler.bias_.mean()
    np.testing.assert_allclose(b, 0.0, atol=0.05)
    assert ece(scaler.transform(4.0 * z), y) < 0.02


def test_isotonic_binary_calibrates_and_is_monotone() -> None:
    z, y = calibrated_logits(4000, 2, seed=5)
    cal = IsotonicCalibrator().fit(5.0 * z, y)
    p = cal.transform(5.0 * z)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert ece(p, y) < 0.03 < ece(softmax(5.0 * z), y)
    order = np.argsort(softmax(5.0 * z)[:, 1])
    assert np.all(np.diff(p[order, 1]) >= -1e-12)


def test_isotonic_multiclass_rows_sum_to_one() -> None:
    z, y = calibrated_logits(3000, 4, seed=6)
    p = IsotonicCalibrator().fit(3.0 * z, y).transform(3.0 * z)
    assert p.shape == (3000, 4)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert ece(p, y) < ece(softmax(3.0 * z), y)


def test_transform_before_fit_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"not fitted: call fit\(logits_val, y_val\)"):
        TemperatureScaler().transform(np.zeros((3, 2)))


@pytest.mark.parametrize(
    ("logits", "y", "match"),
    [
        (np.zeros(5), np.zeros(5, dtype=int), r"shaped \(N, C\).*got shape \(5,\)"),
        (np.zeros((5, 1)), np.zeros(5, dtype=int), r"C ≥ 2"),
        (np.full((2, 2), np.nan), np.zeros(2, dtype=int), r"non-finite"),
        (np.zeros((4, 2)), np.array([0, 1, 2, 0]), r"class indices in \[0, 1\]"),
        (np.zeros((4, 2)), np.array([0.0, 1.0, 0.0, 1.0]), r"dtype float64"),
        (np.zeros((4, 2)), np.array([0, 1]), r"expected shape \(4,\)"),
    ],
)
def test_bad_inputs_name_the_problem(logits: np.ndarray, y: np.ndarray, match: str) -> None:
    with pytest.raises(DataError, match=match):
        TemperatureScaler().fit(logits, y)


def test_transform_with_wrong_class_count() -> None:
    z, y = calibrated_logits(100, 2, seed=1)
    scaler = TemperatureScaler().fit(z, y)
    with pytest.raises(DataError, match="fitted on 2 classes, got 3"):
        scaler.transform(np.zeros((4, 3)))


def test_make_calibrator_choices_and_typos() -> None:
    assert isinstance(make_calibrator("temperature"), TemperatureScaler)
    assert isinstance(make_calibrator("isotonic"), IsotonicCalibrator)
    z, y = calibrated_logits(50, 3, seed=2)
    np.testing.assert_allclose(make_calibrator("none").fit(z, y).transform(z), softmax(z))
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        make_calibrator("temprature")


# ---------------------------------------------------------------- netcal cross-check
def test_ece_and_temperature_agree_with_netcal() -> None:
    pytest.importorskip(
        "netcal",
        reason="netcal not installed (test-only cross-check: .venv/bin/pip install netcal)",
    )
    from netcal.metrics import ECE
    from netcal.scaling import TemperatureScaling

    for n_classes in (2, 4):
        z, y = calibrated_logits(3000, n_classes, seed=20 + n_classes)
        logits = 3.0 * z
        probs = softmax(logits)
        # Top-label ECE = ECE of the max probability against "prediction correct". netcal reads
        # (N,) confidences with 0/1 targets as exactly that. Its bins are [lo, hi), ours (lo, hi]:
        # identical unless a confidence sits exactly on an edge (never, for continuous data).
        conf, correct = probs.max(axis=1), (probs.argmax(axis=1) == y).astype(int)
        ours_ece = ece(probs, y, n_bins=15)
        assert ours_ece == pytest.approx(ECE(bins=15).measure(conf, correct), abs=1e-9)
        if n_classes > 2:  # with >2 labels netcal computes top-label ECE from the (N, C) array
            assert ours_ece == pytest.approx(ECE(bins=15).measure(probs, y), abs=1e-9)
        else:  # binary (N, 2): netcal bins P(class 1) against y, i.e. one class of classwise ECE
            assert classwise_ece(probs, y) == pytest.approx(ECE(bins=15).measure(probs, y), abs=1e-9)
        ours_t = TemperatureScaler().fit(logits, y).temperature_
        theirs = TemperatureScaling().fit(probs, y)
        # netcal multiplies the logits by its "temperature" weight: T = 1 / weight
        assert ours_t == pytest.approx(1.0 / float(np.ravel(theirs.temperature)[0]), rel=1e-4)
        assert ours_t == pytest.approx(3.0, rel=0.15)
