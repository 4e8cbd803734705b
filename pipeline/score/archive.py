"""`score`: one archive end to end (arguments, model, plan, AdaBN, the chosen engine, the final table)."""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from pipeline import tracking
from pipeline.errors import ConfigError, DataError
from pipeline.io import LOCK_NAME, disk_full_message, exclusive, is_disk_full, jsonable, megabytes, write_bytes
from pipeline.records import Packaged
from pipeline.score.adabn import archive_bn_state
from pipeline.score.engines import Engine, EngineOptions, get_engine
from pipeline.score.external import external_metrics
from pipeline.score.packaged import load_packaged, prior_of
from pipeline.score.plan import ChunkWriter, Plan, make_plan
from pipeline.score.table import assemble, summarise, write_table
from pipeline.stats import check_prevalence

log = logging.getLogger("medxfer")


def score(
    model_uri: str,
    source: str | Path,
    out: str | Path,
    *,
    engine: str = "local",
    tracking_uri: str | None = None,
    labels: str | Path | None = None,
    address: str | None = None,
    batch_size: int = 16,
    chunk_size: int = 64,
    workers: int = 0,
    adapt_bn: bool = False,
    key_file: str | Path | None = None,
    progress: bool = True,
    prevalence: float | None = None,
) -> dict[str, Any]:
    """Score every image unit of a DICOM/NIfTI archive with a packaged model; resumable.

    The archive is ingested (non-strict) into ``<out>.work/manifest``; units are scored in chunks
    committed atomically to ``<out>.work/chunks/part-NNNNN.parquet``, so after a crash or
    ``kill -9`` the same call continues where it stopped. The final table (``out``, written
    atomically) has one row per unit and one per quarantined file: ``image_id, subject_id,
    modality, prob`` (binary: P(class 1)) or ``prob_<class>``, ``decision`` (class label at the
    model's operating point), ``status`` (ok|failed), ``reason`` (short code), ``detail``,
    ``source_ref`` (keyed hash of a quarantined file's relative path), ``model_uri``,
    ``model_version``. ``<out>.metrics.json`` records counts, AdaBN, the domain-shift check and,
    with `labels`, external-validation metrics (AUROC with patient-bootstrap CI, ECE, Brier).
    One score at a time per output: ``<out>.work/.medxfer.lock`` (see `pipeline.io.exclusive`)
    refuses a second one at once. On a full disk nothing partial is left: the archive's images
    written by this run are removed, committed chunks are kept for the resume.

    Args:
        model_uri: ``models:/NAME/VERSION|latest``, ``models:/NAME@alias``, ``runs:/ID/model`` or a path.
        source: archive folder. out: the predictions Parquet file.
        engine: a key of `pipeline.score.ENGINES`: ``"local"`` (DataLoader + batched inference) or
            ``"ray"`` (Ray Data actors).
        tracking_uri: MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).
        labels: labels.csv (patient_id,label,...) for external validation.
        address: Ray cluster (``ray://host:10001`` or ``auto``); None starts a local Ray.
        batch_size: units per forward pass. chunk_size: units per committed chunk.
        workers: DataLoader processes (local) or actors (ray; 0 = one per GPU, else per CPU).
        adapt_bn: re-estimate BatchNorm statistics on this archive (AdaBN) before scoring.
        key_file: pseudonym key (as for ingest). progress: show progress bars.
        prevalence: the positive share the site expects (binary models): ``prob`` becomes the
            prior-shifted probability (`pipeline.stats.prior_shift` from the model's training
            prevalence), ``decision`` the frozen threshold applied to it, and ``prob_unadjusted``
            keeps the model's own. Discrimination does not change; calibration-in-the-large does.

    Returns:
        {"n_ok", "n_failed", "out", "metrics_file", "n_chunks", "chunks_reused", "adapt_bn",
        "domain_shift", "model_version", "engine", "seconds"}.

    Raises:
        ConfigError: an unknown engine or a bad number; `prevalence` outside (0, 1) or on a model with
            more than two classes. TrackingError, DataError: see `load_packaged`; a `prevalence` for a
            model packaged without its training prevalence.
        DataError: the disk of `out` is full. BusyError: another process is scoring into `out`.
    """
    t0 = time.perf_counter()
    run_engine = _check_args(engine, batch_size, chunk_size, workers)
    if prevalence is not None:
        prevalence = check_prevalence(prevalence)
    out = Path(out).expanduser().resolve()
    work = Path(f"{out}.work")
    model_uri = _absolute_model_uri(model_uri)
    from_store = model_uri.startswith(("models:/", "runs:/"))
    tracking_uri = _absolute_uri(tracking.connect(tracking_uri, existing=from_store))
    tracking.check_registered(model_uri)
    pkg = load_packaged(model_uri)  # a bad model fails before anything is created beside `out`
    prior = prior_of(pkg, prevalence) if prevalence is not None else None
    with exclusive(work / LOCK_NAME, f"score output {out}"):
        try:
            plan = make_plan(pkg, source, labels, work, key_file, workers, adapt_bn, chunk_size, progress)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            adabn = (
                archive_bn_state(pkg, plan.units, plan.folder, batch_size, workers, device)
                if adapt_bn and plan.units
                else None
            )
            writer = ChunkWriter(plan.units, chunk_size, plan.folder, plan.pending, len(pkg.classes))
            if plan.pending:
                options = EngineOptions(
                    workers=workers,
                    device=device,
                    tracking_uri=tracking_uri,
                    address=address,
                    bn_state=adabn["state"] if adabn else None,
                )
                with _bar(progress) as bar:
                    task = bar.add_task("score", total=sum(writer.sizes.values()))
                    sink = writer.sink(lambda n: bar.advance(task, n))
                    run_engine(pkg, plan.units, writer.batches(batch_size), sink, options)
            result = _finish(pkg, plan, out, engine, adabn, labels is not None, prior)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            raise DataError(disk_full_message("score", out.parent, exc, done=_kept(work, out))) from exc
    return {**result, "seconds": time.perf_counter() - t0}


def _kept(work: Path, out: Path) -> str:
    """What a full disk left behind: the committed chunks (resumable) and the previous output."""
    chunks = sorted((work / "chunks").glob("part-*.parquet")) if (work / "chunks").is_dir() else []
    size = sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) if work.is_dir() else 0
    return (
        f"No partial file is left: {len(chunks)} scored chunk(s) already committed stay in {work} "
        f"({megabytes(size)} with the ingested images), so the same command resumes from them; delete that "
        f"folder to free the space instead. "
        + (f"The previous {out.name} is unchanged." if out.exists() else f"No {out.name} was written.")
    )


def _finish(
    pkg: Packaged, plan: Plan, out: Path, engine: str, adabn: dict | None, labelled: bool, prior: dict | None = None
) -> dict:
    """Assemble the chunks and failure rows into `out` and write `<out>.metrics.json`."""
    table, stats = assemble(plan.folder, plan.n_chunks, plan.failures, pkg, prior)
    reused = plan.n_chunks - len(plan.pending)
    summary = summarise(pkg, table, stats, adabn, engine, plan.n_chunks, reused, prior)
    write_table(table, out, summary)
    if labelled:
        summary["external_validation"] = external_metrics(table, plan.frame, pkg)
    metrics_file = Path(f"{out}.metrics.json")
    write_bytes(metrics_file, (json.dumps(jsonable(summary), indent=2) + "\n").encode())
    failures_file = _write_failures(plan.failures, Path(f"{out}.quarantine.csv"))
    for warning in summary["domain_shift"].get("warnings", []):
        log.warning("score: %s", warning)
    return {
        "n_ok": summary["n_ok"],
        "n_failed": len(table) - summary["n_ok"],
        "out": str(out),
        "metrics_file": str(metrics_file),
        "n_chunks": plan.n_chunks,
        "chunks_reused": reused,
        "adapt_bn": summary["adapt_bn"],
        "domain_shift": summary["domain_shift"],
        "model_version": pkg.version,
        "engine": engine,
        "failed_by_reason": summary["failed_by_reason"],
        "failures_file": failures_file,
        "external_validation": summary.get("external_validation"),
        "prior_shift": prior,
    }


def _write_failures(failures: list[dict], path: Path) -> str | None:
    """`<out>.quarantine.csv`: what each failure row is about, for the people who run the archive.

    One row per failure: ``ref`` (the table's ``source_ref`` for a file that could not be read,
    else the unit's ``image_id``), ``reason``, ``detail`` and ``path``: the file relative to the
    archive, or for a unit the model cannot score, its converted NIfTI image under ``<out>.work/``.
    It stays beside the output and is not part of the predictions table, which carries
    pseudonymised references only. Removed (None) when nothing failed.
    """
    if not failures:
        path.unlink(missing_ok=True)
        return None
    rows = [
        [f["source_ref"] or f["image_id"], f["reason"], f.get("file_detail", f["detail"]), f.get("path", "")]
        for f in failures
    ]
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["ref", "reason", "detail", "path"])
    writer.writerows(rows)
    write_bytes(path, text.getvalue().encode())
    return str(path)


def _check_args(engine: str, batch_size: int, chunk_size: int, workers: int) -> Engine:
    """The engine called `engine`, once the numbers are checked too.

    Raises:
        ConfigError: an unknown engine (first), or a number that is not a whole number in range.
    """
    run_engine = get_engine(engine)
    for name, value, low in (("batch_size", batch_size, 1), ("chunk_size", chunk_size, 1), ("workers", workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"--{name.replace('_', '-')}: must be a whole number >= {low}, got {value!r}")
    return run_engine


def _absolute_uri(uri: str) -> str:
    """sqlite:///relative.db → sqlite:////abs/relative.db, so Ray workers in other folders find it."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def _absolute_model_uri(uri: str) -> str:
    """A model path made absolute (Ray workers run elsewhere); URIs unchanged."""
    if "://" in uri or uri.startswith(("models:/", "runs:/")):
        return uri
    return str(Path(uri).expanduser().resolve())


def _bar(enabled: bool) -> Progress:
    """The scoring progress bar (disabled when `enabled` is false)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


class _RateColumn(ProgressColumn):
    """Scans per second of a rich task."""

    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:.1f} scans/s" if task.speed else "… scans/s")
