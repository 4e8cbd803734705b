"""The scoring plan (work folder, what can be scored, plan key) and the chunk writer that commits parts."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.evaluate import DomainStats
from pipeline.ingest import ingest, load_manifest
from pipeline.ingest.pseudonym import load_or_create_key, resolve_key_file, source_ref
from pipeline.io import write_bytes
from pipeline.records import Packaged
from pipeline.score.scorer import Sink

log = logging.getLogger("medxfer")

_CHUNK_VERSION = 1


@dataclass
class Plan:
    """What one `score` call does: the units to score in chunks, the failure rows, and which chunks are left."""

    frame: pd.DataFrame  # the manifest, sorted by image_id
    units: list[dict]  # the units this model can score, in chunk order
    failures: list[dict]  # rows for units it cannot score and for quarantined files
    folder: Path  # <out>.work/chunks
    n_chunks: int
    pending: list[int]  # chunks not committed yet


def make_plan(
    pkg: Packaged,
    source: str | Path,
    labels: str | Path | None,
    work: Path,
    key_file: str | Path | None,
    workers: int,
    adapt_bn: bool,
    chunk_size: int,
    progress: bool,
) -> Plan:
    """Ingest the archive (incremental, non-strict), sort out what can be scored, find committed chunks."""
    manifest_dir = work / "manifest"
    ingest(source, labels, manifest_dir, key_file=key_file, strict=False, workers=max(1, workers), progress=progress)
    frame = load_manifest(manifest_dir).sort_values("image_id", kind="stable").reset_index(drop=True)
    units, failures = _split_fit(frame, pkg, manifest_dir)
    key, _ = load_or_create_key(resolve_key_file(key_file, manifest_dir))
    failures += _quarantine_rows(manifest_dir, key, len(pkg.classes))
    folder = _open_chunks(work, _plan_key(pkg, units, adapt_bn, chunk_size))
    n_chunks = -(-len(units) // chunk_size)
    pending = [c for c in range(n_chunks) if not (folder / part_name(c)).exists()]
    return Plan(frame, units, failures, folder, n_chunks, pending)


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


def result_row(
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
    """One row of a chunk / the failure rows: ids, ``p0..p<n-1>`` (NaN when failed), status, reason."""
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
        if bad:  # `path`: the unit's converted image, for <out>.quarantine.csv only
            row = result_row(len(pkg.classes), r.image_id, r.subject_id, str(r.modality), "failed", *bad)
            failures.append({**row, "path": str(manifest_dir / r.image_path)})
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
        {
            **result_row(n_classes, reason=r.reason, source_ref=source_ref(key, r.path)),
            "path": r.path,  # relative to the archive: <out>.quarantine.csv only, never the table
            "file_detail": r.detail,
        }
        for r in q.itertuples(index=False)
    ]


def _plan_key(pkg: Packaged, units: list[dict], adapt_bn: bool, chunk_size: int) -> str:
    """Hash of everything the chunks depend on: model, spec, classes, AdaBN, chunk size, units and contents."""
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


def part_name(c: int) -> str:
    """File name of chunk `c` (0-based): ``part-NNNNN.parquet``, numbered from 1."""
    return f"part-{c + 1:05d}.parquet"


class ChunkWriter:
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

    def sink(self, advance: Callable[[int], None]) -> Sink:
        """The engines' sink: files results per chunk, commits full chunks, calls `advance(n units)`."""

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
                result_row(
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
        write_bytes(self.folder / part_name(c).replace(".parquet", ".stats.npz"), buf.getvalue())
        frame = pd.DataFrame(rows)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
        write_bytes(self.folder / part_name(c), sink.getvalue().to_pybytes())
