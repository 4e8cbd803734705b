"""Checks of predictions and labels, softmax and fitted calibrations, AUROC: what stages share.

`apply_calibration` is the one place a fitted calibration turns logits into probabilities: the
evaluation's calibrators and the packaged model (`adapt.CalibratedNet`) both call it.

Conventions: `probs` is (N, C) float (a 1-D array is read as P(class 1) of a binary task); `y`
holds integer class indices (N,). An AUROC with one class present is None, never 0.5 or 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import stats

from pipeline.errors import DataError


def check_labels(y: Any, n: int, n_classes: int, name: str = "y") -> np.ndarray:
    """Validate integer class indices shaped (n,) with values in [0, n_classes); return int64.

    Raises:
        DataError: naming the argument, the actual shape/values and what is expected.
    """
    labels = np.asarray(y)
    if labels.shape != (n,):
        raise DataError(f"{name}: expected shape ({n},) to match the predictions, got {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= n_classes:
        raise DataError(
            f"{name}: expected integer class indices in [0, {n_classes - 1}], got dtype "
            f"{labels.dtype} with values {np.unique(labels)[:10].tolist()}; "
            "map label names to indices first."
        )
    return labels.astype(np.int64)


def check_groups(groups: Any, n: int, name: str = "groups") -> np.ndarray:
    """Validate one patient pseudonym per row; return integer codes (n,) numbering the patients 0..I−1.

    Ids are compared as strings, so 7 and "7" are the same patient.

    Raises:
        DataError: when `groups` is not shaped (n,).
    """
    g = np.asarray(groups)
    if g.shape != (n,):
        raise DataError(f"{name}: expected one patient id per row, shape ({n},), got {g.shape}.")
    return np.unique(g.astype(str), return_inverse=True)[1].reshape(n).astype(np.int64)


def check_probs(probs: Any, name: str = "probs") -> np.ndarray:
    """Validate probabilities shaped (N, C), or (N,) read as P(class 1); return float64 (N, C)."""
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


def check_xy(probs: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate probabilities and their labels together; return (probs (N, C), labels (N,))."""
    p = check_probs(probs)
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
        p = check_probs(p, name)[:, 1]
    return p, check_labels(y, len(p), 2)


def auc_binary(pos: np.ndarray, score: np.ndarray) -> float | None:
    """Binary AUROC of `score` for the boolean mask `pos` (Mann–Whitney, ties 1/2); None if a class is absent."""
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
        return auc_binary(pos == 1, score)
    p, labels = check_xy(probs, y)
    if p.shape[1] == 2:
        return auc_binary(labels == 1, p[:, 1])
    per = [auc_binary(labels == c, p[:, c]) for c in range(p.shape[1])]
    defined = [a for a in per if a is not None]
    return float(np.mean(defined)) if defined else None


def softmax(logits: Any) -> np.ndarray:
    """Row-wise softmax, numerically stable, in float64.

    Args:
        logits: array-like (N, C) of raw model outputs.

    Returns:
        (N, C) float64 probabilities whose rows sum to 1.
    """
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def apply_calibration(params: Mapping[str, Any], logits: Any) -> np.ndarray:
    """Probabilities (N, C) float64 of logits (N, C) under a fitted calibration's parameters.

    Args:
        params: what `pipeline.evaluate.Calibrator.params()` returns (JSON-safe; stored with the model):
            ``{"method": "none"}``: softmax(z); ``{"method": "temperature", "temperature": T}``:
            softmax(z / T); ``{"method": "vector", "scale": [w], "bias": [b]}``: softmax(z·w + b);
            ``{"method": "isotonic", "x": [[...]], "y": [[...]]}``: monotone piecewise-linear maps of
            the softmax (binary: one map of P(class 1), P(class 0) = 1 − it; multi-class: one map per
            class, rows renormalised, a row that maps to all zeros becomes uniform).
        logits: the network's raw outputs (N, C).

    Raises:
        DataError: an unknown method or parameters that do not fit the logits (a damaged model).
    """
    z = np.asarray(logits, dtype=np.float64)
    method = params.get("method")
    try:
        if method == "none":
            return softmax(z)
        if method == "temperature":
            return softmax(z / float(params["temperature"]))
        if method == "vector":
            return softmax(z * np.asarray(params["scale"], np.float64) + np.asarray(params["bias"], np.float64))
        if method == "isotonic":
            return _isotonic(softmax(z), params["x"], params["y"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"calibration parameters {dict(params)!r} do not fit logits of shape {z.shape}: {exc}") from exc
    raise DataError(
        f"calibration method {method!r} is unknown (expected none, temperature, vector or isotonic); "
        "the model's metadata is damaged or from a newer medxfer"
    )


def _isotonic(p: np.ndarray, xs: list[list[float]], ys: list[list[float]]) -> np.ndarray:
    maps = [np.interp(p[:, c], np.asarray(x, np.float64), np.asarray(y, np.float64)) for c, x, y in _columns(p, xs, ys)]
    if p.shape[1] == 2:
        return np.column_stack([1.0 - maps[0], maps[0]])
    q = np.column_stack(maps)
    total = q.sum(axis=1, keepdims=True)
    uniform = np.full_like(q, 1.0 / q.shape[1])
    return np.where(total > 0, q / np.where(total > 0, total, 1.0), uniform)


def _columns(p: np.ndarray, xs: list[list[float]], ys: list[list[float]]) -> list[tuple[int, list[float], list[float]]]:
    cols = [1] if p.shape[1] == 2 else list(range(p.shape[1]))
    if len(xs) != len(cols) or len(ys) != len(cols):
        raise ValueError(f"{len(xs)} isotonic maps for {p.shape[1]} classes (binary: 1, else one per class)")
    return list(zip(cols, xs, ys, strict=True))


def check_prevalence(value: Any, name: str = "--prevalence") -> float:
    """A stated prevalence of the positive class: a number strictly between 0 and 1.

    Raises:
        ConfigError: anything else (0 and 1 leave no room for the other class).
    """
    from pipeline.errors import ConfigError

    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1
    if not ok:
        raise ConfigError(
            f"{name} {value!r}: the expected prevalence of the positive class must be strictly between 0 and 1 "
            "(e.g. 0.375 for 3 positives in 8). Fix: give the share of positive cases the site expects"
        )
    return float(value)


def prior_shift(prob: Any, train_prevalence: float, prevalence: float) -> np.ndarray:
    """P(class 1 | x) moved from the training prior π to a stated prior π' (Saerens et al. 2002).

    p' = p·π'/π / (p·π'/π + (1 − p)·(1 − π')/(1 − π)): Bayes' rule with the class-conditional
    densities unchanged and only the priors replaced. Monotone in p, so rankings (AUROC) do not
    change; calibration-in-the-large does. NaN stays NaN; p = 0 and p = 1 stay where they are.

    Args:
        prob: P(class 1) as the model gives it, any shape.
        train_prevalence: π, the positive share the probabilities were fitted to, in (0, 1).
        prevalence: π', the positive share expected where the model is used, in (0, 1).
    """
    p = np.asarray(prob, dtype=np.float64)
    pos = p * (prevalence / train_prevalence)
    neg = (1.0 - p) * ((1.0 - prevalence) / (1.0 - train_prevalence))
    with np.errstate(invalid="ignore", divide="ignore"):
        return pos / (pos + neg)
