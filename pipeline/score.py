"""Batch scoring of scan archives with a packaged model: resumable chunks, failure rows, local or Ray engine."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
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
from torch import nn
from torch.utils.data import DataLoader

from pipeline import tracking
from pipeline.errors import ConfigError, DataError, did_you_mean
from pipeline.ingest import ingest, load_manifest
from pipeline.ingest.pseudonym import digest, load_or_create_key, resolve_key_file
from pipeline.io import jsonable, write_bytes
from pipeline.score_ray import (
    DomainStats,
    Packaged,
    Scorer,
    UnitDataset,
    adapt_batchnorm,
    collate_units,
    compare_domain,
    load_packaged,
    reference_stats,
    run_local,
)

log = logging.getLogger("medxfer")

ENGINES = ("local", "ray")
COLUMNS_HEAD = ("image_id", "subject_id", "modality")
COLUMNS_TAIL = ("decision", "status", "reason", "detail", "source_ref", "model_uri", "model_version")
_CHUNK_VERSION = 1

__all__ = ["ENGINES", "Packaged", "external_metrics", "load_packaged", "reference_stats", "score"]


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

    Args:
        model_uri: ``models:/NAME/VERSION|latest``, ``models:/NAME@alias``, ``runs:/ID/model`` or a path.
        source: archive folder. out: the predictions Parquet file.
        engine: ``"local"`` (DataLoader + batched inference) or ``"ray"`` (Ray Data actors).
        tracking_uri: MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).
        labels: labels.csv (patient_id,label,...) for external validation.
        address: Ray cluster (``ray://host:10001`` or ``auto``); None starts a local Ray.
        batch_size: units per forward pass. chunk_size: units per committed chunk.
        workers: DataLoader processes (local) or actors (ray; 0 = one per GPU, else per CPU).
        adapt_bn: re-estimate BatchNorm statistics on this archive (AdaBN) before scoring.
        key_file: pseudonym key (as for ingest). progress: show progress bars.

    Returns:
        {"n_ok", "n_failed", "out", "metrics_file", "n_chunks", "chunks_reused", "adapt_bn",
        "domain_shift", "model_version", "engine", "seconds"}.
    """
    t0 = time.perf_counter()
    _check_args(engine, batch_size, chunk_size, workers)
    out = Path(out).expanduser().resolve()
    tracking_uri = _absolute_uri(tracking.connect(tracking_uri))
    pkg = load_packaged(_absolute_model_uri(model_uri))
    plan = _plan(pkg, source, labels, Path(f"{out}.work"), key_file, workers, adapt_bn, chunk_size, progress)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    adabn = _adabn(pkg, plan.units, plan.folder, batch_size, workers, device) if adapt_bn and plan.units else None
    writer = _ChunkWriter(plan.units, chunk_size, plan.folder, plan.pending, len(pkg.classes))
    if plan.pending:
        with _bar(progress) as bar:
            task = bar.add_task("score", total=sum(writer.sizes.values()))
            sink = writer.sink(lambda n: bar.advance(task, n))
            if engine == "ray":
                from pipeline.score_ray import run_ray

                run_ray(
                    pkg,
                    plan.units,
                    writer.batches(batch_size),
                    sink,
                    address=address,
                    workers=workers,
                    tracking_uri=tracking_uri,
                    bn_state=adabn and adabn["state"],
                )
            else:
                run_local(
                    Scorer(pkg.model, pkg.spec, device, len(pkg.classes)),
                    [u["path"] for u in plan.units],
                    writer.batches(batch_size),
                    sink,
                    workers,
                )
    result = _finish(pkg, plan, out, engine, adabn, labels is not None)
    return {**result, "seconds": time.perf_counter() - t0}


@dataclass
class _Plan:
    frame: pd.DataFrame  # the manifest, sorted by image_id
    units: list[dict]  # the units this model can score, in chunk order
    failures: list[dict]  # rows for units it cannot score and for quarantined files
    folder: Path  # <out>.work/chunks
    n_chunks: int
    pending: list[int]  # chunks not committed yet


def _plan(
    pkg: Packaged,
    source: str | Path,
    labels: str | Path | None,
    work: Path,
    key_file: str | Path | None,
    workers: int,
    adapt_bn: bool,
    chunk_size: int,
    progress: bool,
) -> _Plan:
    """Ingest the archive (incremental, non-strict), sort out what can be scored, find committed chunks."""
    manifest_dir = work / "manifest"
    ingest(source, labels, manifest_dir, key_file=key_file, strict=False, workers=max(1, workers), progress=progress)
    frame = load_manifest(manifest_dir).sort_values("image_id", kind="stable").reset_index(drop=True)
    units, failures = _split_fit(frame, pkg, manifest_dir)
    key, _ = load_or_create_key(resolve_key_file(key_file, manifest_dir))
    failures += _quarantine_rows(manifest_dir, key, len(pkg.classes))
    folder = _open_chunks(work, _plan_key(pkg, units, adapt_bn, chunk_size))
    n_chunks = -(-len(units) // chunk_size)
    pending = [c for c in range(n_chunks) if not (folder / _part(c)).exists()]
    return _Plan(frame, units, failures, folder, n_chunks, pending)


def _finish(pkg: Packaged, plan: _Plan, out: Path, engine: str, adabn: dict | None, labelled: bool) -> dict:
    """Assemble the chunks and failure rows into `out` and write `<out>.metrics.json`."""
    table, stats = _assemble(plan.folder, plan.n_chunks, plan.failures, pkg)
    reused = plan.n_chunks - len(plan.pending)
    summary = _summary(pkg, table, stats, adabn, engine, plan.n_chunks, reused)
    _write_table(table, out, summary)
    if labelled:
        summary["external_validation"] = external_metrics(table, plan.frame, pkg)
    metrics_file = Path(f"{out}.metrics.json")
    write_bytes(metrics_file, (json.dumps(jsonable(summary), indent=2) + "\n").encode())
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
    }


def _check_args(engine: str, batch_size: int, chunk_size: int, workers: int) -> None:
    if engine not in ENGINES:
        raise ConfigError(
            f"--engine: unknown engine '{engine}'{did_you_mean(engine, ENGINES)}; choose one of {', '.join(ENGINES)}"
        )
    for name, value, low in (("batch_size", batch_size, 1), ("chunk_size", chunk_size, 1), ("workers", workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"--{name.replace('_', '-')}: must be a whole number >= {low}, got {value!r}")


def _absolute_uri(uri: str) -> str:
    """sqlite:///relative.db → sqlite:////abs/relative.db, so Ray workers in other folders find it."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def _absolute_model_uri(uri: str) -> str:
    if "://" in uri or uri.startswith(("models:/", "runs:/")):
        return uri
    return str(Path(uri).expanduser().resolve())


def _misfit(shape: list[int], modality: str, pkg: Packaged) -> tuple[str, str] | None:
    """(reason, detail) when a unit cannot be scored by this model, else None."""
    depth = int(shape[2]) if len(shape) > 2 else 1
    if pkg.spec.dims == "2d" and depth > 1 and getattr(pkg.spec, "reduce", "none") == "none":
        return "dims-mismatch", (
            f"a 2D model cannot score a volume of {depth} slices; score volumes with a "
            "model trained with prepare.dims 2.5d or 3d, or 2d with prepare.reduce"
        )
    if pkg.spec.dims == "3d" and depth == 1:
        return "dims-mismatch", "a 3D model cannot score a single 2D image; score it with a 2D model"
    if modality and pkg.modalities and modality not in pkg.modalities:
        return "modality-mismatch", (
            f"the model was trained on {'/'.join(sorted(pkg.modalities))} images "
            f"(preset {pkg.spec.preset}); this unit is {modality}"
        )
    return None


def _row(
    n_classes: int,
    image_id: str = "",
    subject_id: str = "",
    modality: str = "",
    status: str = "failed",
    reason: str = "",
    detail: str = "",
    source_ref: str = "",
    probs: Any = None,
) -> dict[str, Any]:
    p = np.full(n_classes, np.nan) if probs is None else np.asarray(probs, dtype=np.float64)
    return {
        "image_id": image_id,
        "subject_id": subject_id,
        "modality": modality,
        **{f"p{i}": float(p[i]) for i in range(n_classes)},
        "status": status,
        "reason": reason,
        "detail": detail,
        "source_ref": source_ref,
    }


def _split_fit(frame: pd.DataFrame, pkg: Packaged, manifest_dir: Path) -> tuple[list[dict], list[dict]]:
    """Units the model can score (plan order) and failure rows for the ones it cannot."""
    units, failures = [], []
    for r in frame.itertuples(index=False):
        bad = _misfit(list(r.shape), str(r.modality), pkg)
        if bad:
            failures.append(_row(len(pkg.classes), r.image_id, r.subject_id, str(r.modality), "failed", *bad))
        else:
            units.append(
                {
                    "image_id": r.image_id,
                    "subject_id": r.subject_id,
                    "modality": str(r.modality),
                    "path": str(manifest_dir / r.image_path),
                    "sha": r.content_sha256,
                }
            )
    return units, failures


def _quarantine_rows(manifest_dir: Path, key: bytes, n_classes: int) -> list[dict]:
    """One failure row per quarantined file: reason code, no path in clear (source_ref = keyed hash)."""
    path = manifest_dir / "quarantine.csv"
    if not path.exists():
        return []
    q = pd.read_csv(path, dtype=str, keep_default_na=False)
    return [
        _row(n_classes, reason=r.reason, source_ref="src-" + digest(key, "source-ref", r.path)[:16])
        for r in q.itertuples(index=False)
    ]


def _plan_key(pkg: Packaged, units: list[dict], adapt_bn: bool, chunk_size: int) -> str:
    blob = json.dumps(
        {
            "v": _CHUNK_VERSION,
            "model": pkg.fingerprint,
            "spec": pkg.spec.hash(),
            "classes": pkg.classes,
            "adapt_bn": adapt_bn,
            "chunk_size": chunk_size,
            "units": [[u["image_id"], u["sha"]] for u in units],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _open_chunks(work: Path, key: str) -> Path:
    """The chunk folder for this plan; chunks of another model, setting or archive state are discarded."""
    folder, plan = work / "chunks", work / "chunks" / "plan.json"
    if folder.exists() and (not plan.exists() or json.loads(plan.read_text()).get("key") != key):
        log.info("score: the model, settings or archive changed since the last run; previous chunks discarded")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not plan.exists():
        write_bytes(plan, json.dumps({"key": key}).encode())
    return folder


def _part(c: int) -> str:
    return f"part-{c + 1:05d}.parquet"


class _ChunkWriter:
    """Collects per-unit results from an engine and commits each chunk once all its units are in."""

    def __init__(self, units: list[dict], chunk_size: int, folder: Path, pending: list[int], n_classes: int):
        self.units, self.size, self.folder, self.n_classes = units, chunk_size, folder, n_classes
        self.sizes = {c: min(chunk_size, len(units) - c * chunk_size) for c in pending}
        self.open: dict[int, dict[int, dict[str, Any]]] = {c: {} for c in pending}

    def batches(self, batch_size: int) -> list[list[int]]:
        """Batches of unit indices that never straddle two chunks."""
        out = []
        for c, n in self.sizes.items():
            idx = list(range(c * self.size, c * self.size + n))
            out += [idx[i : i + batch_size] for i in range(0, n, batch_size)]
        return out

    def sink(self, advance: Callable[[int], None]) -> Callable[[dict[str, np.ndarray]], None]:
        def take(result: dict[str, np.ndarray]) -> None:
            for j, idx in enumerate(result["idx"]):
                c = int(idx) // self.size
                self.open[c][int(idx)] = {k: v[j] for k, v in result.items()}
                if len(self.open[c]) == self.sizes[c]:
                    self._commit(c, self.open.pop(c))
            advance(len(result["idx"]))

        return take

    def _commit(self, c: int, got: dict[int, dict[str, Any]]) -> None:
        rows, stats = [], DomainStats()
        for idx in sorted(got):
            r, u = got[idx], self.units[idx]
            ok = not str(r["reason"])
            rows.append(
                _row(
                    self.n_classes,
                    u["image_id"],
                    u["subject_id"],
                    u["modality"],
                    "ok" if ok else "failed",
                    str(r["reason"]),
                    str(r["detail"]),
                    probs=r["probs"] if ok else None,
                )
            )
            if ok:
                stats.add(np.array([r["mean"]]), np.array([r["std"]]), np.asarray(r["emb"])[None])
        buf = io.BytesIO()
        np.savez(buf, **stats.arrays())  # type: ignore[arg-type]
        write_bytes(self.folder / _part(c).replace(".parquet", ".stats.npz"), buf.getvalue())
        frame = pd.DataFrame(rows)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
        write_bytes(self.folder / _part(c), sink.getvalue().to_pybytes())


def _bar(enabled: bool) -> Progress:
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


def _adabn(
    pkg: Packaged, units: list[dict], folder: Path, batch_size: int, workers: int, device: torch.device
) -> dict[str, Any]:
    """AdaBN on this archive's units (cached in the chunk folder so a resumed run reuses it)."""
    path = folder / "adabn.pt"
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
    else:
        loader = DataLoader(
            UnitDataset([u["path"] for u in units], pkg.spec),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate_units,
        )
        batches = (
            torch.stack([x for _, x, _, _ in items if x is not None])
            for items in loader
            if any(x is not None for _, x, _, _ in items)
        )
        n_images, n_layers = adapt_batchnorm(pkg.model, batches, device)
        names = {n for n, m in pkg.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        state = {k: v.cpu() for k, v in pkg.model.state_dict().items() if k.rsplit(".", 1)[0] in names}
        saved = {"state": state, "n_images": n_images, "n_layers": n_layers}
        buf = io.BytesIO()
        torch.save(saved, buf)
        write_bytes(path, buf.getvalue())
    pkg.model.load_state_dict(saved["state"], strict=False)
    return {"state": saved["state"], "n_images": int(saved["n_images"]), "n_layers": int(saved["n_layers"])}


def _assemble(folder: Path, n_chunks: int, failures: list[dict], pkg: Packaged) -> tuple[pd.DataFrame, DomainStats]:
    parts = [pd.read_parquet(folder / _part(c)) for c in range(n_chunks)]
    stats = DomainStats()
    for c in range(n_chunks):
        stats.merge(DomainStats.load(folder / _part(c).replace(".parquet", ".stats.npz")))
    frame = pd.concat([*parts, pd.DataFrame(failures, columns=list(_row(len(pkg.classes))))], ignore_index=True)
    probs = frame[[f"p{i}" for i in range(len(pkg.classes))]].to_numpy(dtype=np.float64)
    ok = (frame["status"] == "ok").to_numpy()
    if len(pkg.classes) == 2 and pkg.threshold is not None:
        pick = (probs[:, 1] >= pkg.threshold).astype(int)
    else:
        pick = np.argmax(np.nan_to_num(probs, nan=-1.0), axis=1) if len(frame) else np.zeros(0, int)
    frame["decision"] = np.where(ok, np.asarray(pkg.classes, dtype=object)[pick], "")
    named = (
        {"prob": probs[:, 1]}
        if len(pkg.classes) == 2
        else {f"prob_{c}": probs[:, i] for i, c in enumerate(pkg.classes)}
    )
    for name, values in named.items():
        frame[name] = values
    frame["model_uri"], frame["model_version"] = pkg.uri, pkg.version
    return frame[[*COLUMNS_HEAD, *pkg.prob_columns, *COLUMNS_TAIL]], stats


def _write_table(table: pd.DataFrame, out: Path, summary: dict[str, Any]) -> None:
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    meta = dict(arrow.schema.metadata or {})
    meta[b"medxfer"] = json.dumps(jsonable({k: v for k, v in summary.items() if k != "archive_stats"})).encode()
    sink = pa.BufferOutputStream()
    pq.write_table(arrow.replace_schema_metadata(meta), sink)
    write_bytes(out, sink.getvalue().to_pybytes())


def _summary(
    pkg: Packaged, table: pd.DataFrame, stats: DomainStats, adabn: dict | None, engine: str, n_chunks: int, reused: int
) -> dict[str, Any]:
    reasons = table.loc[table["status"] != "ok", "reason"].value_counts().sort_index()
    archive = stats.summary()
    return {
        "model_uri": pkg.uri,
        "model_version": pkg.version,
        "classes": pkg.classes,
        "temperature": float(pkg.meta.get("temperature", 1.0)),
        "threshold": pkg.threshold,
        "operating_point": pkg.meta.get("operating_point"),
        "engine": engine,
        "n_ok": int((table["status"] == "ok").sum()),
        "failed_by_reason": {str(k): int(v) for k, v in reasons.items()},
        "n_chunks": n_chunks,
        "chunks_reused": reused,
        "adapt_bn": None
        if adabn is None
        else {"applied": True, "n_images": adabn["n_images"], "n_layers": adabn["n_layers"]},
        "domain_shift": compare_domain(pkg.reference, archive),
        "archive_stats": archive,
    }


def external_metrics(
    table: pd.DataFrame, frame: pd.DataFrame, pkg: Packaged, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """AUROC (patient-bootstrap 95% CI), ECE, Brier of the scored units whose label is a model class.

    Probabilities are the model's calibrated ones (its temperature); `frame` is the manifest.
    """
    from pipeline.evaluate import N_BINS, at_threshold, bootstrap_ci, brier, ece

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
        out["at_operating_point"] = at_threshold(y, probs[:, 1], pkg.threshold)
    return out
