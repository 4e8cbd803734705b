"""Smoke tests for pipeline.evaluate.plots: every figure renders to a non-empty PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from scipy.special import softmax

import pipeline.evaluate as M
from pipeline.errors import DataError
from pipeline.evaluate import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def binary_case() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    logits = rng.normal(size=(300, 2)) + 1.5 * np.eye(2)[y]
    return y, softmax(logits, axis=1)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000  # a real plot, not an empty canvas


def test_roc_figure_with_operating_points(binary_case, tmp_path: Path) -> None:
    y, p = binary_case
    thr = M.choose_operating_point(y, p[:, 1], "youden")
    fig = plots.roc_figure(y, p[:, 1], operating_points=[{"rule": "youden", "threshold": thr}, 0.9])
    assert isinstance(fig, Figure)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels[0].startswith(f"model (AUROC = {M.auroc(y, p):.3f}")
    assert any(label.startswith("youden (t = ") for label in labels)
    assert sum(label.startswith(("youden", "threshold")) for label in labels) == 2
    assert_png(plots.save_png(fig, tmp_path / "nested" / "roc.png"))
    assert not list((tmp_path / "nested").glob(".*tmp"))  # atomic write leaves no temp file


def test_pr_figure(binary_case, tmp_path: Path) -> None:
    y, p = binary_case
    fig = plots.pr_figure(y, p)
    assert "AP = " in fig.axes[0].get_lines()[0].get_label()
    assert_png(plots.save_png(fig, tmp_path / "pr.png"))


def test_reliability_figure_has_before_and_after_series(binary_case, tmp_path: Path) -> None:
    y, p = binary_case
    sharp = softmax(5 * np.log(p), axis=1)
    fig = plots.reliability_figure(sharp, p, y)
    series = [line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]
    assert len(series) == 2
    assert series[0].get_label() == f"before calibration (ECE = {M.ece(sharp, y):.3f})"
    assert series[1].get_label() == f"after calibration (ECE = {M.ece(p, y):.3f})"
    assert "15 equal-width" in fig.axes[0].get_title()
    assert_png(plots.save_png(fig, tmp_path / "reliability.png"))


def test_confusion_figure(tmp_path: Path) -> None:
    fig = plots.confusion_figure([[50, 5], [8, 37]], ["normal", "nodule"])
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "50\n91%" in texts
    assert "37\n82%" in texts
    assert_png(plots.save_png(fig, tmp_path / "cm.png"))
    with pytest.raises(DataError, match="square matrix matching 3 class names"):
        plots.confusion_figure([[1, 2], [3, 4]], ["a", "b", "c"])


def test_training_curves_figure(tmp_path: Path) -> None:
    history = {"train_loss": [0.9, 0.6, 0.5], "val_loss": [0.8, 0.7, 0.72], "val_auroc": [0.7, 0.8, 0.82]}
    fig = plots.training_curves_figure(history)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "metrics"]
    assert len(fig.axes[0].get_lines()) == 2
    assert len(fig.axes[1].get_lines()) == 1
    assert_png(plots.save_png(fig, tmp_path / "curves.png"))
    empty = plots.training_curves_figure({})
    assert empty.axes[0].texts[0].get_text() == "no training history recorded"
