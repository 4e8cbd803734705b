"""External validation of a scored archive: AUROC with patient-bootstrap CI, ECE and Brier against its labels."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import DataError
from pipeline.evaluate import N_BINS, at_threshold, bootstrap_ci, brier, ece
from pipeline.records import Packaged
from pipeline.score.table import stored_threshold


def external_metrics(
    table: pd.DataFrame, frame: pd.DataFrame, pkg: Packaged, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """AUROC (patient-bootstrap 95% CI), ECE, Brier of the scored units whose label is a model class.

    Probabilities are the table's ``prob`` (the model's calibrated ones, prior-shifted under
    ``score --prevalence``, which adds ``ece_unadjusted`` and ``brier_unadjusted`` of
    ``prob_unadjusted``); sensitivity and specificity use the threshold the table's decisions use.

    Args:
        table: the output table of `score`. frame: the archive's manifest (``image_id``, ``label``).
        pkg: the packaged model. n_boot: bootstrap resamples (of patients). seed: bootstrap seed.

    Returns:
        {"n", "n_unlabelled", "unknown_labels", "n_bins", "bootstrap", "notes", "n_by_class"}, plus
        "ece", "brier", "auroc", "auroc_ci" and (binary, with a threshold) "at_operating_point".
    """
    labels = frame.set_index("image_id")["label"].astype(str)
    ok = table[table["status"] == "ok"]
    y_str = ok["image_id"].map(labels).fillna("")
    known = y_str.isin(pkg.classes).to_numpy()
    unknown = sorted(set(y_str[~known]) - {""})
    out: dict[str, Any] = {
        "n": int(known.sum()),
        "n_unlabelled": int((y_str == "").sum()),
        "unknown_labels": unknown[:10],
        "n_bins": N_BINS,
        "bootstrap": n_boot,
        "notes": [],
    }
    y = y_str[known].map({c: i for i, c in enumerate(pkg.classes)}).to_numpy(dtype=int)
    p = ok.loc[known, pkg.prob_columns].to_numpy(dtype=np.float64)
    probs = np.column_stack([1.0 - p[:, 0], p[:, 0]]) if len(pkg.classes) == 2 else p
    out["n_by_class"] = {c: int((y == i).sum()) for i, c in enumerate(pkg.classes)}
    if len(y) == 0:
        out["notes"].append("no scored unit has a label among the model's classes: no metrics")
        return out
    out.update(ece=ece(probs, y), brier=brier(probs, y))
    if "prob_unadjusted" in ok:  # score --prevalence: `prob` is prior-shifted; the model's own as well
        raw = ok.loc[known, "prob_unadjusted"].to_numpy(dtype=np.float64)
        raw2 = np.column_stack([1.0 - raw, raw])
        out.update(ece_unadjusted=ece(raw2, y), brier_unadjusted=brier(raw2, y))
    try:
        point, low, high = bootstrap_ci(
            "auroc",
            y,
            probs[:, 1] if len(pkg.classes) == 2 else probs,
            ok.loc[known, "subject_id"].to_numpy(),
            n_boot=n_boot,
            seed=seed,
        )
        out.update(auroc=point, auroc_ci=[low, high])
    except DataError as exc:
        out["notes"].append(f"AUROC not computed: {exc}")
    if len(pkg.classes) == 2 and pkg.threshold is not None and len(set(y)) == 2:
        out["at_operating_point"] = at_threshold(y, probs[:, 1], stored_threshold(pkg.threshold))
    return out
