"""Evaluation figures (ROC, PR, reliability, confusion, training curves) as matplotlib Figures, no pyplot."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from pipeline.errors import DataError
from pipeline.evaluate.metrics import (
    N_BINS,
    at_threshold,
    discrimination,
    reliability_bins,
)
from pipeline.io import atomic_path
from pipeline.stats import as_binary, auroc


def _figure(width: float = 5.0, height: float = 4.5) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike[str], dpi: int = 150) -> Path:
    """Write `fig` as PNG atomically (temp file + rename), creating parent folders; return the path."""
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return out


def _op_points(operating_points: Iterable[Any] | None) -> list[tuple[str, float]]:
    points = []
    for op in operating_points or []:
        if isinstance(op, Mapping):
            points.append((str(op.get("rule", "threshold")), float(op["threshold"])))
        else:
            points.append(("threshold", float(op)))
    return points


def roc_figure(y: Any, prob: Any, operating_points: Iterable[Any] | None = None) -> Figure:
    """ROC curve of a binary model with its AUROC, and optional operating points marked.

    Args:
        operating_points: thresholds as floats, or dicts with "threshold" (and "rule", as
            returned in evaluation_summary()["operating_points"]).
    """
    p, labels = as_binary(y, prob)
    fpr, tpr, _ = roc_curve(labels, p)
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"model (AUROC = {auroc(labels, p):.3f}, n = {len(labels)})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    for rule, thr in _op_points(operating_points):
        op = at_threshold(labels, p, thr)
        if op["sensitivity"] is not None and op["specificity"] is not None:
            ax.plot(
                1 - op["specificity"],
                op["sensitivity"],
                "o",
                ms=7,
                label=f"{rule} (t = {thr:.3f}: sens {op['sensitivity']:.2f}, spec {op['specificity']:.2f})",
            )
    _square(ax, "1 − specificity (false-positive rate)", "sensitivity (true-positive rate)")
    ax.set_title("ROC curve")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def pr_figure(y: Any, prob: Any) -> Figure:
    """Precision–recall curve of a binary model with average precision and the prevalence baseline."""
    p, labels = as_binary(y, prob)
    precision, recall, _ = precision_recall_curve(labels, p)
    prevalence = float(labels.mean())
    fig = _figure()
    ax = fig.add_subplot()
    ap = discrimination(labels, p)["auprc"]
    ax.step(recall, precision, where="post", lw=2, label=f"model (AP = {ap:.3f})")
    ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"prevalence ({prevalence:.3f})")
    _square(ax, "recall (sensitivity)", "precision (PPV)")
    ax.set_title("Precision–recall curve")
    ax.legend(loc="lower left", fontsize="small")
    return fig


def reliability_figure(probs_before: Any, probs_after: Any, y: Any, n_bins: int = N_BINS) -> Figure:
    """Top-label reliability diagram before vs after calibration, ECE in the legend, counts below."""
    before = reliability_bins(probs_before, y, n_bins)
    after = reliability_bins(probs_after, y, n_bins)
    fig = _figure(5.0, 6.0)
    ax, ax_count = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="_perfect calibration")
    for name, table, marker in (("before", before, "s"), ("after", after, "o")):
        filled = table["count"] > 0
        ax.plot(
            table["confidence"][filled],
            table["accuracy"][filled],
            marker=marker,
            lw=1.5,
            label=f"{name} calibration (ECE = {table['ece']:.3f})",
        )
    centres = (before["edges"][:-1] + before["edges"][1:]) / 2
    width = 1.0 / n_bins
    ax_count.bar(centres - width / 4, before["count"], width=width / 2, label="before")
    ax_count.bar(centres + width / 4, after["count"], width=width / 2, label="after")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy in bin")
    ax.set_title(f"Reliability ({n_bins} equal-width confidence bins)")
    ax.legend(loc="upper left", fontsize="small")
    ax_count.set_xlabel("confidence (top-label probability)")
    ax_count.set_ylabel("images")
    return fig


def confusion_figure(cm: Any, class_names: Sequence[str], title: str = "Confusion matrix") -> Figure:
    """Confusion matrix (rows = true, columns = predicted) with counts and row percentages, under `title`."""
    mat = np.asarray(cm)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1] or mat.shape[0] != len(class_names):
        raise DataError(f"cm: expected a square matrix matching {len(class_names)} class names, got shape {mat.shape}.")
    rows = mat.sum(axis=1, keepdims=True)
    share = np.divide(mat, rows, out=np.zeros(mat.shape, dtype=float), where=rows > 0)
    size = 2.5 + 0.8 * len(class_names)
    fig = _figure(size + 1, size)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(mat.shape):
        ax.text(
            j,
            i,
            f"{mat[i, j]}\n{100 * share[i, j]:.0f}%",
            ha="center",
            va="center",
            color="white" if share[i, j] > 0.5 else "black",
            fontsize="small",
        )
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=list(class_names))
    ax.set_yticks(ticks, labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize="medium")
    fig.colorbar(image, ax=ax, label="share of true class")
    return fig


def training_curves_figure(history: Mapping[str, Sequence[float]]) -> Figure:
    """Per-epoch curves: keys containing "loss" on the left panel, all other metrics on the right.

    An empty history gives a figure that says so (the report still renders).
    """
    series = {k: list(v) for k, v in history.items() if len(v) > 0}
    losses = {k: v for k, v in series.items() if "loss" in k}
    others = {k: v for k, v in series.items() if "loss" not in k}
    panels = [(title, group) for title, group in (("loss", losses), ("metrics", others)) if group]
    fig = _figure(5.0 * max(len(panels), 1), 4.0)
    if not panels:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no training history recorded", ha="center", va="center")
        ax.set_axis_off()
        return fig
    for k, (title, group) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for name, values in group.items():
            ax.plot(np.arange(1, len(values) + 1), values, marker="o", ms=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def _square(ax: Axes, xlabel: str, ylabel: str) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


Interval = tuple[float, float | None, float | None]  # (point, CI low, CI high)


def forest_figure(rows: Sequence[tuple[str, Interval]], xlabel: str = "ΔAUROC vs reference (95% CI)") -> Figure:
    """A forest plot: one row per (label, (difference, CI low, CI high)), a line at 0; CIs below 0 in red.

    An empty list gives a figure that says so.
    """
    fig = _figure(7.0, 0.9 + 0.45 * max(len(rows), 1))
    ax = fig.add_subplot()
    if not rows:
        ax.text(0.5, 0.5, "no paired comparison", ha="center", va="center")
        ax.set_axis_off()
        return fig
    for i, (_, (point, low, high)) in enumerate(rows):
        y = len(rows) - 1 - i
        below = high is not None and high < 0
        color = "#b03a2e" if below else "#0f6e7f"
        if low is not None and high is not None:
            ax.plot([low, high], [y, y], color=color, lw=2)
        ax.plot([point], [y], "s", color=color, ms=6)
    ax.axvline(0.0, color="#5b6b7b", lw=1, ls="--")
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)], fontsize="small")
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    return fig


def learning_curve_figure(series: Mapping[str, Sequence[tuple[float, Interval]]], ylabel: str = "test AUROC") -> Figure:
    """Metric against labelled training patients: one line per series of (n patients, (value, CI low, CI high)).

    CIs are drawn as error bars, each series nudged sideways by about 1%; an empty mapping gives a
    figure that says so.
    """
    fig = _figure(6.0, 4.2)
    ax = fig.add_subplot()
    if not series:
        ax.text(0.5, 0.5, "no learning curve (one train fraction)", ha="center", va="center")
        ax.set_axis_off()
        return fig
    for k, (name, points) in enumerate(series.items()):
        pts = sorted(points)
        dodge = 1 + 0.012 * (k - (len(series) - 1) / 2)  # series side by side, so their error bars stay apart
        x = np.array([n for n, _ in pts], dtype=float) * dodge
        y = np.array([v for _, (v, _, _) in pts], dtype=float)
        lo = np.array([v - (low if low is not None else v) for _, (v, low, _) in pts], dtype=float)
        hi = np.array([(high if high is not None else v) - v for _, (v, _, high) in pts], dtype=float)
        ax.errorbar(x, y, yerr=np.vstack([lo, hi]), marker="o", ms=4, capsize=3, label=name)
    ax.set_xlabel("labelled training patients")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig
