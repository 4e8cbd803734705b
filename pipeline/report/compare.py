"""The Transfer gain section's paired test: this run against its from-scratch run on the same test patients.

Both runs log their test predictions (predictions/test.parquet: image_id, subject_id, y_true, prob).
Matched by image, they are compared with `pipeline.evaluate.paired_comparison`: ΔAUROC by the DeLong
test clustered by patient (Obuchowski 1997), ΔBrier and ΔNLL by a paired bootstrap of patients. Only
numbers reach the report context (no pseudonyms).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import DataError
from pipeline.evaluate import paired_comparison
from pipeline.report.fmt import DASH, NA, as_float, ci, count, note, para, table

PREDICTIONS = "predictions/test.parquet"
COLUMNS = ("image_id", "subject_id", "y_true", "prob")  # binary tasks: `prob` is P(class 1)
FALLBACK = (
    "Overlapping CIs do not rule out a difference; a paired test on the same patients "
    "(pipeline.evaluate.paired_comparison, or delong_test with groups) is the proper comparison."
)


def collect_comparison(
    run_id: str,
    baseline: dict[str, Any] | None,
    config: Any,
    tmp: Path,
    fetch: Callable[[str, str, Path], Path | None],
) -> dict[str, Any] | None:
    """Fetch both runs' test predictions and compare them (`compare_runs`); None without a baseline.

    Args:
        run_id: this run. baseline: the from-scratch run's record (with "run_id"), or None.
        config: this run's config.json (evaluate.bootstrap resamples, finetune.seed as the seed).
        tmp: a scratch folder. fetch: (run_id, artifact path, folder) -> local path or None.
    """
    if not baseline or not baseline.get("run_id"):
        return None
    frames = []
    for rid, sub in ((run_id, "this"), (str(baseline["run_id"]), "baseline")):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
        frames.append(read_predictions(fetch(rid, PREDICTIONS, tmp / sub)))
    cfg = config if isinstance(config, dict) else {}
    n_boot = _setting(cfg, "evaluate", "bootstrap", 1000)
    return compare_runs(frames[0], frames[1], n_boot=max(n_boot, 0), seed=_setting(cfg, "finetune", "seed", 0))


def read_predictions(path: Path | None) -> pd.DataFrame | None:
    """A predictions table, or None when absent or unreadable."""
    if path is None:
        return None
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError):
        return None


def compare_runs(
    this: pd.DataFrame | None, base: pd.DataFrame | None, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Paired comparison of two runs' test predictions (this − base), on the images both scored.

    Returns:
        {"available": False, "reason"} when a table is missing, not binary, or the two do not
        match; else {"available": True, "n_this", "n_base", "n_boot"} plus `paired_comparison`'s
        "n_images", "n_patients", "auroc", "brier", "nll".
    """
    for name, frame in (("this run", this), ("the from-scratch run", base)):
        if frame is None:
            return _unavailable(f"the test predictions ({PREDICTIONS}) of {name} are not available")
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            return _unavailable(
                f"the test predictions of {name} lack {', '.join(missing)} (the paired test is for binary tasks)"
            )
        if frame["image_id"].duplicated().any():
            return _unavailable(f"the test predictions of {name} list an image more than once")
    if this is None or base is None:  # checked above; narrows the types
        return _unavailable("a table of test predictions is missing")
    both = this.merge(base[["image_id", "y_true", "prob"]], on="image_id", suffixes=("", "_base"))
    if both.empty:
        return _unavailable("the two runs share no test images")
    if (both["y_true"] != both["y_true_base"]).any():
        return _unavailable("the two runs label the shared test images differently")
    try:
        result = paired_comparison(
            both["y_true"].to_numpy(),
            both["prob"].to_numpy(dtype=float),
            both["prob_base"].to_numpy(dtype=float),
            both["subject_id"].astype(str).to_numpy(),
            n_boot=n_boot,
            seed=seed,
        )
    except DataError as exc:
        return _unavailable(str(exc))
    return {"available": True, "n_this": len(this), "n_base": len(base), "n_boot": n_boot, **result}


def comparison_blocks(comparison: Any) -> list[dict[str, Any]]:
    """The paired test as report blocks: ΔAUROC, ΔBrier, ΔNLL with 95% CIs and p, or why it is missing."""
    c = comparison if isinstance(comparison, dict) else {}
    if c.get("available") is not True:
        reason = c.get("reason")
        return ([note(f"No paired test: {reason}.", NA)] if isinstance(reason, str) else []) + [para(FALLBACK)]
    boot = f"paired bootstrap of patients ({count(c.get('n_boot'))} resamples)"
    rows = []
    for label, key, method in (
        ("AUROC", "auroc", "DeLong clustered by patient (Obuchowski 1997)"),
        ("Brier", "brier", boot),
        ("NLL", "nll", boot),
    ):
        r = c.get(key)
        if isinstance(r, dict):
            rows.append(
                [label, _signed(r.get("diff")), ci(r.get("ci_low"), r.get("ci_high"), 3), _p(r.get("p")), method]
            )
    if not rows:
        return [para(FALLBACK)]
    caption = (
        f"Paired test, this run − from scratch, on the {count(c.get('n_images'))} test images of "
        f"{count(c.get('n_patients'))} patients both runs scored"
    )
    blocks = [
        table(["difference", "estimate", "95% CI", "p", "method"], rows, caption),
        para(
            "Both models scored the same test patients, and the CIs count each patient's images as one "
            "correlated cluster, not as independent cases. A CI that excludes 0 is a difference at the 5% "
            "level (two-sided); higher AUROC and lower Brier and NLL are better."
        ),
    ]
    n_images, n_this, n_base = (as_float(c.get(k)) for k in ("n_images", "n_this", "n_base"))
    if n_images is not None and (n_images != n_this or n_images != n_base):
        blocks.insert(1, note("The runs' test sets differ: the test uses only the images both runs scored.", "warn"))
    return blocks


def _unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


def _setting(cfg: dict[str, Any], part: str, key: str, default: int) -> int:
    node = cfg.get(part)
    value = node.get(key, default) if isinstance(node, dict) else default
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _signed(x: Any) -> str:
    f = as_float(x)
    return DASH if f is None else f"{f:+.3f}"


def _p(x: Any) -> str:
    f = as_float(x)
    if f is None:
        return DASH
    return "<0.001" if f < 0.001 else f"{f:.3f}"
