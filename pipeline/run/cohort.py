"""The experiment's data and model from its config: ingest when needed, the labelled cohort, datasets, the network."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pipeline.adapt import MedNet, build_model
from pipeline.config import Config
from pipeline.errors import ConfigError, DataError
from pipeline.ingest import ingest, load_manifest
from pipeline.ingest.splits import nested_subset
from pipeline.io import write_text
from pipeline.prepare import PreparedDataset, build_augment
from pipeline.records import AdaptationSummary, Cohort, PrepareSpec

if TYPE_CHECKING:
    pass

log = logging.getLogger("medxfer")


def _sorted_classes(labels: pd.Series) -> list[str]:
    values = sorted(set(labels))
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def load_cohort(manifest_dir: str | Path, train_fraction: float = 1.0, seed: int = 0) -> Cohort:
    """Labelled rows of a manifest; every split must hold both classes.

    With `train_fraction` < 1 only that share of the train split's patients is kept, a nested
    subset stratified by label (`ingest.splits.nested_subset` of the pseudonymised subject ids and
    `seed`); val and test are whole, so every fraction is tested on the same units.
    """
    frame = load_manifest(manifest_dir)
    frame = frame[frame["label"].astype(str) != ""].reset_index(drop=True)
    if frame.empty:
        raise DataError(f"{manifest_dir}/manifest.parquet has no labelled images; check labels.csv patient_id values")
    if train_fraction < 1:
        train = frame[frame["split"] == "train"]
        labels = train.groupby("subject_id")["label"].agg(lambda s: list(s.astype(str))).to_dict()
        kept = nested_subset(labels, train_fraction, seed)
        frame = frame[(frame["split"] != "train") | frame["subject_id"].isin(kept)].reset_index(drop=True)
    classes = _sorted_classes(frame["label"].astype(str))
    frame["label"] = frame["label"].astype(str)
    for split in ("train", "val"):
        present = set(frame.loc[frame["split"] == split, "label"])
        if len(present) < 2:
            raise DataError(
                f"split '{split}' of {manifest_dir} holds classes {sorted(present)}; training needs at "
                "least two classes there: add patients or change data.split"
            )
    return Cohort(Path(manifest_dir), frame, classes)


def manifest_hash(manifest_dir: str | Path) -> str:
    """First 16 hex of the manifest's sha256: which data a run saw."""
    return hashlib.sha256((Path(manifest_dir) / "manifest.parquet").read_bytes()).hexdigest()[:16]


def ensure_manifest(cfg: Config, progress: bool = True) -> Path:
    """Ingest `data.source` into `data.manifest` (incremental; unchanged files are reused).

    Strict unless ``data.strict: false``: a quarantined file or a conflicting labels row stops
    here, before any training, with every problem listed and the previous manifest kept.
    """
    out = Path(cfg.data.manifest)
    if cfg.data.source:
        split = cfg.data.split
        ingest(
            cfg.data.source,
            cfg.data.labels or None,
            out,
            key_file=cfg.data.key_file,
            val=split.val,
            test=split.test,
            seed=split.seed,
            workers=cfg.data.workers,
            max_voxels=cfg.data.max_voxels,
            strict=cfg.data.strict,
            progress=progress,
            subgroups=cfg.evaluate.subgroups,
        )
    elif not (out / "manifest.parquet").exists():
        raise ConfigError(
            f"data.manifest {out} holds no manifest.parquet and data.source is empty; "
            "set data.source to the archive or run `medxfer ingest` first"
        )
    return out


def make_datasets(cfg: Config, cohort: Cohort, spec: PrepareSpec, augment: bool) -> dict[str, PreparedDataset]:
    """Prepared train/val/test datasets of the cohort (augmentation on train when `augment` and enabled)."""
    cache = cfg.prepare.cache_dir or str(cohort.manifest_dir / "cache")
    out = {}
    for name in ("train", "val", "test"):
        rows = cohort.split(name)
        aug = None
        if augment and name == "train" and cfg.prepare.augment.enabled:
            a = cfg.prepare.augment
            aug = build_augment(
                cfg.prepare.dims,
                flip=a.flip,
                rotate_deg=a.rotate_deg,
                scale=a.scale,
                intensity=a.intensity,
                seed=cfg.finetune.seed,
            )
        paths = [str(cohort.manifest_dir / p) for p in rows["image_path"]]
        out[name] = PreparedDataset(paths, rows["content_sha256"].tolist(), cohort.y(rows).tolist(), spec, cache, aug)
    return out


def build_network(cfg: Config, n_classes: int, weights: str | None = None) -> tuple[MedNet, AdaptationSummary]:
    """The adapted network of `cfg.model` and `cfg.prepare` (`weights` overrides model.weights)."""
    m = cfg.model
    in_channels = cfg.prepare.slices if cfg.prepare.dims == "2.5d" and not m.slicewise else m.in_channels
    return build_model(
        m.backbone,
        weights or m.weights,
        num_classes=n_classes,
        in_channels=in_channels,
        dims="2d" if cfg.prepare.dims == "2.5d" and not m.slicewise else cfg.prepare.dims,
        inflation=m.inflation,
        depth_padding=m.depth_padding,
        weights_dir=m.weights_dir,
        slicewise=m.slicewise,
        pool=m.pool,
        keep_depth=m.keep_depth,
    )


TEST_LOG = "test_evaluations.json"  # kept with the manifest: how often each test split was evaluated


def count_test_evaluation(manifest_dir: str | Path, test_image_ids: list[str], run_id: str) -> tuple[str, int]:
    """Record that `run_id` opened this test split; return (the split's id, its evaluations so far).

    The split's id is the first 16 hex of the sha256 of its sorted image pseudonyms, so a test split
    that changes (patients added or moved) starts a new count. The log lives beside the manifest
    (``test_evaluations.json``: split id → count and run ids), written atomically.
    """
    split_id = hashlib.sha256("\n".join(sorted(test_image_ids)).encode()).hexdigest()[:16]
    path = Path(manifest_dir) / TEST_LOG
    try:
        log = json.loads(path.read_text())
    except (OSError, ValueError):
        log = {}
    entry = log.setdefault(split_id, {"count": 0, "runs": []})
    entry["count"] += 1
    entry["runs"].append(run_id)
    write_text(path, json.dumps(log, indent=2) + "\n")
    return split_id, int(entry["count"])
