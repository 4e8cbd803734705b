"""PneumoniaMNIST as a hospital export: one DICOM file per image and a labels.csv with a predefined split.

Shared by `benchmarks/bench_pneumoniamnist.py` and `tests/test_real_pneumoniamnist.py`. The data is
read from `../shared/data/pneumoniamnist/pneumoniamnist-trainval.npz` relative to the repository root
and never copied into the repository (see that folder's README: MedMNIST v2, Yang et al. 2023,
derived from Kermany et al. 2018, CC BY 4.0).

What the archive looks like:

- `archive/<patient_id>/image.dcm`: a real DICOM file written with pydicom: Digital X-Ray Image
  Storage (For Presentation), modality DX, chest PA, 8-bit MONOCHROME2, 28×28 pixels, the image's
  bytes unchanged. MedMNIST has no patient identifiers, so each image is its own synthetic patient:
  `PNM-T00042` is train image 42, `PNM-V00007` official val image 7 (no real identifier exists).
- `labels.csv`: `patient_id,label,split`, label `normal` (MedMNIST 0) or `pneumonia` (1; the
  positive class, the last in sorted order), split `val` for the official validation images,
  `test` for a seeded, label-stratified held-out share of train, `train` for the rest. ingest
  honours the split column (pipeline/ingest/label_splits.py).

The official test split is not in the shared folder: "test" here is a held-out part of train,
not MedMNIST's test split.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT.parent / "shared" / "data" / "pneumoniamnist"
NPZ_NAME = "pneumoniamnist-trainval.npz"
LABEL_NAMES = {0: "normal", 1: "pneumonia"}  # the data README's mapping: 0 = normal, 1 = pneumonia


class DataMissing(RuntimeError):
    """The shared PneumoniaMNIST file is not where the benchmark and the test look for it."""


@dataclass(frozen=True)
class Archive:
    """A written archive: its folders, and which source images went to which split."""

    root: Path
    archive_dir: Path
    labels_csv: Path
    splits: dict[str, list[str]]  # split → patient ids, in source order
    labels: dict[str, str]  # patient id → label name


def npz_path() -> Path:
    """The shared data file, or DataMissing naming the path to place it at."""
    path = DATA_DIR / NPZ_NAME
    if not path.is_file():
        raise DataMissing(
            f"PneumoniaMNIST not found: expected {path} (../shared/data/pneumoniamnist/{NPZ_NAME} relative to "
            "the repository root). Fix: place the MedMNIST v2 PneumoniaMNIST train/val arrays there (numpy .npz "
            "with train_images, train_labels, val_images, val_labels)."
        )
    return path


def load_arrays() -> dict[str, np.ndarray]:
    """train_images, train_labels, val_images, val_labels (labels flattened to 1-D uint8)."""
    with np.load(npz_path(), allow_pickle=False) as z:
        out = {k: np.asarray(z[k]) for k in ("train_images", "train_labels", "val_images", "val_labels")}
    out["train_labels"] = out["train_labels"].reshape(-1)
    out["val_labels"] = out["val_labels"].reshape(-1)
    return out


def stratified_pick(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` indices of `labels` (or all), label-stratified (each label's share kept, at least one), sorted."""
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picked = []
    values, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    quotas = np.maximum(1, np.floor(exact).astype(int))
    for j in np.argsort(quotas - exact)[: max(0, n - int(quotas.sum()))]:  # the remainder: largest fractions first
        quotas[j] += 1
    for value, quota in zip(values, quotas, strict=True):
        members = np.flatnonzero(labels == value)
        picked.append(rng.choice(members, size=min(quota, len(members)), replace=False))
    return np.sort(np.concatenate(picked))


def held_out(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask: a seeded, label-stratified `fraction` of each label's indices (rounded, at least one)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        k = max(1, round(fraction * len(members)))
        mask[rng.choice(members, size=k, replace=False)] = True
    return mask


def _dicom(image: np.ndarray, patient_id: str, index: int) -> Dataset:
    """A DX chest radiograph for presentation: 8-bit MONOCHROME2, the pixels as given."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["pnm", patient_id, "sop"])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["pnm", patient_id, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["pnm", patient_id, "series"])
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientID, ds.PatientName = patient_id, ""  # synthetic: MedMNIST has no patient identifiers
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = str(index + 1), 1, 1
    ds.Manufacturer = "MedMNIST v2 (PneumoniaMNIST)"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    return ds


def write_archive(
    root: Path,
    *,
    n_train: int | None = None,
    n_val: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Archive:
    """Write `root/archive/` (one DICOM per image) and `root/labels.csv` from the shared arrays.

    Args:
        root: Output folder (created).
        n_train: Use a label-stratified, seeded subsample of this many train images (None: all 3,882).
        n_val: Likewise for the official val split (None: all 524).
        test_fraction: The label-stratified share of the (subsampled) train images held out as `test`.
        seed: Seeds the subsamples and the held-out test draw.

    Returns:
        The Archive, with the patient ids of each split.
    """
    arrays = load_arrays()
    root.mkdir(parents=True, exist_ok=True)
    archive_dir = root / "archive"
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    labels: dict[str, str] = {}
    rows = []
    for source, prefix, n in (("train", "T", n_train), ("val", "V", n_val)):
        images, y = arrays[f"{source}_images"], arrays[f"{source}_labels"]
        chosen = stratified_pick(y, len(y) if n is None else n, seed)
        test_mask = held_out(y[chosen], test_fraction, seed + 1) if source == "train" else np.zeros(len(chosen), bool)
        for i, is_test in zip(chosen, test_mask, strict=True):
            pid = f"PNM-{prefix}{i:05d}"
            split = "test" if is_test else source
            ds = _dicom(images[i], pid, int(i))
            path = archive_dir / pid / "image.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            labels[pid] = LABEL_NAMES[int(y[i])]
            splits[split].append(pid)
            rows.append((pid, labels[pid], split))
    labels_csv = root / "labels.csv"
    tmp = labels_csv.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "label", "split"])
        w.writerows(rows)
    tmp.replace(labels_csv)
    return Archive(root, archive_dir, labels_csv, splits, labels)
