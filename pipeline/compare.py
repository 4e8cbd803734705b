"""`medxfer compare`: a paired, patient-clustered comparison of evaluated runs on the same test units.

Each evaluated run logs its test predictions (predictions/test.parquet: image_id, subject_id, y_true,
prob = calibrated P(class 1), prob_uncalibrated = the softmax its test AUROC ranks) and its frozen
operating points (evaluation.json). Runs of one manifest scored the same test images, so their
differences are paired: ΔAUROC by the DeLong test clustered by patient (Obuchowski 1997,
`evaluate.delong_test` with groups) and by a paired bootstrap of patients; ΔBrier, ΔECE, ΔNLL and
the sensitivity and specificity at each run's own frozen threshold by the same paired bootstrap
(`evaluate.paired_bootstrap`: one set of patient resamples for every quantity). With three or more
runs each is compared with the first, the reference; every difference is that run − the reference.

Runs whose manifests or test units differ, or that are not evaluated, are refused (DataError);
no pseudonym leaves this module (only counts and run ids reach the JSON, the page and MLflow).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import tracking
from pipeline.errors import ConfigError, DataError
from pipeline.evaluate import at_threshold, auroc, brier, delong_test, ece, nll, paired_bootstrap
from pipeline.io import jsonable, write_text
from pipeline.records import Comparison

PREDICTIONS = "predictions/test.parquet"
COLUMNS = ("image_id", "subject_id", "y_true", "prob")  # binary tasks: `prob` is the calibrated P(class 1)
RANKING = "prob_uncalibrated"  # the scores the logged test_auroc ranks (runs evaluated since medxfer 0.2)
log = logging.getLogger("medxfer")
REPORTS = "medxfer-reports"  # default output root, in the working folder (as `medxfer run`'s reports)
KIND = "comparison"  # the `kind` tag of the MLflow run a comparison is logged to
DELONG = "DeLong clustered by patient (Obuchowski 1997)"
# (key, label, uses the ranking scores): the rows of every comparison table, in order
QUANTITIES = (
    ("auroc", "AUROC", True),
    ("auroc_bootstrap", "AUROC (bootstrap)", True),
    ("brier", "Brier", False),
    ("ece", "ECE", False),
    ("nll", "NLL", False),
    ("sensitivity", "sensitivity", False),
    ("specificity", "specificity", False),
)


@dataclass
class RunTable:
    """One evaluated run as a comparison reads it: `info` (see `records.Comparison.runs`) and its test predictions."""

    info: dict[str, Any]
    predictions: pd.DataFrame


def compare_runs(
    run_ids: Sequence[str], tracking_uri: str | None = None, *, n_boot: int = 1000, seed: int = 0
) -> Comparison:
    """Compare evaluated runs on their shared test units; the first run is the reference.

    Args:
        run_ids: two or more MLflow run ids (distinct).
        tracking_uri: the MLflow store holding them (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db);
            a sqlite file that does not exist is an error, never created.
        n_boot: paired-bootstrap resamples of patients (0: the clustered DeLong only). seed: their seed.

    Returns:
        The `records.Comparison` (not logged anywhere: see `log_comparison` and `write_comparison`).

    Raises:
        ConfigError: fewer than two runs, a run named twice, or a negative n_boot.
        TrackingError: the store cannot be read or a run does not exist.
        DataError: a run is not evaluated or not binary; the runs' manifests, test units or labels differ.
    """
    ids = check_run_ids(run_ids)
    if n_boot < 0:
        raise ConfigError(f"--bootstrap {n_boot}: expected 0 (DeLong only) or more resamples, e.g. 1000")
    tracking.connect(tracking_uri, existing=True)
    log.info(
        "comparing run %s with the reference %s on their shared test units: clustered DeLong%s",
        ", ".join(ids[1:]),
        ids[0],
        f" and a paired bootstrap of {n_boot} patient resamples" if n_boot else "",
    )
    with tempfile.TemporaryDirectory(prefix="medxfer-compare-") as tmp:
        tables = [load_run(rid, Path(tmp) / str(i)) for i, rid in enumerate(ids)]
    return compare_tables(tables, n_boot=n_boot, seed=seed)


def check_run_ids(run_ids: Sequence[str]) -> list[str]:
    """The run ids, stripped; at least two and none twice.

    Raises:
        ConfigError: naming what is wrong and the usage.
    """
    ids = [str(r).strip() for r in run_ids]
    if len(ids) < 2 or not all(ids):
        raise ConfigError(
            f"compare needs at least 2 run ids, got {len([i for i in ids if i])}. "
            "Fix: medxfer compare RUN_A RUN_B [RUN_C ...] (the first is the reference)"
        )
    twice = sorted({r for r in ids if ids.count(r) > 1})
    if twice:
        raise ConfigError(f"run {', '.join(twice)} is named more than once. Fix: name each run once")
    return ids


def load_run(run_id: str, folder: Path) -> RunTable:
    """Read one evaluated run: its record, test predictions and first frozen operating point.

    Raises:
        TrackingError: the run does not exist. DataError: it is not an evaluated binary run.
    """
    run = tracking.get_run(run_id)
    params, tags, metrics = run["params"], run["tags"], run["metrics"]
    if tags.get("kind") == KIND:
        raise DataError(f"run {run_id} is a comparison, not a trained run. Fix: name the runs it compared")
    fix = f"Fix: evaluate it (medxfer evaluate CONFIG --run {run_id}) or name an evaluated run"
    if "test_auroc" not in metrics:
        raise DataError(f"run {run_id} has not been evaluated (no test_auroc). {fix}")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        frame = pd.read_parquet(tracking.download_artifacts(run_id, PREDICTIONS, folder))
    except Exception as exc:  # MlflowException (absent), OSError / ArrowInvalid (damaged)
        raise DataError(
            f"run {run_id}: its test predictions ({PREDICTIONS}) cannot be read ({type(exc).__name__}). {fix}"
        ) from exc
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"run {run_id}: {PREDICTIONS} lacks {', '.join(missing)} (columns: {', '.join(map(str, frame.columns))}); "
            "medxfer compare handles binary tasks (a `prob` column). Fix: compare binary runs"
        )
    if frame["image_id"].duplicated().any():
        raise DataError(f"run {run_id}: {PREDICTIONS} lists an image more than once. {fix}")
    rule, threshold = _operating_point(run_id, folder, metrics)
    info = {
        "run_id": run_id,
        "run_name": tags.get("mlflow.runName"),
        "experiment_id": run["experiment_id"],
        "weights": params.get("model.weights"),
        "backbone": params.get("model.backbone"),
        "strategy": params.get("finetune.strategy"),
        "dims": params.get("prepare.dims"),
        "manifest_hash": tags.get("manifest_hash"),
        "test_split_id": tags.get("test_split_id"),
        "logged_test_auroc": float(metrics["test_auroc"]),
        "threshold_rule": rule,
        "threshold": threshold,
    }
    return RunTable(info, frame)


def _operating_point(run_id: str, folder: Path, metrics: dict[str, float]) -> tuple[str | None, float | None]:
    """The first operating point's rule and frozen threshold (evaluation.json; else the `threshold` metric)."""
    try:
        ev = json.loads(tracking.download_artifacts(run_id, "evaluation.json", folder).read_text(encoding="utf-8"))
        op = (ev.get("operating_points") or [{}])[0]
        if isinstance(op, dict) and isinstance(op.get("threshold"), int | float):
            return (str(op["rule"]) if op.get("rule") is not None else None), float(op["threshold"])
    except Exception:  # absent or unreadable: fall back to the metric
        pass
    value = metrics.get("threshold")
    return (None, float(value)) if value is not None else (None, None)


def compare_tables(tables: Sequence[RunTable], *, n_boot: int = 1000, seed: int = 0) -> Comparison:
    """The comparison of loaded runs (`load_run`), the first being the reference; no MLflow needed.

    Raises:
        DataError: fewer than two tables; manifests, test units or labels differ; too few patients
            of a class for the clustered DeLong.
    """
    if len(tables) < 2:
        raise DataError(f"a comparison needs at least 2 runs, got {len(tables)}")
    notes = _check_same_manifest(tables)
    ref = tables[0]
    base = ref.predictions.set_index("image_id")
    order = base.index
    y = _labels(base["y_true"], ref.info["run_id"])
    groups = base["subject_id"].astype(str).to_numpy()
    aligned = [base] + [_aligned(t, ref, base) for t in tables[1:]]
    scores, probs = [], []
    for t, frame in zip(tables, aligned, strict=True):
        p = frame["prob"].to_numpy(dtype=np.float64)
        probs.append(p)
        if RANKING in frame.columns:
            scores.append(frame[RANKING].to_numpy(dtype=np.float64))
            t.info["auroc_scores"] = "uncalibrated"
        else:
            scores.append(p)
            t.info["auroc_scores"] = "calibrated"
            notes.append(
                f"run {t.info['run_id']} predates {RANKING}: its AUROC is computed from its calibrated "
                "probabilities and may differ from its logged test AUROC"
            )
    runs = [_summary(t.info, y, s, p) for t, s, p in zip(tables, scores, probs, strict=True)]
    pairs = [
        _pair(runs[0], runs[i], y, groups, (scores[i], scores[0]), (probs[i], probs[0]), n_boot, seed)
        for i in range(1, len(runs))
    ]
    notes += [
        f"run {r['run_id']} has no frozen threshold: no sensitivity or specificity comparison with it"
        for r in runs
        if r.get("threshold") is None
    ]
    if len(runs) > 2:
        notes.insert(0, f"{len(runs) - 1} runs, each compared with the first (the reference, {runs[0]['run_id']})")
    codes = np.unique(groups, return_inverse=True)[1]
    return Comparison(
        reference=str(runs[0]["run_id"]),
        runs=runs,
        pairs=pairs,
        n_images=len(order),
        n_patients=int(codes.max()) + 1,
        n_positive=int((y == 1).sum()),
        n_negative=int((y == 0).sum()),
        n_boot=n_boot,
        seed=seed,
        notes=notes,
    )


def _check_same_manifest(tables: Sequence[RunTable]) -> list[str]:
    """Refuse runs of different manifests (their `manifest_hash` tags); notes for runs that lack the tag."""
    hashes = {t.info["run_id"]: t.info.get("manifest_hash") for t in tables}
    known = {h for h in hashes.values() if h}
    if len(known) > 1:
        listed = "; ".join(f"run {r}: {h or 'not recorded'}" for r, h in hashes.items())
        raise DataError(
            f"the runs were trained on different manifests (manifest_hash {listed}); a paired comparison "
            "needs the same test units. Fix: compare runs of one manifest (same data.manifest and split)"
        )
    return [
        f"run {r} records no manifest_hash: only its test units and labels were checked against the others"
        for r, h in hashes.items()
        if not h
    ]


def _aligned(t: RunTable, ref: RunTable, base: pd.DataFrame) -> pd.DataFrame:
    """Run `t`'s predictions in the reference's image order; refuses other units, labels or patients."""
    frame = t.predictions.set_index("image_id")
    rid, ref_id = t.info["run_id"], ref.info["run_id"]
    only_ref, only_t = base.index.difference(frame.index), frame.index.difference(base.index)
    if len(only_ref) or len(only_t):
        raise DataError(
            f"run {rid} was tested on other units than the reference run {ref_id}: {len(only_ref)} of the "
            f"reference's {len(base)} test images are not in its predictions and {len(only_t)} of its {len(frame)} "
            "are not in the reference's. A paired comparison needs the same test units. Fix: compare runs "
            "evaluated on the same manifest and test split"
        )
    frame = frame.loc[base.index]
    if (frame["y_true"].to_numpy() != base["y_true"].to_numpy()).any():
        raise DataError(
            f"runs {ref_id} and {rid} label the same test images differently. Fix: compare runs of one manifest"
        )
    if (frame["subject_id"].astype(str).to_numpy() != base["subject_id"].astype(str).to_numpy()).any():
        raise DataError(
            f"runs {ref_id} and {rid} assign the same test images to different patients. "
            "Fix: compare runs of one manifest"
        )
    return frame


def _labels(values: pd.Series, run_id: str) -> np.ndarray:
    y = values.to_numpy()
    if not np.issubdtype(y.dtype, np.integer) or not set(np.unique(y)) <= {0, 1}:
        raise DataError(
            f"run {run_id}: y_true holds {sorted(map(str, np.unique(y)))[:5]}, not 0/1; compare handles binary tasks"
        )
    return y.astype(np.int64)


def _summary(info: dict[str, Any], y: np.ndarray, score: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    out = {
        **info,
        "auroc": auroc(y, score),
        "brier": brier(prob, y),
        "ece": ece(prob, y),
        "nll": nll(prob, y),
        "sensitivity": None,
        "specificity": None,
    }
    if info.get("threshold") is not None:
        rates = at_threshold(y, prob, float(info["threshold"]))
        out.update(sensitivity=rates["sensitivity"], specificity=rates["specificity"])
    return out


def _pair(
    ref: dict[str, Any],
    run: dict[str, Any],
    y: np.ndarray,
    groups: np.ndarray,
    scores: tuple[np.ndarray, np.ndarray],
    probs: tuple[np.ndarray, np.ndarray],
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Run − reference: clustered DeLong, then the paired bootstrap of every quantity (same resamples)."""
    try:
        d = delong_test(y, scores[0], scores[1], groups=groups)
    except DataError as exc:
        raise DataError(f"the shared test units cannot be compared: {exc}") from exc
    out: dict[str, Any] = {
        "run_id": run["run_id"],
        "reference": ref["run_id"],
        "auroc": {
            "value_a": d["auc_a"],
            "value_b": d["auc_b"],
            "diff": d["diff"],
            "se": d["se"],
            "z": d["z"],
            "ci_low": d["ci_low"],
            "ci_high": d["ci_high"],
            "p": d["p"],
            "method": DELONG,
        },
    }
    boot = f"paired bootstrap of patients ({n_boot} resamples)"
    metrics: dict[str, tuple[str | Callable[[Any, Any], float | None], tuple[np.ndarray, np.ndarray]]] = {
        "auroc_bootstrap": ("auroc", scores),
        "brier": ("brier", probs),
        "ece": ("ece", probs),
        "nll": ("nll", probs),
    }
    if run.get("threshold") is not None and ref.get("threshold") is not None:
        decisions = (_decide(probs[0], run["threshold"]), _decide(probs[1], ref["threshold"]))
        metrics["sensitivity"] = (_sensitivity, decisions)
        metrics["specificity"] = (_specificity, decisions)
    for key, _, _ in QUANTITIES[1:]:
        out[key] = None
        if n_boot and key in metrics:
            metric, (a, b) = metrics[key]
            r = paired_bootstrap(y, a, b, groups, n_boot=n_boot, seed=seed, metric=metric)
            out[key] = {k: r[k] for k in ("value_a", "value_b", "diff", "ci_low", "ci_high", "p", "n_boot")}
            out[key]["method"] = boot
    weights = str(run.get("weights") or "")
    out["negative_transfer"] = bool(
        str(ref.get("weights")) == "none" and weights not in ("", "none") and out["auroc"]["ci_high"] < 0
    )
    return out


def _decide(prob: np.ndarray, threshold: float) -> np.ndarray:
    """The model's decisions at its frozen threshold (positive when prob ≥ threshold), as 0/1."""
    return (prob >= float(threshold)).astype(np.float64)


def _sensitivity(y: Any, decisions: Any) -> float | None:
    return at_threshold(y, decisions, 0.5)["sensitivity"]


def _specificity(y: Any, decisions: Any) -> float | None:
    return at_threshold(y, decisions, 0.5)["specificity"]


# --------------------------------------------------------------------------- outputs
def default_out(run_ids: Sequence[str]) -> Path:
    """medxfer-reports/compare-<first 8 characters of each id> in the working folder."""
    return Path(REPORTS) / ("compare-" + "-".join(str(r)[:8] for r in run_ids))


def write_comparison(comp: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """Write comparison.json and comparison.html (self-contained) into `out_dir`, each atomically.

    Returns:
        {"json": path, "html": path}.
    """
    from pipeline.report.compare import comparison_page  # the report composes this module: imported late

    root = Path(out_dir)
    paths = {"json": root / "comparison.json", "html": root / "comparison.html"}
    write_text(paths["json"], json.dumps(jsonable(comp.to_dict()), indent=2, sort_keys=True) + "\n")
    write_text(paths["html"], comparison_page(comp.to_dict()))
    return paths


def log_comparison(comp: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """Log the comparison to an MLflow run of its own (in the reference's experiment) and write its files there.

    Sets `comp.mlflow_run_id`, writes comparison.json and comparison.html (`write_comparison`) into
    `out_dir` and logs both as artifacts. Tags: kind = comparison, medxfer.compare_of = the compared
    run ids (comma-separated, reference first), medxfer.reference. Metrics, per compared run (suffix
    __<first 8 of its id> with 3+ runs): delta_auroc with delta_auroc_se, _ci_low, _ci_high, _p
    (clustered DeLong), delta_<auroc_bootstrap|brier|ece|nll|sensitivity|specificity> with _ci_low,
    _ci_high, _p (paired bootstrap), negative_transfer (1 or 0); and n_images, n_patients, n_boot.

    Returns:
        {"json": path, "html": path}.
    """
    ids = [str(r["run_id"]) for r in comp.runs]
    experiment = tracking.experiment_name(str(comp.runs[0].get("experiment_id"))) or "medxfer-compare"
    tags = {"kind": KIND, "medxfer.compare_of": ",".join(ids), "medxfer.reference": comp.reference}
    name = "compare " + " vs ".join(i[:8] for i in ids)
    with tracking.start_run(experiment, run_name=name, tags=tags) as run_id:
        comp.mlflow_run_id = run_id
        files = write_comparison(comp, out_dir)
        metrics: dict[str, float] = {"n_images": comp.n_images, "n_patients": comp.n_patients, "n_boot": comp.n_boot}
        for pair in comp.pairs:
            suffix = "" if len(comp.pairs) == 1 else f"__{str(pair['run_id'])[:8]}"
            for key, _, _ in QUANTITIES:
                r = pair.get(key)
                if not isinstance(r, dict):
                    continue
                for part in ("diff", "se", "ci_low", "ci_high", "p"):
                    if r.get(part) is not None:
                        metrics[f"delta_{key}{'' if part == 'diff' else '_' + part}{suffix}"] = float(r[part])
            metrics[f"negative_transfer{suffix}"] = float(pair["negative_transfer"])
        tracking.log_metrics(metrics)
        for path in files.values():
            tracking.log_artifact(path)
    return files


def console_table(comp: Comparison) -> str:
    """The comparison as plain-text tables, one per compared run (differences run − reference)."""
    lines = [
        f"reference {comp.reference}; {comp.n_images} shared test images of {comp.n_patients} patients "
        f"({comp.n_positive} positive, {comp.n_negative} negative); differences are run − reference"
    ]
    lines += [f"note: {n}" for n in comp.notes]
    runs = {str(r["run_id"]): r for r in comp.runs}
    for pair in comp.pairs:
        run = runs[str(pair["run_id"])]
        lines.append("")
        lines.append(f"{pair['run_id']} ({_describe(run)}) vs reference ({_describe(runs[comp.reference])})")
        rows = [["quantity", "run", "reference", "difference", "95% CI", "p", "method"]]
        for key, label, _ in QUANTITIES:
            r = pair.get(key)
            if isinstance(r, dict):
                rows.append(
                    [
                        label,
                        _f(r["value_a"]),
                        _f(r["value_b"]),
                        _f(r["diff"], signed=True),
                        f"{_f(r['ci_low'], signed=True)} to {_f(r['ci_high'], signed=True)}",
                        format_p(r["p"]),
                        str(r["method"]),
                    ]
                )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        thresholds = ", ".join(
            f"{r['run_id'][:8]} {r.get('threshold_rule') or 'threshold'} {_f(r.get('threshold'))}"
            for r in (run, runs[comp.reference])
        )
        lines.append(f"  sensitivity and specificity at each run's frozen threshold ({thresholds})")
        if pair.get("negative_transfer"):
            lines.append(
                "  NEGATIVE TRANSFER: the pretrained run ranks worse than the from-scratch reference (CI excludes 0)"
            )
    return "\n".join(lines)


def _describe(run: dict[str, Any]) -> str:
    return (
        f"weights {run.get('weights') or '?'}, {run.get('backbone') or '?'}, {run.get('dims') or '?'}, "
        f"{run.get('strategy') or '?'}"
    )


def _f(x: Any, signed: bool = False) -> str:
    if x is None or not np.isfinite(float(x)):
        return "—"
    return f"{float(x):+.3f}" if signed else f"{float(x):.3f}"


def format_p(x: Any) -> str:
    """A p-value as printed: three decimals, or <0.001."""
    if x is None:
        return "—"
    return "<0.001" if float(x) < 0.001 else f"{float(x):.3f}"


def ensure_out(out: str | Path | None, run_ids: Sequence[str]) -> Path:
    """The output folder (`--out`, else `default_out`); an existing file there is an error."""
    path = Path(out) if out else default_out(run_ids)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: is a file; expected a folder for comparison.json and comparison.html")
    return path


__all__ = [
    "COLUMNS",
    "DELONG",
    "KIND",
    "PREDICTIONS",
    "QUANTITIES",
    "RunTable",
    "check_run_ids",
    "compare_runs",
    "compare_tables",
    "console_table",
    "default_out",
    "ensure_out",
    "format_p",
    "load_run",
    "log_comparison",
    "write_comparison",
]
