"""ingest(): archive (DICOM + NIfTI) → manifest directory in two passes: scan every header, decode each unit."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError, DataError
from pipeline.ingest.cache import CACHE_VERSION, load_cache, path_key, save_cache
from pipeline.ingest.dicom import DicomHeader, read_header
from pipeline.ingest.dicom_pixels import decode_plan
from pipeline.ingest.dicom_series import UnitPlan, plan_units
from pipeline.ingest.labels import LabelTable, join_labels, read_labels
from pipeline.ingest.nifti import (
    UnitError,
    bids_modality,
    check_nifti_header,
    content_sha256,
    finish_volume,
    is_nifti,
    load_nifti,
    nifti_bytes,
    nifti_study,
    nifti_subject,
)
from pipeline.ingest.outputs import (
    STRICT_QUARANTINE,
    build_report,
    previous_splits,
    remove_stale_images,
    strict_message,
    write_outputs,
)
from pipeline.ingest.pseudonym import load_or_create_key, pseudonym, resolve_key_file
from pipeline.ingest.splits import KEYED_HASH, LABELS_CSV, check_fractions, history_warnings
from pipeline.io import LOCK_NAME, disk_full_message, exclusive, free_bytes, is_disk_full, megabytes, write_bytes
from pipeline.records import MANIFEST_COLUMNS, IngestResult, QuarantineEntry

logger = logging.getLogger(__name__)

_SCAN_BATCH = 32


def ingest(
    source: str | Path,
    labels: str | Path | None,
    out: str | Path,
    *,
    key_file: str | Path | None = None,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    strict: bool = False,
    workers: int = 1,
    progress: bool = True,
    subgroups: Sequence[str] = (),
) -> IngestResult:
    """Turn an archive of DICOM series and NIfTI volumes into a pseudonymised manifest directory.

    Writes under `out` (each file atomically, the manifest only once everything succeeded):
    ``manifest.parquet``, ``images/<image_id>.nii``, ``quarantine.csv`` and ``ingest_report.json``
    (see data_manifests/README.md). Re-running reuses unchanged units (cache keyed by file
    size, mtime and path) and keeps image_ids stable. One ingest at a time per folder: the
    folder's lock (``.medxfer.lock``, see `pipeline.io.exclusive`) refuses a second one at once.
    On a full disk the images this run wrote are removed and the previous manifest is kept.

    Args:
        source: Archive root folder (searched recursively; hidden files are skipped).
        labels: labels.csv (patient_id,label[,sex,age,site,...]) or None for an unlabeled archive.
        out: Manifest directory (created if missing).
        key_file: Pseudonym key; default $MEDXFER_KEY_FILE, else ~/.medxfer/pseudonym.key.
        val: Fraction of patients for validation.
        test: Fraction of patients for test.
        seed: Split seed.
        strict: Raise DataError (listing every problem) if any file is quarantined or labels conflict.
        workers: Processes for scanning and decoding (1 = in-process). Pools use "spawn", so a
            script calling this with workers > 1 needs an ``if __name__ == "__main__":`` guard.
        progress: Show progress bars (stderr).
        subgroups: labels.csv columns to carry as subgroups besides sex, age (as age_band) and
            site; every other column is left out (see `read_labels`).

    Returns:
        IngestResult with the manifest directory, counts and the report dict.

    Raises:
        ConfigError: Bad fractions, workers, a key file inside `out`, or an identifying subgroup.
        DataError: Missing source/labels, a malformed labels file, identifier-like subgroup values,
            (strict) quarantined files, or a full disk.
        BusyError: Another process is writing `out`.
    """
    src, out_dir, labels_path = _check_args(source, labels, out, val, test, workers)
    with exclusive(out_dir / LOCK_NAME, f"manifest folder {out_dir}"):
        images = out_dir / "images"
        before = {p.name for p in images.iterdir()} if images.is_dir() else set()
        previous = (out_dir / "manifest.parquet").is_file()
        need: list[str] = []
        try:
            return _ingest(
                src, out_dir, labels_path, key_file, val, test, seed, strict, workers, progress, subgroups, need
            )
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            free_then = free_bytes(out_dir)
            removed, freed = remove_stale_images(out_dir, before)
            kept = "the previous manifest is unchanged" if previous else "no manifest was written"
            done = f"The {removed} image file(s) ({megabytes(freed)}) this run had written were removed; {kept}."
            raise DataError(disk_full_message("ingest", out_dir, exc, "".join(need), done, free_then)) from exc


def _ingest(
    src: Path,
    out_dir: Path,
    labels_path: Path | None,
    key_file: str | Path | None,
    val: float,
    test: float,
    seed: int,
    strict: bool,
    workers: int,
    progress: bool,
    subgroups: Sequence[str],
    need: list[str],
) -> IngestResult:
    """The body of `ingest`, under the folder's lock; appends to `need` the space the units to decode take."""
    key, key_notes = load_or_create_key(resolve_key_file(key_file, out_dir))
    table = read_labels(labels_path, key, subgroups) if labels_path else None
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    cache = load_cache(out_dir, key)
    relpaths = _walk(src, {out_dir, *([labels_path] if labels_path else [])})
    with _Runner(workers, progress) as run:
        files = _scan(src, relpaths, key, cache, run)
        plans, quarantine = _plan_all(files, table, key)
        need.append(_need(plans, files, cache, out_dir))
        built = _build(src, out_dir, plans, files, cache, run)
    units, quarantine = _collect(plans, built, quarantine)
    previous, why_not = previous_splits(out_dir, key, val=val, test=test, seed=seed)
    split_notes = join_labels(units, table, key, val=val, test=test, seed=seed, previous=None if why_not else previous)
    source = LABELS_CSV if table is not None and table.split_given else KEYED_HASH
    current = {u["subject_id"]: u["split"] for u in units}
    split_notes = history_warnings(previous, why_not, current, source) + split_notes
    frame = _frame(units, table)
    save_cache(out_dir, key, files, built)
    if strict and (quarantine or (table is not None and table.n_conflicts)):
        raise DataError(strict_message(out_dir, quarantine, table, key, relpaths))
    params = {"val": val, "test": test, "seed": seed, "strict": strict, "labels": labels_path is not None}
    report = build_report(relpaths, files, units, quarantine, frame, table, key, params, source)
    report["warnings"] = key_notes + split_notes + report["warnings"]
    write_outputs(out_dir, frame, quarantine, report)
    (out_dir / STRICT_QUARANTINE).unlink(missing_ok=True)  # that failure's listing is out of date now
    remove_stale_images(out_dir, {f"{i}.nii" for i in frame["image_id"]})
    logger.info("ingest: %d image units, %d files quarantined", len(frame), len(quarantine))
    return IngestResult(str(out_dir), len(frame), len(quarantine), report)


def _need(plans: list[UnitPlan], files: dict[str, dict[str, Any]], cache: dict, out_dir: Path) -> str:
    """The space the units to decode take, estimated from their source files (compressed DICOM takes more)."""
    total = 0
    for plan in plans:
        old = cache["units"].get(plan.image_id)
        if not (old and (out_dir / "images" / f"{plan.image_id}.nii").is_file()):
            total += sum(max(0, files[rel]["size"]) for rel in plan.files)
    return f"its {megabytes(total)} of source files to decode need about as much space (compressed DICOM more)"


def _check_args(
    source: str | Path, labels: str | Path | None, out: str | Path, val: float, test: float, workers: int
) -> tuple[Path, Path, Path | None]:
    check_fractions(val, test)
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers={workers!r} must be a whole number >= 1 (1 = no process pool)")
    src = Path(source).expanduser().resolve()
    if not src.is_dir():
        raise DataError(f"SOURCE {source} is not a folder; pass the root folder of the DICOM/NIfTI archive")
    labels_path = Path(labels).expanduser().resolve() if labels else None
    if labels_path is not None and not labels_path.is_file():
        raise DataError(
            f"labels file {labels} not found; pass a CSV with columns patient_id,label[,...] "
            "or leave labels out to ingest unlabeled"
        )
    return src, Path(out).expanduser().resolve(), labels_path


def _walk(source: Path, skip: set[Path]) -> list[str]:
    """Relative posix paths of every non-hidden file under `source`, sorted; `skip` paths left out."""
    found = []
    for root, dirs, names in os.walk(source):
        base = Path(root)
        real, prefix = base.resolve(), base.relative_to(source).as_posix()

        def resolved(name: str, base: Path = base, real: Path = real) -> Path:  # realpath only for symlinks
            return (base / name).resolve() if (base / name).is_symlink() else real / name

        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and resolved(d) not in skip)
        found += [
            n if prefix == "." else f"{prefix}/{n}" for n in names if not n.startswith(".") and resolved(n) not in skip
        ]
    return sorted(found)


class _Runner:
    """Runs a function over tasks in-process or in a spawn process pool, with a rich progress bar."""

    def __init__(self, workers: int, progress: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not progress,
        )

    def __enter__(self) -> _Runner:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def map(self, fn: Callable[..., Any], tasks: list[tuple], description: str, sizes: list[int]) -> list[Any]:
        task = self.bar.add_task(description, total=sum(sizes))
        results: list[Any] = [None] * len(tasks)
        if self.pool is None and self.workers > 1 and len(tasks) > 1:  # started on first real use
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        if self.pool is None:
            for i, args in enumerate(tasks):
                results[i] = fn(*args)
                self.bar.advance(task, sizes[i])
            return results
        futures = {self.pool.submit(fn, *args): i for i, args in enumerate(tasks)}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            self.bar.advance(task, sizes[futures[fut]])
        return results


# --------------------------------------------------------------------------------------------- scan


def _scan_batch(source: str, relpaths: list[str], key: bytes) -> list[dict[str, Any]]:
    """Worker: classify and read the header of each file (pseudonymised; safe to cache)."""
    out = []
    for rel in relpaths:
        path = Path(source) / rel
        entry: dict[str, Any] = {"size": -1, "mtime_ns": -1, "kind": "bad", "header": None}
        try:
            st = path.stat()
            entry.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
            if is_nifti(rel):
                entry.update(kind="nifti", header={"shape": list(check_nifti_header(path))})
            else:
                entry.update(kind="dicom", header=dict(vars(read_header(path, rel, key))))
        except UnitError as exc:
            entry.update(reason=exc.reason, detail=_clean(exc.detail, source))
        except OSError as exc:
            entry.update(reason="unsupported", detail=f"the file cannot be read ({type(exc).__name__})")
        except Exception as exc:  # an unreadable file must not stop the run
            entry.update(reason="decode-error", detail=_clean(f"{type(exc).__name__}: {exc}", source))
        out.append(entry)
    return out


def _scan(src: Path, relpaths: list[str], key: bytes, cache: dict, run: _Runner) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    todo = []
    for rel in relpaths:
        try:
            st = (src / rel).stat()
        except OSError:  # a broken link: the worker records why
            todo.append(rel)
            continue
        old = cache["files"].get(path_key(key, rel))
        if old and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns:
            files[rel] = {
                **old,
                "header": {**old["header"], "relpath": rel} if old["kind"] == "dicom" else old["header"],
            }
        else:
            todo.append(rel)
    batches = [todo[i : i + _SCAN_BATCH] for i in range(0, len(todo), _SCAN_BATCH)]
    results = run.map(_scan_batch, [(str(src), b, key) for b in batches], "scanning files", [len(b) for b in batches])
    for batch, entries in zip(batches, results, strict=True):
        files.update(zip(batch, entries, strict=True))
    return dict(sorted(files.items()))


def _plan_all(
    files: dict[str, dict[str, Any]], table: LabelTable | None, key: bytes
) -> tuple[list[UnitPlan], list[QuarantineEntry]]:
    quarantine = [QuarantineEntry(rel, e["reason"], e["detail"]) for rel, e in files.items() if e["kind"] == "bad"]
    headers = [DicomHeader(**e["header"]) for e in files.values() if e["kind"] == "dicom"]
    plans, dropped = plan_units(headers, key)
    plans += [_nifti_plan(rel, table, key) for rel, e in files.items() if e["kind"] == "nifti"]
    return plans, quarantine + dropped


def _nifti_plan(rel: str, table: LabelTable | None, key: bytes) -> UnitPlan:
    row = table.by_path.get(rel) if table else None
    if row is not None:
        subject_id, study = row.subject_id, nifti_study(rel, row.subject_id)
    else:
        raw = nifti_subject(rel)
        subject_id, study = pseudonym(key, "subject", raw), nifti_study(rel, raw)
        row = table.by_subject.get(subject_id) if table else None
    modality = (row.modality if row is not None else "") or bids_modality(rel)
    return UnitPlan(
        pseudonym(key, "image", f"nifti:{rel}"),
        subject_id,
        pseudonym(key, "study", study),
        pseudonym(key, "series", f"nifti:{rel}"),
        modality,
        "",
        "nifti",
        [(rel, -1)],
        None,
        [],
    )


# -------------------------------------------------------------------------------------------- build


def _build_unit(source: str, images: str, plan: UnitPlan) -> dict[str, Any]:
    """Worker: decode one unit, reorient to RAS, write images/<image_id>.nii; errors become a quarantine reason."""
    try:
        if plan.source_format == "nifti":
            array, affine = load_nifti(Path(source) / plan.frames[0][0])
        else:
            array, affine = decode_plan(Path(source), plan), np.asarray(plan.affine)
        array, affine, spacing = finish_volume(array, affine)
    except UnitError as exc:
        return {"error": [exc.reason, _clean(exc.detail, source), exc.relpath or plan.frames[0][0]]}
    except Exception as exc:  # a decoder crash on one unit must not stop the archive
        return {"error": ["decode-error", _clean(f"{type(exc).__name__}: {exc}", source), plan.frames[0][0]]}
    write_bytes(Path(images) / f"{plan.image_id}.nii", nifti_bytes(array, affine))
    return {"shape": list(array.shape), "spacing_mm": spacing, "content_sha256": content_sha256(array, affine)}


def _signature(plan: UnitPlan, files: dict[str, dict[str, Any]]) -> str:
    stats = [[rel, files[rel]["size"], files[rel]["mtime_ns"]] for rel in plan.files]
    blob = json.dumps([CACHE_VERSION, plan.source_format, plan.frames, plan.affine, stats])
    return hashlib.sha256(blob.encode()).hexdigest()


def _build(
    src: Path, out_dir: Path, plans: list[UnitPlan], files: dict, cache: dict, run: _Runner
) -> dict[str, dict[str, Any]]:
    built: dict[str, dict[str, Any]] = {}
    todo = []
    for plan in plans:
        sig = _signature(plan, files)
        old = cache["units"].get(plan.image_id)
        if old and old["sig"] == sig and (out_dir / "images" / f"{plan.image_id}.nii").is_file():
            built[plan.image_id] = {**old, "reused": True}
        else:
            todo.append((plan, sig))
    tasks = [(str(src), str(out_dir / "images"), plan) for plan, _ in todo]
    results = run.map(_build_unit, tasks, "decoding image units", [len(p.frames) for p, _ in todo])
    for (plan, sig), result in zip(todo, results, strict=True):
        built[plan.image_id] = {**result, "sig": sig, "reused": False}
    return built


def _collect(
    plans: list[UnitPlan], built: dict, quarantine: list[QuarantineEntry]
) -> tuple[list[dict], list[QuarantineEntry]]:
    """Manifest rows (without labels) for decoded units; quarantine entries for failed ones."""
    units = []
    for plan in plans:
        result = built[plan.image_id]
        if "error" in result:
            reason, detail, bad = result["error"]
            quarantine.append(QuarantineEntry(bad, reason, detail))
            quarantine += [
                QuarantineEntry(rel, "inconsistent-series", f"another file of this unit failed ({bad}: {reason})")
                for rel in plan.files
                if rel != bad
            ]
            continue
        units.append(
            {
                "image_id": plan.image_id,
                "subject_id": plan.subject_id,
                "study_id": plan.study_id,
                "series_id": plan.series_id,
                "modality": plan.modality,
                "source_format": plan.source_format,
                "image_path": f"images/{plan.image_id}.nii",
                "shape": result["shape"],
                "spacing_mm": result["spacing_mm"],
                "n_files": len(plan.files),
                "content_sha256": result["content_sha256"],
                "manufacturer": plan.manufacturer,
                "warnings": ";".join(plan.warnings),
                "_path": plan.files[0],
                "_reused": result["reused"],
            }
        )
    return units, sorted(set(quarantine), key=lambda q: (q.path, q.reason))


def _frame(units: list[dict], table: LabelTable | None) -> pd.DataFrame:
    columns = [*MANIFEST_COLUMNS, *(table.carried if table else [])]
    frame = pd.DataFrame([{c: u[c] for c in columns} for u in units], columns=columns)
    return frame.sort_values("image_id", kind="stable").reset_index(drop=True)


def _clean(text: str, source: str) -> str:
    """One line of error text with the absolute SOURCE prefix removed (quarantine paths stay relative)."""
    line = str(text).replace(str(source), "SOURCE").strip().splitlines()
    return line[0][:400] if line else ""
