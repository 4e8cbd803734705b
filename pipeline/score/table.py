"""The output table: committed chunks and failure rows assembled, decisions, run summary, Parquet metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.evaluate import DomainStats, compare_domain
from pipeline.io import jsonable, write_bytes
from pipeline.records import Packaged
from pipeline.score.plan import part_name, result_row
from pipeline.stats import prior_shift

COLUMNS_HEAD = ("image_id", "subject_id", "modality")
COLUMNS_TAIL = ("decision", "status", "reason", "detail", "source_ref", "model_uri", "model_version")


def stored_threshold(threshold: float) -> float:
    """The operating point at the precision scored probabilities are stored in (float32).

    Comparing float32-stored probabilities with it decides a probability equal to the threshold
    (isotonic maps produce such ties) as evaluation, which compares float64 values, decided it.
    """
    return float(np.float32(threshold))


def decisions(probs: np.ndarray, classes: list[str], threshold: float | None) -> np.ndarray:
    """The class label decided for each row of probabilities (N, C) (NaN rows get the first class).

    Binary with an operating point: class 1 when P(class 1) ≥ `stored_threshold(threshold)`;
    otherwise the arg-max.
    """
    if len(classes) == 2 and threshold is not None:
        pick = (probs[:, 1] >= stored_threshold(threshold)).astype(int)
    else:
        pick = np.argmax(np.nan_to_num(probs, nan=-1.0), axis=1) if len(probs) else np.zeros(0, int)
    return np.asarray(classes, dtype=object)[pick]


def assemble(
    folder: Path, n_chunks: int, failures: list[dict], pkg: Packaged, prior: dict[str, Any] | None = None
) -> tuple[pd.DataFrame, DomainStats]:
    """The final table (chunks in order, then failure rows; output columns) and the merged domain statistics.

    With `prior` (`score.packaged.prior_of`, binary models), ``prob`` is the prior-shifted P(class 1),
    ``decision`` the frozen threshold applied to it, and ``prob_unadjusted`` the model's own probability.
    """
    parts = [pd.read_parquet(folder / part_name(c)) for c in range(n_chunks)]
    stats = DomainStats()
    for c in range(n_chunks):
        stats.merge(DomainStats.load(folder / part_name(c).replace(".parquet", ".stats.npz")))
    frame = pd.concat([*parts, pd.DataFrame(failures, columns=list(result_row(len(pkg.classes))))], ignore_index=True)
    probs = frame[[f"p{i}" for i in range(len(pkg.classes))]].to_numpy(dtype=np.float64)
    extra: list[str] = []
    if prior is not None:
        frame["prob_unadjusted"], extra = probs[:, 1], ["prob_unadjusted"]
        shifted = prior_shift(probs[:, 1], prior["train_prevalence"], prior["prevalence"])
        probs = np.column_stack([1.0 - shifted, shifted])
    ok = (frame["status"] == "ok").to_numpy()
    frame["decision"] = np.where(ok, decisions(probs, pkg.classes, pkg.threshold), "")
    named = (
        {"prob": probs[:, 1]}
        if len(pkg.classes) == 2
        else {f"prob_{c}": probs[:, i] for i, c in enumerate(pkg.classes)}
    )
    for name, values in named.items():
        frame[name] = values
    frame["model_uri"], frame["model_version"] = pkg.uri, pkg.version
    return frame[[*COLUMNS_HEAD, *pkg.prob_columns, *extra, *COLUMNS_TAIL]], stats


def write_table(table: pd.DataFrame, out: Path, summary: dict[str, Any]) -> None:
    """Write `table` to `out` atomically, the summary (without archive_stats) in its ``medxfer`` metadata."""
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    meta = dict(arrow.schema.metadata or {})
    meta[b"medxfer"] = json.dumps(jsonable({k: v for k, v in summary.items() if k != "archive_stats"})).encode()
    sink = pa.BufferOutputStream()
    pq.write_table(arrow.replace_schema_metadata(meta), sink)
    write_bytes(out, sink.getvalue().to_pybytes())


def summarise(
    pkg: Packaged,
    table: pd.DataFrame,
    stats: DomainStats,
    adabn: dict | None,
    engine: str,
    n_chunks: int,
    reused: int,
    prior: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run summary of ``<out>.metrics.json``: model, counts, AdaBN, domain-shift check, archive stats."""
    reasons = table.loc[table["status"] != "ok", "reason"].value_counts().sort_index()
    archive = stats.summary()
    return {
        "model_uri": pkg.uri,
        "model_version": pkg.version,
        "classes": pkg.classes,
        "temperature": float(pkg.meta.get("temperature", 1.0)),
        "calibration": pkg.meta.get("calibration", {"method": "temperature"}).get("method"),
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
        "prior_shift": prior,
        "domain_shift": compare_domain(pkg.reference, archive),
        "archive_stats": archive,
    }
