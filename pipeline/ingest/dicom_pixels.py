"""DICOM pixel decoding: the frames of an image unit as float32 (native fast path, modality LUT, MONOCHROME1)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from pipeline.ingest.dicom import GPL_HINT, first_item, read_dataset
from pipeline.ingest.dicom_series import UnitPlan
from pipeline.ingest.nifti import UnitError


def decode_plan(source: Path, plan: UnitPlan) -> np.ndarray:
    """Decode the frames of a unit in slice order into a float32 X×Y×Z array (x = column, y = row).

    Args:
        source: Archive root; the plan's frames name files relative to it.
        plan: The image unit.

    Raises:
        UnitError: A file cannot be read or decoded, or its frames differ in size from the unit's first.
    """
    slices: list[np.ndarray] = []
    current, arr = "", np.empty(0)
    for relpath, index in plan.frames:
        if relpath != current:
            native = plan.pixels.get(relpath)
            fast = decode_native(source / relpath, native) if native else None
            current, arr = relpath, decode_file(source / relpath, relpath) if fast is None else fast
        if slices and arr.shape[1:] != slices[0].shape:
            raise UnitError(
                "inconsistent-series", f"pixel data {arr.shape[1:]} differs from the series' {slices[0].shape}", relpath
            )
        slices.append(arr[max(index, 0)])
    return np.ascontiguousarray(np.stack(slices, axis=-1).transpose(1, 0, 2))


def decode_native(path: Path, pixel: dict[str, Any]) -> np.ndarray | None:
    """Frames×rows×cols float32 of a file described by `_native_pixels`, without parsing it again.

    Gives what `decode_file` gives (pydicom's unused-bit correction, then rescale); None when the
    bytes cannot be read as expected (the file changed), so the caller falls back to `decode_file`.

    Args:
        path: The file.
        pixel: Its `DicomHeader.pixel`: offset, byte count, dtype, unused high bits, rows, cols, rescale.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(pixel["offset"])
            buf = fh.read(pixel["nbytes"])
    except OSError:
        return None
    if len(buf) != pixel["nbytes"]:
        return None
    raw = np.frombuffer(buf, dtype=pixel["dtype"]).reshape(1, pixel["rows"], pixel["cols"])
    if pixel["shift"]:
        raw = np.right_shift(np.left_shift(raw, pixel["shift"]), pixel["shift"])
    if pixel["rescale"] is None:
        return raw.astype(np.float32)
    slope, intercept = pixel["rescale"]
    scaled = raw.astype(np.float64) * slope
    scaled += intercept
    return scaled.astype(np.float32)


def decode_file(path: Path, relpath: str) -> np.ndarray:
    """Pixel values of one file as float32 frames×rows×cols: modality LUT / rescale applied, MONOCHROME1 inverted.

    Args:
        path: The file.
        relpath: Its path relative to SOURCE, set on any UnitError raised.

    Raises:
        UnitError: The file cannot be read (see `read_header`) or its pixel data cannot be decoded
            (truncated, no-decoder, decode-error).
    """
    try:
        ds = read_dataset(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = ds.pixel_array
    except UnitError as exc:
        exc.relpath = relpath
        raise
    except MemoryError as exc:
        raise UnitError("too-large", f"out of memory decoding the pixel data ({_first_line(exc)})", relpath) from exc
    except Exception as exc:
        raise _decode_failure(exc, relpath) from exc
    raw = raw.reshape(-1, int(ds.Rows), int(ds.Columns))
    invert = str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1"
    limits = _stored_limits(ds, raw)
    out = np.empty(raw.shape, dtype=np.float32)
    for i in range(raw.shape[0]):
        lut_ds = _frame_transform(ds, i)
        out[i] = apply_modality_lut(raw[i], lut_ds)
        if invert:
            ends = np.asarray(apply_modality_lut(limits, lut_ds), dtype=np.float64)
            out[i] = ends.min() + ends.max() - out[i]
    return out


def _stored_limits(ds: Dataset, raw: np.ndarray) -> np.ndarray:
    """The smallest and largest storable values (from BitsStored), for MONOCHROME1 inversion."""
    if raw.dtype.kind == "f":
        return np.array([raw.min(), raw.max()])
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1])
    return np.array([0, 2**bits - 1])


def _frame_transform(ds: Dataset, index: int) -> Dataset:
    """The dataset holding frame `index`'s modality transform (enhanced files keep it in functional groups)."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return ds
    per_frame = ds.PerFrameFunctionalGroupsSequence[index]
    item = first_item(per_frame, "PixelValueTransformationSequence") or first_item(
        first_item(ds, "SharedFunctionalGroupsSequence"), "PixelValueTransformationSequence"
    )
    out = Dataset()
    source = item if item is not None and "RescaleSlope" in item else ds
    if "RescaleSlope" in source and "RescaleIntercept" in source:
        out.RescaleSlope, out.RescaleIntercept = source.RescaleSlope, source.RescaleIntercept
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _decode_failure(exc: Exception, relpath: str) -> UnitError:
    text = str(exc)
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    if "less than expected" in text or "truncat" in text.lower():
        return UnitError("truncated", f"pixel data shorter than Rows×Columns×frames needs ({first})", relpath)
    if "12-bit precision" in text or "plugins are missing" in text:
        return UnitError("no-decoder", f"no installed plugin decodes this pixel data; {GPL_HINT}", relpath)
    return UnitError("decode-error", f"{type(exc).__name__}: {first}", relpath)
