"""The console summary of an ingest: every exclusion class with its count, from ingest_report.json alone.

Counts only: no paths, folder names or patient ids (those stay in quarantine.csv, which stays local).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

DUPLICATE = "duplicate-of"
# labels.csv problems: (what one row is, what happened to it)
_LABEL_PROBLEMS = {
    "no-images": ("labels row for a patient with no images", "labels rows for patients with no images"),
    "empty-label": ("labels row with an empty label: unlabelled", "labels rows with an empty label: unlabelled"),
    "empty-patient-id": ("labels row without patient_id: ignored", "labels rows without patient_id: ignored"),
    "duplicate": ("repeated labels row: used once", "repeated labels rows: used once"),
    "bad-age": ("labels row with an unreadable age: no age_band", "labels rows with an unreadable age: no age_band"),
}


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def _by_count(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Console lines for `report` (ingest_report.json), e.g.

    ``63 files: 59 in 12 image units, 2 quarantined (1 truncated, 1 too-large), 2 duplicates (duplicate-of)``
    then, when there are any, skipped hidden entries and symlinked folders, and every kind of labels
    problem with its count (rows for patients without images, patients with conflicting rows, ...).
    """
    reasons = dict(report.get("quarantined", {}).get("by_reason", {}))
    duplicates = reasons.pop(DUPLICATE, 0)
    quarantined = sum(reasons.values())
    first = (
        f"{_n(report.get('files_seen', 0), 'file')}: {report.get('files_in_units', 0)} in "
        f"{_n(report.get('units', 0), 'image unit')}, {quarantined} quarantined"
    )
    first += f" ({_by_count(reasons)})" if reasons else ""
    first += f", {_n(duplicates, 'duplicate')} ({DUPLICATE})" if duplicates else ""
    lines = [first]
    skipped = report.get("skipped", {})
    parts = []
    if skipped.get("hidden"):
        parts.append(_n(skipped["hidden"], "hidden file or folder", "hidden files and folders"))
    if skipped.get("symlinked_folders"):
        parts.append(_n(skipped["symlinked_folders"], "symlinked folder") + " (not followed)")
    if parts:
        lines.append("skipped: " + ", ".join(parts))
    labels = report.get("labels", {})
    if labels.get("given"):
        parts = _label_parts(labels)
        if parts:
            lines.append("labels: " + "; ".join(parts))
    if quarantined or duplicates:
        lines.append("which files and why: quarantine.csv in the manifest folder (paths; keep it local)")
    return lines


def _label_parts(labels: dict[str, Any]) -> list[str]:
    problems = labels.get("problems", [])
    counts = Counter(str(p.get("problem")) for p in problems)
    parts = []
    for code, (one, many) in _LABEL_PROBLEMS.items():
        if counts.get(code):
            parts.append(_n(counts[code], one, many))
    conflicts = [p for p in problems if p.get("problem") == "conflict"]
    if conflicts:
        patients = len({p.get("first_line", p.get("line")) for p in conflicts})
        parts.append(_n(patients, "patient with conflicting labels rows", "patients with conflicting labels rows"))
        parts[-1] += ": unlabelled"
    parts += [_n(n, f"labels row with problem {code}") for code, n in sorted(counts.items()) if code not in _KNOWN]
    if labels.get("unlabeled_units"):
        parts.append(_n(labels["unlabeled_units"], "image unit") + " without a label (kept, in no split)")
    return parts


_KNOWN = {*_LABEL_PROBLEMS, "conflict"}
