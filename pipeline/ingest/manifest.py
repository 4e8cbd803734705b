"""ingest(): archive (DICOM + NIfTI) → manifest directory in two passes: scan every header, decode each unit."""

from __future__ import annotations

import filecmp
import hashlib
import json
import logging
import multiprocessing
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError, DataError
from pipeline.ingest.cache import CACHE_VERSION, load_cache, path_key, save_cache
from pipeline.ingest.dicom import DicomHeader, quiet_libraries, read_header
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
from pipeline.ingest.summary import DUPLICATE, summary_lines
from pipeline.io import LOCK_NAME, disk_full_message, exclusive, free_bytes, is_disk_full, megabytes, write_bytes
from pipeline.records import MANIFEST_COLUMNS, MAX_VOXELS, IngestResult, QuarantineEntry

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
    max_voxels: int = MAX_VOXELS,
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
        max_voxels: A file or image unit declaring more voxels (rows × columns × frames × samples)
            is quarantined as too-large before anything is decoded.
        progress: Show progress bars (stderr).
        subgroups: labels.csv columns to carry as subgroups besides sex, age (as age_band) and
            site; every other column is left out (see `read_labels`).

    Returns:
        IngestResult with the manifest directory, counts and the report dict.

    Raises:
        ConfigError: Bad fractions, workers, max_voxels, a key file inside `out`, or an identifying subgroup.
        DataError: Missing source/labels, a malformed labels file, identifier-like subgroup values,
            (strict) quarantined files, or a full disk.
        BusyError: Another process is writing `out`.
    """
    src, out_dir, labels_path = _check_args(source, labels, out, val, test, workers, max_voxels)
    with exclusive(out_dir / LOCK_NAME, f"manifest folder {out_dir}"):
        images = out_dir / "images"
        before = {p.name for p in images.iterdir()} if images.is_dir() else set()
        previous = (out_dir / "manifest.parquet").is_file()
        need: list[str] = []
        try:
            return _ingest(
                src, out_dir, labels_path, key_file, val, test, seed, strict, workers, max_voxels, progress,
                subgroups, need,
            )  # fmt: skip
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
    max_voxels: int,
    progress: bool,
    subgroups: Sequence[str],
    need: list[str],
) -> IngestResult:
    """The body of `ingest`, under the folder's lock; appends to `need` the space the units to decode take."""
    key, key_notes = load_or_create_key(resolve_key_file(key_file, out_dir))
    table = read_labels(labels_path, key, subgroups) if labels_path else None
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    cache = load_cache(out_dir, key)
    walk = _walk(src, {out_dir, *([labels_path] if labels_path else [])})
    relpaths = walk.relpaths
    with _Runner(workers, progress) as run:
        files = _scan(src, relpaths, key, cache, run, max_voxels)
        plans, quarantine = _plan_all(src, files, table, key, max_voxels)
        need.append(_need(plans, files, cache, out_dir))
        built = _build(src, out_dir, plans, files, cache, run)
    units, quarantine = _collect(plans, built, quarantine + walk.outside)
    quarantine = _account(relpaths + [q.path for q in walk.outside], units, quarantine)
    previous, why_not = previous_splits(out_dir, key, val=val, test=test, seed=seed)
    split_notes = join_labels(units, table, key, val=val, test=test, seed=seed, previous=None if why_not else previous)
    source = LABELS_CSV if table is not None and table.split_given else KEYED_HASH
    current = {u["subject_id"]: u["split"] for u in units}
    split_notes = history_warnings(previous, why_not, current, source) + split_notes
    frame = _frame(units, table)
    save_cache(out_dir, key, files, built)
    blocking = [q for q in quarantine if q.reason != DUPLICATE]  # an exact copy loses nothing
    if strict and (blocking or (table is not None and table.n_conflicts)):
        raise DataError(strict_message(out_dir, blocking, table, key, relpaths + [q.path for q in walk.outside]))
    params = {"val": val, "test": test, "seed": seed, "strict": strict, "labels": labels_path is not None}
    seen = relpaths + [q.path for q in walk.outside]
    report = build_report(seen, files, units, quarantine, frame, table, key, params, source)
    report["parameters"]["max_voxels"] = max_voxels
    report["files_in_units"] = int(frame["n_files"].sum())
    report["skipped"] = {"hidden": walk.hidden, "symlinked_folders": walk.symlinked_dirs}
    report["warnings"] = key_notes + split_notes + report["warnings"]
    write_outputs(out_dir, frame, quarantine, report)
    (out_dir / STRICT_QUARANTINE).unlink(missing_ok=True)  # that failure's listing is out of date now
    remove_stale_images(out_dir, {f"{i}.nii" for i in frame["image_id"]})
    for line in summary_lines(report):
        logger.info("ingest: %s", line)
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
    source: str | Path,
    labels: str | Path | None,
    out: str | Path,
    val: float,
    test: float,
    workers: int,
    max_voxels: int,
) -> tuple[Path, Path, Path | None]:
    check_fractions(val, test)
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers={workers!r} must be a whole number >= 1 (1 = no process pool)")
    if not isinstance(max_voxels, int) or isinstance(max_voxels, bool) or max_voxels < 1:
        raise ConfigError(
            f"max_voxels={max_voxels!r} must be a whole number >= 1 (default {MAX_VOXELS:,}); "
            "it bounds the rows × columns × frames of one file or image unit"
        )
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


@dataclass
class _Walk:
    """What `_walk` found under SOURCE."""

    relpaths: list[str]  # files to scan (symlinks to files inside SOURCE included)
    outside: list[QuarantineEntry]  # symlinks to something outside SOURCE: quarantined unread
    symlinked_dirs: int  # symlinked folders: never followed (loops, folders outside SOURCE)
    hidden: int  # hidden files and folders (names starting with "."): skipped


def _walk(source: Path, skip: set[Path]) -> _Walk:
    """Every non-hidden file under `source` (relative posix paths, sorted); `skip` paths left out.

    Symlinked folders are not followed (counted); a symlinked file whose target lies outside
    `source` is quarantined as outside-source, never read.
    """
    found, outside, linked_dirs, hidden = [], [], 0, 0
    for root, dirs, names in os.walk(source):
        base = Path(root)
        real, prefix = base.resolve(), base.relative_to(source).as_posix()

        def resolved(name: str, base: Path = base, real: Path = real) -> Path:  # realpath only for symlinks
            return (base / name).resolve() if (base / name).is_symlink() else real / name

        hidden += sum(n.startswith(".") for n in [*dirs, *names])
        linked_dirs += sum(not d.startswith(".") and (base / d).is_symlink() for d in dirs)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and resolved(d) not in skip)
        for n in names:
            rel = n if prefix == "." else f"{prefix}/{n}"
            if n.startswith(".") or resolved(n) in skip:
                continue
            if (base / n).is_symlink() and not resolved(n).is_relative_to(source):
                outside.append(QuarantineEntry(rel, "outside-source", "a symlink to a file outside SOURCE; not read"))
            else:
                found.append(rel)
    return _Walk(sorted(found), sorted(outside, key=lambda q: q.path), linked_dirs, hidden)


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

    def map(
        self,
        fn: Callable[..., Any],
        tasks: list[tuple],
        description: str,
        sizes: list[int],
        crashed: Callable[..., Any] | None = None,
    ) -> list[Any]:
        """`fn(*task)` for every task, in task order.

        With a pool, a worker that dies (killed for memory, a codec's segfault or abort) breaks it:
        the unfinished tasks then run one at a time in a fresh one-process pool, so the task that
        kills it again is known, and its result is `crashed(*task)` (without `crashed`, it raises).
        """
        task = self.bar.add_task(description, total=sum(sizes))
        results: list[Any] = [None] * len(tasks)
        if self.pool is None and self.workers > 1 and len(tasks) > 1:  # started on first real use
            self.pool = self._new_pool(self.workers)
        if self.pool is None:
            for i, args in enumerate(tasks):
                results[i] = fn(*args)
                self.bar.advance(task, sizes[i])
            return results
        futures = {self.pool.submit(fn, *args): i for i, args in enumerate(tasks)}
        done: set[int] = set()
        try:
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                done.add(futures[fut])
                self.bar.advance(task, sizes[futures[fut]])
        except BrokenProcessPool:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None
            for i in (i for i in range(len(tasks)) if i not in done):
                results[i] = self._isolated(fn, tasks[i], crashed)
                self.bar.advance(task, sizes[i])
        return results

    @staticmethod
    def _new_pool(workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def _isolated(self, fn: Callable[..., Any], args: tuple, crashed: Callable[..., Any] | None) -> Any:
        """Run one task in the one-process recovery pool (started on demand); a crash gives `crashed(*args)`."""
        if self.pool is None:
            self.pool = self._new_pool(1)
        try:
            return self.pool.submit(fn, *args).result()
        except BrokenProcessPool:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None
            if crashed is None:
                raise
            return crashed(*args)


# --------------------------------------------------------------------------------------------- scan


def _scan_batch(source: str, relpaths: list[str], key: bytes, max_voxels: int) -> list[dict[str, Any]]:
    """Worker: classify and read the header of each file (pseudonymised; safe to cache)."""
    with quiet_libraries():
        return [_scan_file(source, rel, key, max_voxels) for rel in relpaths]


def _scan_file(source: str, rel: str, key: bytes, max_voxels: int) -> dict[str, Any]:
    """Classify one file and read its header; a failure becomes the entry's quarantine reason."""
    path = Path(source) / rel
    entry: dict[str, Any] = {"size": -1, "mtime_ns": -1, "kind": "bad", "header": None}
    try:
        st = path.stat()
        entry.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        if is_nifti(rel):
            entry.update(kind="nifti", header={"shape": list(check_nifti_header(path))})
        else:
            entry.update(kind="dicom", header=dict(vars(read_header(path, rel, key, max_voxels))))
    except UnitError as exc:
        entry.update(reason=exc.reason, detail=_clean(exc.detail, source))
    except OSError as exc:
        entry.update(reason="unsupported", detail=f"the file cannot be read ({type(exc).__name__})")
    except Exception as exc:  # an unreadable file must not stop the run
        entry.update(reason="decode-error", detail=_clean(f"{type(exc).__name__}: {exc}", source))
    return entry


_CRASH = "the worker process died reading it (killed for memory, or a library crashed)"


def _scan_crashed(source: str, relpaths: list[str], key: bytes, max_voxels: int) -> list[dict[str, Any]] | None:
    """A scan batch whose worker died: None for a batch (read again file by file), else the file's entry."""
    if len(relpaths) > 1:
        return None
    return [{"size": -1, "mtime_ns": -1, "kind": "bad", "header": None, "reason": "decode-error", "detail": _CRASH}]


def _scan(
    src: Path, relpaths: list[str], key: bytes, cache: dict, run: _Runner, max_voxels: int
) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    todo = []
    for rel in relpaths:
        try:
            st = (src / rel).stat()
        except OSError:  # a broken link: the worker records why
            todo.append(rel)
            continue
        old = cache["files"].get(path_key(key, rel))
        fresh = old and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns
        if fresh and old.get("reason") != "too-large":  # too-large depends on max_voxels: read again
            files[rel] = {
                **old,
                "header": {**old["header"], "relpath": rel} if old["kind"] == "dicom" else old["header"],
            }
        else:
            todo.append(rel)
    batches = [todo[i : i + _SCAN_BATCH] for i in range(0, len(todo), _SCAN_BATCH)]
    tasks = [(str(src), b, key, max_voxels) for b in batches]
    results = run.map(_scan_batch, tasks, "scanning files", [len(b) for b in batches], _scan_crashed)
    lost = [rel for b, r in zip(batches, results, strict=True) if r is None for rel in b]  # a worker died
    if lost:
        again = run.map(
            _scan_batch, [(str(src), [r], key, max_voxels) for r in lost], "re-reading", [1] * len(lost), _scan_crashed
        )
        batches, results = [*batches, *([r] for r in lost)], [*results, *again]
    for batch, entries in zip(batches, results, strict=True):
        if entries is not None:
            files.update(zip(batch, entries, strict=True))
    return dict(sorted(files.items()))


def _plan_all(
    src: Path, files: dict[str, dict[str, Any]], table: LabelTable | None, key: bytes, max_voxels: int
) -> tuple[list[UnitPlan], list[QuarantineEntry]]:
    quarantine = [QuarantineEntry(rel, e["reason"], e["detail"]) for rel, e in files.items() if e["kind"] == "bad"]
    headers = _drop_duplicates(src, [DicomHeader(**e["header"]) for e in files.values() if e["kind"] == "dicom"])
    quarantine += headers.dropped
    plans, dropped = plan_units(headers.kept, key)
    plans += [_nifti_plan(rel, table, key) for rel, e in files.items() if e["kind"] == "nifti"]
    plans, too_large = _within_limit(plans, files, max_voxels)
    return plans, quarantine + dropped + too_large


@dataclass
class _Deduplicated:
    kept: list[DicomHeader]
    dropped: list[QuarantineEntry]


def _drop_duplicates(src: Path, headers: list[DicomHeader]) -> _Deduplicated:
    """One file per SOPInstanceUID: the first by path is kept, the others are quarantined.

    A byte-identical copy is `duplicate-of` (detail: the kept file's path relative to SOURCE); a
    different file with the same UID is `uid-collision` (which of the two is right cannot be told).
    """
    by_sop: dict[str, list[DicomHeader]] = defaultdict(list)
    for h in sorted(headers, key=lambda h: h.relpath):
        by_sop[h.sop_key].append(h)
    kept, dropped = [], []
    for first, *copies in by_sop.values():
        kept.append(first)
        for h in copies:
            if _same_bytes(src / h.relpath, src / first.relpath):
                dropped.append(QuarantineEntry(h.relpath, DUPLICATE, first.relpath))
            else:
                detail = f"same SOPInstanceUID as {first.relpath} (kept), different content"
                dropped.append(QuarantineEntry(h.relpath, "uid-collision", detail))
    return _Deduplicated(kept, dropped)


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _within_limit(
    plans: list[UnitPlan], files: dict[str, dict[str, Any]], max_voxels: int
) -> tuple[list[UnitPlan], list[QuarantineEntry]]:
    """Plans whose unit holds at most `max_voxels`; every file of a larger unit is quarantined as too-large.

    Files over the limit were stopped at scan; this catches units whose files are each small
    (a series of very many slices) and headers cached by a run with a higher limit.
    """
    ok, too_large = [], []
    for plan in plans:
        if plan.source_format == "nifti":
            voxels = int(np.prod(files[plan.frames[0][0]]["header"]["shape"], dtype=np.int64))
        else:
            size = {rel: files[rel]["header"]["rows"] * files[rel]["header"]["cols"] for rel in plan.files}
            voxels = sum(size[rel] for rel, _ in plan.frames)
        if voxels <= max_voxels:
            ok.append(plan)
            continue
        detail = (
            f"the image unit ({len(plan.files)} file(s), {len(plan.frames)} frame(s)) holds {voxels:,} voxels, "
            f"over the limit of {max_voxels:,}. Fix: if the image is real, raise --max-voxels (data.max_voxels)"
        )
        too_large += [QuarantineEntry(rel, "too-large", detail) for rel in plan.files]
    return ok, too_large


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
        with quiet_libraries():
            if plan.source_format == "nifti":
                array, affine = load_nifti(Path(source) / plan.frames[0][0])
            else:
                array, affine = decode_plan(Path(source), plan), np.asarray(plan.affine)
            array, affine, spacing = finish_volume(array, affine)
    except UnitError as exc:
        return {"error": [exc.reason, _clean(exc.detail, source), exc.relpath or plan.frames[0][0]]}
    except MemoryError:
        return {"error": ["too-large", "out of memory while decoding this unit", plan.frames[0][0]]}
    except Exception as exc:  # a decoder crash on one unit must not stop the archive
        return {"error": ["decode-error", _clean(f"{type(exc).__name__}: {exc}", source), plan.frames[0][0]]}
    write_bytes(Path(images) / f"{plan.image_id}.nii", nifti_bytes(array, affine))
    return {"shape": list(array.shape), "spacing_mm": spacing, "content_sha256": content_sha256(array, affine)}


def _build_crashed(source: str, images: str, plan: UnitPlan) -> dict[str, Any]:
    """The result of a unit whose decoding worker died."""
    return {"error": ["decode-error", _CRASH.replace("reading", "decoding"), plan.frames[0][0]]}


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
    results = run.map(_build_unit, tasks, "decoding image units", [len(p.frames) for p, _ in todo], _build_crashed)
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
                "_files": plan.files,
                "_reused": result["reused"],
            }
        )
    return units, sorted(set(quarantine), key=lambda q: (q.path, q.reason))


def _account(seen: list[str], units: list[dict], quarantine: list[QuarantineEntry]) -> list[QuarantineEntry]:
    """Every file seen is in a unit or in quarantine: any other is quarantined as not-ingested (an ingest bug)."""
    placed = {q.path for q in quarantine} | {rel for u in units for rel in u["_files"]}
    lost = [QuarantineEntry(rel, "not-ingested", "in no image unit and given no reason") for rel in seen]
    lost = [q for q in lost if q.path not in placed]
    if lost:
        logger.warning(
            "ingest: %d file(s) ended in no unit and were given no reason; quarantined as not-ingested", len(lost)
        )
    return sorted([*quarantine, *lost], key=lambda q: (q.path, q.reason))


def _frame(units: list[dict], table: LabelTable | None) -> pd.DataFrame:
    columns = [*MANIFEST_COLUMNS, *(table.carried if table else [])]
    frame = pd.DataFrame([{c: u[c] for c in columns} for u in units], columns=columns)
    return frame.sort_values("image_id", kind="stable").reset_index(drop=True)


def _clean(text: str, source: str) -> str:
    """One line of error text with the absolute SOURCE prefix removed (quarantine paths stay relative)."""
    line = str(text).replace(str(source), "SOURCE").strip().splitlines()
    return line[0][:400] if line else ""
