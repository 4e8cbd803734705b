"""The manifest directory's files: ingest_report.json, manifest.parquet, quarantine.csv; load_manifest reads back."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.ingest.labels import LabelTable
from pipeline.ingest.pseudonym import key_id, source_ref
from pipeline.ingest.splits import KEYED_HASH
from pipeline.io import is_temp, write_bytes
from pipeline.records import MANIFEST_COLUMNS, SPLITS, QuarantineEntry

_TYPES = {"shape": pa.list_(pa.int64()), "spacing_mm": pa.list_(pa.float64()), "n_files": pa.int64()}


def build_report(
    relpaths: list[str],
    files: dict,
    units: list[dict],
    quarantine: list[QuarantineEntry],
    frame: pd.DataFrame,
    table: LabelTable | None,
    key: bytes,
    params: dict,
    split_source: str = KEYED_HASH,
) -> dict[str, Any]:
    """ingest_report.json: counts, label problems by line number, warnings by image_id; no paths or IDs.

    `split_source` says where the splits came from: "keyed-hash" (assign_splits) or "labels.csv".
    """
    kinds = Counter(e["kind"] for e in files.values())
    per_split = {split or "unlabeled": split_counts(frame[frame["split"] == split]) for split in (*SPLITS, "")}
    unit_warnings = [f"{r.image_id}: {w}" for r in frame.itertuples() for w in r.warnings.split(";") if w]
    labels: dict[str, Any] = {"given": table is not None}
    if table is not None:
        unlabeled = frame.loc[frame["label"] == "", "image_id"].tolist()
        labels.update(
            rows=table.n_rows,
            columns=table.columns,
            carried=table.carried,
            dropped=table.dropped,
            not_declared=table.not_declared,
            problems=table.problems,
            problem_counts=dict(Counter(p["problem"] for p in table.problems)),
            unlabeled_units=len(unlabeled),
            unlabeled_image_ids=unlabeled,
            warnings=table.warnings,
        )
    warnings = ["no image units found under SOURCE"] if frame.empty else []
    reused = sum(u["_reused"] for u in units)
    return {
        "format": 1,
        "key_id": key_id(key),
        "parameters": params,
        "files_seen": len(relpaths),
        "files": {"dicom": kinds["dicom"], "nifti": kinds["nifti"], "rejected_at_scan": kinds["bad"]},
        "units": len(frame),
        "units_reused": reused,
        "units_decoded": len(frame) - reused,
        "subjects": int(frame["subject_id"].nunique()),
        "units_by_modality": dict(sorted(Counter(frame["modality"]).items())),
        "units_by_format": dict(sorted(Counter(frame["source_format"]).items())),
        "quarantined": {
            "files": len(quarantine),
            "by_reason": dict(sorted(Counter(q.reason for q in quarantine).items())),
        },
        "split_source": split_source,
        "splits": per_split,
        "labels": labels,
        "warnings": warnings,
        "unit_warnings": unit_warnings,
        "manifest_sha256": "",
    }


def split_counts(part: pd.DataFrame) -> dict[str, Any]:
    """One split's entry of the report: units, subjects, units by label, subjects by label and their fraction.

    `prevalence` is the fraction of the split's subjects with at least one image of each label
    (a subject with images of two labels counts for both).
    """
    subjects = int(part["subject_id"].nunique())
    by_subject = part.groupby("label")["subject_id"].nunique()
    return {
        "units": len(part),
        "subjects": subjects,
        "by_label": dict(sorted(Counter(part["label"]).items())),
        "subjects_by_label": {str(lab): int(n) for lab, n in sorted(by_subject.items())},
        "prevalence": {str(lab): round(int(n) / subjects, 4) for lab, n in sorted(by_subject.items())},
    }


def write_outputs(out_dir: Path, frame: pd.DataFrame, quarantine: list[QuarantineEntry], report: dict) -> None:
    """Write manifest.parquet, quarantine.csv and ingest_report.json atomically; the report gets the manifest sha256."""
    fields = [pa.field(c, _TYPES.get(c, pa.string())) for c in frame.columns]
    table = pa.Table.from_pandas(frame, schema=pa.schema(fields), preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "reason", "detail"])
    writer.writerows([q.path, q.reason, q.detail] for q in quarantine)
    report["manifest_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    write_bytes(out_dir / "quarantine.csv", text.getvalue().encode())
    write_bytes(out_dir / "manifest.parquet", buf.getvalue())
    write_bytes(out_dir / "ingest_report.json", (json.dumps(report, indent=2) + "\n").encode())


def remove_stale_images(out_dir: Path, keep: set[str]) -> tuple[int, int]:
    """Delete images/ files (``img-*.nii``) not named in `keep`, and temp files of a killed writer.

    Returns:
        (files removed, their bytes).
    """
    removed, freed = 0, 0
    if not (out_dir / "images").is_dir():
        return removed, freed
    for path in (out_dir / "images").iterdir():
        stale = path.name.endswith(".nii") and path.name not in keep and path.name.startswith("img-")
        if stale or is_temp(path):
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size
                path.unlink()
                removed, freed = removed + 1, freed + size
    return removed, freed


STRICT_QUARANTINE = "quarantine-strict.csv"
_SHOWN = 50  # quarantined files listed in the strict error; the rest are counted


def strict_message(
    out_dir: Path, quarantine: list[QuarantineEntry], table: LabelTable | None, key: bytes, relpaths: list[str]
) -> str:
    """The error of a strict ingest: every quarantined file (first 50) and conflicting labels row, and the fix.

    Files are named by their pseudonymised reference (`source_ref`), never by path: archive folders
    often carry patient names and IDs. Writes `STRICT_QUARANTINE` (ref, path, reason, detail of
    every quarantined file) into `out_dir` for the people who run the archive; the message points there.
    """
    refs = {rel: source_ref(key, rel) for rel in relpaths}
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["ref", "path", "reason", "detail"])
    writer.writerows([refs.get(q.path) or source_ref(key, q.path), q.path, q.reason, q.detail] for q in quarantine)
    listing = out_dir / STRICT_QUARANTINE
    write_bytes(listing, text.getvalue().encode())
    lines = [
        f"  {q.reason:<20} {refs.get(q.path) or source_ref(key, q.path)}: {_without_paths(q.detail, refs)}"
        for q in quarantine[:_SHOWN]
    ]
    if len(quarantine) > _SHOWN:
        lines.append(f"  ... and {len(quarantine) - _SHOWN} more")
    conflicts = [p for p in (table.problems if table else []) if p["problem"] == "conflict"]
    lines += [f"  labels line {p['line']}: {p['detail']}" for p in conflicts]
    return (
        f"strict ingest stopped: {len(quarantine)} file(s) quarantined and {len(conflicts)} conflicting labels "
        "row(s); the previous manifest (if any) is unchanged. Files are named by pseudonymised reference (archive "
        f"paths can hold patient names and IDs); {listing} gives each reference's path, reason and detail.\n"
        + "\n".join(lines)
        + "\nFix: repair or remove these files and rows, or quarantine them and go on: ingest without --strict, "
        "or set data.strict: false in the config of train/run"
    )


def _without_paths(detail: str, refs: dict[str, str]) -> str:
    """`detail` with every archive path in it replaced by its reference (longest paths first)."""
    for rel in sorted((r for r in refs if r in detail), key=len, reverse=True):
        detail = detail.replace(rel, refs[rel])
    return detail


def previous_splits(out_dir: Path, key: bytes, *, val: float, test: float, seed: int) -> tuple[dict[str, str], str]:
    """The splits of the manifest already in `out_dir`, and why they cannot be kept ("" when they can).

    They can be kept when ingest_report.json describes this manifest.parquet (same sha256), was made
    with the same pseudonym key, seed and fractions, and its splits came from the keyed hash (not
    from a labels.csv split column).

    Returns:
        (subject → split of every labelled subject of the previous manifest, {} when there is none
        or it cannot be read; the reason not to keep them, or "").
    """
    path = out_dir / "manifest.parquet"
    if not path.is_file():
        return {}, ""
    try:
        frame = load_manifest(out_dir)
        report = json.loads((out_dir / "ingest_report.json").read_text(encoding="utf-8"))
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
    except (DataError, OSError, ValueError) as exc:
        return {}, f"the previous manifest or its ingest_report.json cannot be read ({type(exc).__name__})"
    labelled = frame[frame["split"] != ""]
    splits = dict(zip(labelled["subject_id"], labelled["split"], strict=True))
    if labelled.groupby("subject_id")["split"].nunique().gt(1).any():
        return splits, "a patient spans two splits in the previous manifest"
    return splits, _why_not_kept(report, sha, key, {"seed": seed, "val": val, "test": test})


def _why_not_kept(report: Any, sha: str, key: bytes, now: dict[str, float]) -> str:
    if not isinstance(report, dict) or report.get("manifest_sha256") != sha:
        return "ingest_report.json does not describe the previous manifest.parquet"
    if report.get("key_id") != key_id(key):
        return "the previous manifest was made with another pseudonym key"
    if report.get("split_source", KEYED_HASH) != KEYED_HASH:
        return f"the previous splits came from {report.get('split_source')!r}, not from the keyed hash"
    before = report.get("parameters")
    before = before if isinstance(before, dict) else {}
    changed = [f"{k} {before.get(k)!r} → {v!r}" for k, v in now.items() if before.get(k) != v]
    return f"data.split changed ({', '.join(changed)})" if changed else ""


def load_manifest(manifest_dir: str | Path) -> pd.DataFrame:
    """Read and validate manifest.parquet.

    Args:
        manifest_dir: The manifest directory `ingest` wrote.

    Returns:
        The manifest with `shape` and `spacing_mm` as Python lists.

    Raises:
        DataError: If the file is missing or unreadable, the columns are not MANIFEST_COLUMNS in
            order, image_ids repeat, or a split value is unknown.
    """
    path = Path(manifest_dir) / "manifest.parquet"
    if not path.is_file():
        raise DataError(f"{path} not found; run `medxfer ingest SOURCE --labels CSV --out {manifest_dir}` first")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:
        raise DataError(f"{path} is not a readable parquet file ({type(exc).__name__}); re-run medxfer ingest") from exc
    found, expected = list(frame.columns), list(MANIFEST_COLUMNS)
    if found[: len(expected)] != expected:
        missing = [c for c in expected if c not in found]
        raise DataError(
            f"{path} does not start with the manifest columns in order (missing {missing}); found "
            f"{found}, expected {expected} then subgroup columns. Fix: re-run medxfer ingest"
        )
    bad = sorted(set(frame["split"]) - {*SPLITS, ""})
    if bad or frame["image_id"].duplicated().any():
        what = f"unknown split value(s) {bad} (expected {list(SPLITS)} or '')" if bad else "repeated image_id values"
        raise DataError(f"{path} holds {what}; it was not written by medxfer ingest. Fix: re-run medxfer ingest")
    frame["shape"] = [[int(v) for v in s] for s in frame["shape"]]
    frame["spacing_mm"] = [[float(v) for v in s] for s in frame["spacing_mm"]]
    return frame
