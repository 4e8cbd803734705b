"""The incremental ingest cache (.ingest_cache.json): scan results by hashed path, decoded-unit results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.ingest.pseudonym import digest, key_id
from pipeline.io import write_bytes

CACHE_FILE = ".ingest_cache.json"
CACHE_VERSION = 2  # 2: scan verdicts include too-large, size-mismatch and bounded deflate; rescan older caches


def load_cache(out_dir: Path, key: bytes) -> dict[str, Any]:
    """The incremental cache of a manifest folder; empty when absent, unreadable, older or made with another key."""
    empty: dict[str, Any] = {"files": {}, "units": {}}
    try:
        cache = json.loads((out_dir / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return empty
    if cache.get("version") != CACHE_VERSION or cache.get("key_id") != key_id(key):
        return empty
    return {"files": cache.get("files", {}), "units": cache.get("units", {})}


def path_key(key: bytes, relpath: str) -> str:
    """Cache key of a file: paths can carry identifiers, so the cache stores only their keyed hash."""
    return digest(key, "path", relpath)[:32]


def save_cache(out_dir: Path, key: bytes, files: dict, built: dict) -> None:
    """Scan results keyed by hashed path (headers hold pseudonyms only) and decoded-unit results."""
    units = {
        i: {k: r[k] for k in ("sig", "shape", "spacing_mm", "content_sha256")}
        for i, r in built.items()
        if "error" not in r
    }
    entries = {
        path_key(key, rel): {
            **e,
            "header": {k: v for k, v in e["header"].items() if k != "relpath"} if e["kind"] == "dicom" else e["header"],
        }
        for rel, e in files.items()
    }
    blob = {"version": CACHE_VERSION, "key_id": key_id(key), "files": entries, "units": units}
    write_bytes(out_dir / CACHE_FILE, json.dumps(blob).encode())
