"""The audit report: gather a run's MLflow record and its pseudonymised manifest, render one HTML file."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import __version__, tracking
from pipeline.errors import DataError, MedxferError
from pipeline.io import write_text
from pipeline.records import SPLITS
from pipeline.report.compare import collect_comparison
from pipeline.report.page import render_page
from pipeline.report.view import build_view

ARTIFACTS = {
    "config": "config.json",
    "adaptation": "adaptation_summary.json",
    "training": "training_summary.json",
    "evaluation": "evaluation.json",
}
FIGURES = ("roc", "pr", "confusion", "reliability", "training_curves")
COHORT_ATTRIBUTES = ("sex", "age_band", "site", "manufacturer", "modality")
PACKAGES = (
    "medxfer",
    "torch",
    "torchvision",
    "timm",
    "monai",
    "mlflow",
    "numpy",
    "pandas",
    "scikit-learn",
    "scipy",
    "pydicom",
    "nibabel",
    "jinja2",
    "matplotlib",
)
_PROGRESS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
_CODE = re.compile(r"^[a-z0-9][a-z0-9 _.\-/()]{0,59}$")


def write_report(
    run_id: str, out: str | Path, *, tracking_uri: str | None = None, manifest_dir: str | Path | None = None
) -> Path:
    """Write the self-contained HTML audit report of an MLflow run.

    Args:
        run_id: the MLflow run (as printed by `medxfer train`).
        out: the HTML file to write (parent folders are created); written atomically.
        tracking_uri: the MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).
        manifest_dir: the run's manifest folder; default the run's `data.manifest` setting.

    Returns:
        The path of the written report.

    Raises:
        TrackingError: the store cannot be used or the run does not exist.
    """
    html = render_report(collect_context(run_id, tracking_uri, manifest_dir))
    path = Path(out)
    write_text(path, html)
    return path


def render_report(context: dict[str, Any]) -> str:
    """Render a context (as `collect_context` returns; any part may be missing) to an HTML string."""
    return render_page(build_view(context))


def collect_context(
    run_id: str, tracking_uri: str | None = None, manifest_dir: str | Path | None = None
) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-like data: MLflow record, artifacts, cohort counts.

    Only counts leave the manifest folder (no paths, no pseudonyms, no quarantine details). A
    missing or unreadable piece becomes None plus a line in `problems`; it never raises, except
    for a store or run that cannot be read at all (TrackingError).
    """
    uri = tracking.connect(tracking_uri, existing=True)
    run = tracking.get_run(run_id)
    problems: list[str] = []
    ctx: dict[str, Any] = {
        "run_id": run_id,
        "tracking_uri": uri,
        "run": run,
        "problems": problems,
        "experiment": tracking.experiment_name(run["experiment_id"]),
        "generated_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    ctx["run"]["start_time"] = _start_time(run)
    with tempfile.TemporaryDirectory(prefix="medxfer-report-") as tmp, _quiet_downloads():
        for key, name in ARTIFACTS.items():
            ctx[key] = _read_json(run_id, name, Path(tmp), problems)
        ctx["figures"] = _read_figures(run_id, Path(tmp))
        req = _fetch(run_id, "model/requirements.txt", Path(tmp))
        ctx["requirements"] = _requirements(req) if req else []
        splits = _read_json(run_id, "splits.json", Path(tmp), problems)
        ctx["baseline"] = _baseline(run, problems)
        ctx["comparison"] = collect_comparison(run_id, ctx["baseline"], ctx["config"], uri)
    data = ctx["config"].get("data") if isinstance(ctx["config"], dict) else None
    folder = manifest_dir or (data.get("manifest") if isinstance(data, dict) else None)
    ctx["cohort"], ctx["ingest"] = _manifest_parts(folder, splits, problems)
    ctx["environment"] = _environment()
    return ctx


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No MLflow download progress bars while the report fetches a handful of small files."""
    old = os.environ.get(_PROGRESS)
    os.environ[_PROGRESS] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_PROGRESS, None)
        else:
            os.environ[_PROGRESS] = old


def _start_time(run: dict[str, Any]) -> str | None:
    try:
        rows = tracking.search_runs(run["experiment_id"], f"attributes.run_id = '{run['run_id']}'", 1)
    except MedxferError:
        return None
    ms = rows[0].get("start_time") if rows else None
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M UTC") if ms else None


def _fetch(run_id: str, path: str, tmp: Path) -> Path | None:
    """Download one artifact into `tmp`; None when the run does not have it."""
    try:
        local = tracking.download_artifacts(run_id, path, tmp)
    except Exception:  # MlflowException / OSError: absent artifact; the section says "not available"
        return None
    return local if local.exists() else None


def _read_json(run_id: str, name: str, tmp: Path, problems: list[str]) -> Any:
    path = _fetch(run_id, name, tmp)
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(
            f"artifact {name} of run {run_id} is unreadable ({type(exc).__name__}); re-run the stage that writes it"
        )
        return None


def _read_figures(run_id: str, tmp: Path) -> dict[str, str]:
    folder = _fetch(run_id, "figures", tmp)
    out: dict[str, str] = {}
    for name in FIGURES:
        path = folder / f"{name}.png" if folder else None
        if path is not None and path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n":
            out[name] = base64.b64encode(path.read_bytes()).decode("ascii")
    return out


def _requirements(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [s.strip() for s in lines if re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+\s*[=<>!~]=?\s*[\w.+\-*]+", s.strip())]


def _code(text: Any) -> str:
    """A short machine-written code (quarantine reason, warning kind) or 'other': never free text."""
    s = str(text).split(":", 1)[0].strip().lower()
    return s if _CODE.match(s) and not re.search(r"\d{4,}", s) else "other"


def _manifest_parts(folder: Any, splits: Any, problems: list[str]) -> tuple[dict | None, dict | None]:
    """Cohort tables and exclusion counts from the manifest folder (or splits.json as a fallback)."""
    frame, ingest = None, None
    root = Path(folder) if folder else None
    if root is not None and (root / "manifest.parquet").is_file():
        try:
            frame = pd.read_parquet(root / "manifest.parquet")
        except Exception as exc:  # pyarrow raises several types for a damaged file
            problems.append(
                f"{root / 'manifest.parquet'} is unreadable ({type(exc).__name__}); re-run `medxfer ingest`"
            )
        ingest = _ingest_parts(root, problems)
    elif root is not None:
        problems.append(
            f"manifest folder {root} holds no manifest.parquet: cohort and exclusions come "
            "from the run's splits.json only; pass manifest_dir to write_report to include them"
        )
    source = "manifest"
    if frame is None and isinstance(splits, dict):
        try:
            frame, source = pd.DataFrame(splits), "splits.json"
        except ValueError:
            frame = None
    if frame is None:
        return None, ingest
    try:
        cohort = cohort_tables(frame)
    except DataError as exc:
        problems.append(f"cohort counts not available: {exc}")
        return None, ingest
    cohort["source"] = source
    if source == "manifest" and root is not None:
        cohort["manifest_hash"] = hashlib.sha256((root / "manifest.parquet").read_bytes()).hexdigest()[:16]
    return cohort, ingest


def cohort_tables(frame: pd.DataFrame) -> dict[str, Any]:
    """Counts of images and patients by split and class, and of images by subgroup attribute × split.

    Binary tasks also get the realised prevalence per split (`prevalence`: split → the fraction of
    its patients with an image of the positive class, the last class), which stratified splitting
    keeps close to the cohort's.
    """
    if "split" not in frame.columns or "label" not in frame.columns:
        raise DataError(f"manifest: needs 'split' and 'label' columns, found {sorted(frame.columns)}")
    frame = frame.assign(
        split=frame["split"].fillna("").astype(str).replace("", "unlabelled"),
        label=frame["label"].fillna("").astype(str),
    )
    splits = [s for s in (*SPLITS, "unlabelled") if s in set(frame["split"])]
    classes = sorted({c for c in frame["label"] if c}, key=_class_key)
    rows = []
    prevalence: dict[str, float] = {}
    for split in [*splits, "total"]:
        part = frame if split == "total" else frame[frame["split"] == split]
        counts = part["label"].value_counts()
        if len(classes) == 2 and "subject_id" in part and len(part) and split != "unlabelled":
            positive = part.loc[part["label"] == classes[-1], "subject_id"].nunique()
            prevalence[split] = round(positive / part["subject_id"].nunique(), 4)
        rows.append(
            [
                split,
                len(part),
                part["subject_id"].nunique() if "subject_id" in part else None,
                *[int(counts.get(c, 0)) for c in classes],
            ]
        )
    out: dict[str, Any] = {
        "splits": splits,
        "classes": classes,
        "by_split": rows,
        "prevalence": prevalence,
        "n_images": len(frame),
        "attributes": [],
    }
    for attr in COHORT_ATTRIBUTES:
        if attr not in frame.columns:
            continue
        values = frame[attr].fillna("").astype(str).replace("", "missing")
        table = pd.crosstab(values, frame["split"]).reindex(columns=splits, fill_value=0)
        out["attributes"].append(
            {
                "name": attr,
                "rows": [
                    [str(v), *map(int, table.loc[v]), int(table.loc[v].sum())]
                    for v in sorted(table.index, key=_class_key)
                ],
            }
        )
    if "warnings" in frame.columns:
        flagged = Counter(
            _code(w) for cell in frame["warnings"].fillna("").astype(str) for w in cell.split(";") if w.strip()
        )
        out["flagged"] = dict(flagged.most_common())
        out["n_flagged"] = int((frame["warnings"].fillna("").astype(str).str.strip() != "").sum())
    return out


def _class_key(value: str) -> tuple[int, float | str]:
    try:
        return 0, float(value)
    except ValueError:
        return 1, value


def _ingest_parts(root: Path, problems: list[str]) -> dict[str, Any]:
    """Quarantine counts by reason, and counts, label problems and warnings from ingest_report.json."""
    out: dict[str, Any] = {
        "quarantine": None,
        "counts": None,
        "label_problems": None,
        "warnings": [],
        "unit_warnings": None,
        "split_source": None,
    }
    qpath = root / "quarantine.csv"
    if qpath.is_file():
        with qpath.open(newline="", encoding="utf-8", errors="replace") as fh:
            out["quarantine"] = dict(Counter(_code(r.get("reason", "")) for r in csv.DictReader(fh)).most_common())
    rpath = root / "ingest_report.json"
    if not rpath.is_file():
        return out
    try:
        report = json.loads(rpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"{rpath} is unreadable ({type(exc).__name__}); re-run `medxfer ingest`")
        return out
    if not isinstance(report, dict):
        return out
    labels: dict[str, Any] = report["labels"] if isinstance(report.get("labels"), dict) else {}
    out["counts"] = _numbers(report)
    out["split_source"] = _code(report["split_source"]) if isinstance(report.get("split_source"), str) else None
    out["label_problems"] = _problem_kinds(labels.get("problems", report.get("label_problems", [])))
    out["warnings"] = [_safe_text(w) for w in [*_texts(report.get("warnings")), *_texts(labels.get("warnings"))]]
    units = [re.sub(r"^img-[0-9a-f]+:\s*", "", w) for w in _texts(report.get("unit_warnings"))]
    out["unit_warnings"] = dict(Counter(_code(w) for w in units).most_common()) if units else None
    return out


# shown elsewhere (cohort, quarantine tables) or not counts
_SKIP = {"parameters", "splits", "by_reason", "format", "units_by_modality", "units_by_format", "units_decoded"}


def _numbers(obj: Any, prefix: str = "", depth: int = 0) -> dict[str, float]:
    """Numeric leaves of nested dicts as 'a.b' → number (keys reduced to codes; lists and _SKIP skipped)."""
    out: dict[str, float] = {}
    if not isinstance(obj, dict) or depth > 3:
        return out
    for key, value in obj.items():
        if str(key) in _SKIP or isinstance(value, bool):
            continue
        name = f"{prefix}{_code(key)}"
        if isinstance(value, int | float):
            out[name] = value
        elif isinstance(value, dict):
            out.update(_numbers(value, name + ".", depth + 1))
    return out


def _texts(value: Any) -> list[str]:
    return [str(v) for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _safe_text(text: str) -> str:
    """A machine-written warning, shown as is unless it looks like it holds a path or an identifier."""
    if re.search(r"[/\\^]|\d{6,}|\b\d+\.\d+\.\d+\.\d+", text):
        return "(a warning withheld from the report: it may name a path or identifier; see ingest_report.json)"
    return text if len(text) <= 300 else text[:297] + "..."


def _problem_kinds(value: Any) -> dict[str, dict[str, Any]]:
    """Label problems by kind: {kind: {"count", "lines"}} (labels.csv line numbers; details are not kept)."""
    out: dict[str, dict[str, Any]] = {}
    for item in value if isinstance(value, list) else []:
        if not isinstance(item, dict):
            item = {"problem": re.sub(r"^\s*(row|line)s?\s+[\d, ]+[:\-]?\s*", "", str(item), flags=re.I)}
        kind = _code(next((item[k] for k in ("problem", "kind", "reason", "type") if k in item), "other"))
        entry = out.setdefault(kind, {"count": 0, "lines": []})
        entry["count"] += 1
        line = item.get("line", item.get("row"))
        if isinstance(line, int) and not isinstance(line, bool):
            entry["lines"].append(line)
    return out


def _baseline(run: dict[str, Any], problems: list[str]) -> dict[str, Any] | None:
    """The newest evaluated from-scratch run (model.weights = none) of the same experiment, if any."""
    if run["params"].get("model.weights") == "none":
        return None
    found: dict[str, dict[str, Any]] = {}
    for where in ("params", "tags"):
        try:
            for r in tracking.search_runs(run["experiment_id"], f"{where}.\"model.weights\" = 'none'"):
                found.setdefault(r["run_id"], r)
        except MedxferError as exc:
            problems.append(f"baseline search failed: {exc}")
    candidates = [r for r in found.values() if r["run_id"] != run["run_id"]]
    same_data = run["tags"].get("manifest_hash")
    candidates.sort(
        key=lambda r: (
            "test_auroc" in r["metrics"],
            r["tags"].get("manifest_hash") == same_data,
            r.get("start_time") or 0,
        ),
        reverse=True,
    )
    return candidates[0] if candidates else None


def _environment() -> dict[str, str]:
    out = {"medxfer": __version__}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
