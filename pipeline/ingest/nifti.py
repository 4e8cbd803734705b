"""NIfTI: input (any orientation → RAS), the subject rule, and the writer and reader of every unit's image."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import nibabel as nib
import numpy as np

from pipeline.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_INT16 = np.iinfo(np.int16)
_BIDS_MODALITY = {
    "t1w": "MR",
    "t2w": "MR",
    "flair": "MR",
    "pd": "MR",
    "t2star": "MR",
    "bold": "MR",
    "dwi": "MR",
    "ct": "CT",
}


class UnitError(Exception):
    """A file or image unit that cannot be ingested: `reason` is a quarantine code."""

    def __init__(self, reason: str, detail: str, relpath: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.relpath = reason, detail, relpath


def is_nifti(name: str) -> bool:
    """True for ``.nii`` and ``.nii.gz`` file names (case-insensitive)."""
    return name.lower().endswith(NIFTI_SUFFIXES)


def nifti_subject(relpath: str) -> str:
    """The patient id (in clear) of a NIfTI file without a labels `path` row.

    Rule: the nearest BIDS ``sub-<id>`` folder (the whole folder name, e.g. ``sub-01``, as in
    BIDS participants.tsv), else the first folder under SOURCE, else the file name without
    its NIfTI suffix.
    """
    parts = PurePosixPath(relpath).parts
    folders = parts[:-1]
    for folder in reversed(folders):
        if folder.startswith("sub-") and len(folder) > 4:
            return folder
    if folders:
        return folders[0]
    name = parts[-1]
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]


def nifti_study(relpath: str, subject: str) -> str:
    """Study key (in clear) of a NIfTI file: the subject plus its BIDS ``ses-<label>`` folder, if any."""
    sessions = [p for p in PurePosixPath(relpath).parts[:-1] if p.startswith("ses-")]
    return f"{subject}/{sessions[-1] if sessions else ''}"


def bids_modality(relpath: str) -> str:
    """ "MR" or "CT" from a BIDS suffix (``_T1w``, ``_bold``, ``_ct``, ...), else ""."""
    name = PurePosixPath(relpath).name.lower()
    stem = name.split(".nii")[0]
    return _BIDS_MODALITY.get(stem.rsplit("_", 1)[-1], "") if "_" in stem else ""


def check_nifti_header(path: Path) -> tuple[int, ...]:
    """Cheap header check at scan time: the shape, or UnitError (nifti-4d, nifti-corrupt)."""
    try:
        img: Any = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
    except Exception as exc:
        raise UnitError(
            "nifti-corrupt", f"nibabel cannot read the header ({type(exc).__name__}: {_short(exc)})"
        ) from exc
    if len(shape) > 4 or (len(shape) == 4 and shape[3] > 1):
        raise UnitError(
            "nifti-4d",
            f"shape {shape}: only 2D/3D images are ingested; split the series "
            "into one 3D file per volume (e.g. nibabel.funcs.four_to_three)",
        )
    if len(shape) < 2 or min(shape) < 1:
        raise UnitError("nifti-corrupt", f"shape {shape} is not an image")
    return shape


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file as float32 X×Y×Z (scaling applied) and its voxel→RAS affine."""
    shape = check_nifti_header(path)
    try:
        img: Any = nib.load(path)
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:
        raise UnitError("nifti-corrupt", f"image data unreadable ({type(exc).__name__}: {_short(exc)})") from exc
    if data.dtype.kind not in "iuf" or data.dtype.names:
        raise UnitError("unsupported", f"NIfTI data type {data.dtype} (RGB/complex) is not a greyscale image")
    data = data.reshape(shape[:3] if len(shape) >= 3 else (*shape, 1))
    if not np.all(np.isfinite(affine)):
        raise UnitError("nifti-corrupt", "the affine holds NaN or infinite values")
    return data.astype(np.float32), affine


def finish_volume(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Reorient to the closest canonical RAS and pick the stored dtype.

    Args:
        array: X×Y×Z values (float32), already in physical units (HU for CT).
        affine: voxel → RAS mm affine of `array`.

    Returns:
        (array as int16 when every value is an integer within int16, else float32; its RAS
        affine; spacing in mm in array axis order).
    """
    canon = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine))
    data = np.ascontiguousarray(np.asanyarray(canon.dataobj))
    if (
        data.size
        and np.all(np.isfinite(data))
        and data.min() >= _INT16.min
        and data.max() <= _INT16.max
        and np.array_equal(data, np.round(data))
    ):
        data = data.astype(np.int16)
    spacing = [round(float(z), 6) for z in np.sqrt((canon.affine[:3, :3] ** 2).sum(axis=0))]
    return data, np.asarray(canon.affine, dtype=np.float64), spacing


def content_sha256(array: np.ndarray, affine: np.ndarray) -> str:
    """sha256 over the stored array (dtype, shape, C-order little-endian bytes) and the float64 affine."""
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    h = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    h.update(data.tobytes())
    h.update(np.ascontiguousarray(affine, dtype="<f8").tobytes())
    return h.hexdigest()


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """An uncompressed NIfTI-1 file with a clean header: mm units, scanner qform/sform, no text fields."""
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    hdr = img.header
    hdr.set_xyzt_units("mm", "sec")
    for text_field in ("descrip", "db_name", "aux_file", "intent_name"):
        hdr[text_field] = b""
    return img.to_bytes()


def read_volume(manifest_dir: str | Path, row: Mapping[str, Any] | str) -> tuple[np.ndarray, np.ndarray]:
    """Load one image unit of a manifest.

    Args:
        manifest_dir: The manifest directory.
        row: A manifest row (anything with ``image_path``, e.g. a pandas row) or an image_id.

    Returns:
        (float32 array in X, Y, Z order (RAS), 4×4 voxel → RAS mm affine).

    Raises:
        DataError: If the image file is missing or unreadable.
    """
    rel = f"images/{row}.nii" if isinstance(row, str) else str(row["image_path"])
    path = Path(manifest_dir) / rel
    if not path.is_file():
        raise DataError(
            f"image {rel} of {Path(manifest_dir) / 'manifest.parquet'} is missing; re-run "
            "medxfer ingest (it rewrites missing images)"
        )
    try:
        img: Any = nib.load(path)
        return np.asanyarray(img.dataobj).astype(np.float32), np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:
        raise DataError(f"image {path} is unreadable ({type(exc).__name__}); re-run medxfer ingest") from exc


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
