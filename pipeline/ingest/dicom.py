"""DICOM files: read one file's header, check it is a decodable greyscale image, pseudonymise its identifiers."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGExtended12Bit,
    MediaStorageDirectoryStorage,
)

from pipeline.ingest.dicom_deflate import file_meta, is_deflated, read_deflated
from pipeline.ingest.nifti import UnitError
from pipeline.ingest.pseudonym import digest, pseudonym
from pipeline.records import MAX_VOXELS

GPL_HINT = "the GPLv3 decoder pylibjpeg-libjpeg installs as an optional extra: pip install 'medxfer[gpl-codecs]'"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_NOT_IMAGES = {
    "RTDOSE": "an RT dose grid",
    "SEG": "a segmentation mask",
    "RTSTRUCT": "an RT structure set",
    "REG": "a registration",
    "RWV": "a real-world value map",
}
_NATIVE = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)
_UNDEFINED = 0xFFFFFFFF
MAX_FRAMES = 100_000  # frames in one file (an enhanced 4D MR has ~10,000)
PADDING_LIMIT = 1 << 20  # bytes of native pixel data beyond what the header declares that are accepted (dropped)
_RECOGNISABLE = ("SOPClassUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID", "Rows")
# the files of one series share these identifiers: hash each distinct one once per process
_digest = functools.lru_cache(maxsize=4096)(digest)
_pseudonym = functools.lru_cache(maxsize=4096)(pseudonym)


@dataclass
class DicomHeader:
    """What grouping needs from one file; identifiers are already keyed hashes (safe to cache)."""

    relpath: str
    series_key: str
    sop_key: str
    subject_id: str
    study_id: str
    series_id: str
    modality: str
    manufacturer: str
    rows: int
    cols: int
    n_frames: int
    spacing: list[float] | None  # PixelSpacing: [between rows, between columns] mm
    thickness: float | None
    slice_gap: float | None  # SpacingBetweenSlices
    iop: list[float] | None
    ipp: list[float] | None
    frame_ipp: list[list[float]] | None  # per-frame positions of a multi-frame file
    acquisition: str
    warnings: list[str] = field(default_factory=list)
    pixel: dict[str, Any] | None = None  # where plain native pixel data lies, for decoding without a re-parse


# ------------------------------------------------------------------------------------------ reading


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep pydicom's (and nibabel's) warnings and log records off the console.

    A failed decoder plugin logs its traceback on the "pydicom" logger, and odd values warn; every
    such failure already becomes a quarantine reason, so neither is shown (the logger's own
    NullHandler stays; records just do not reach the console handler).
    """
    log = logging.getLogger("pydicom")
    propagate = log.propagate
    log.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.propagate = propagate


def read_dataset(path: Path, header_only: bool = False, **kwargs: Any) -> Dataset:
    """dcmread with every failure mapped to a quarantine reason (truncated, not-dicom, too-large, size-mismatch).

    Deflated files are inflated by `read_deflated`, never past what their header declares;
    `header_only` stops those at the pixel data (other files are read with `kwargs`, e.g. defer_size).
    """
    meta = file_meta(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if meta is not None and is_deflated(meta):
                ds: Dataset = read_deflated(path, meta, header_only)
            else:
                ds = pydicom.dcmread(path, **kwargs)
        except UnitError:
            raise
        except InvalidDicomError:
            ds = _read_forced(path, **kwargs)
        except (EOFError, struct.error, BytesLengthException) as exc:  # cut inside an element's header
            raise UnitError("truncated", f"the file ends inside a data element ({type(exc).__name__})") from exc
        except OSError as exc:
            raise UnitError("unsupported", f"the file cannot be read ({type(exc).__name__})") from exc
        except Exception as exc:
            raise UnitError("not-dicom", f"pydicom cannot parse the file ({type(exc).__name__})") from exc
    for w in caught:
        text = str(w.message).lower()
        if "end of file" in text or "truncat" in text:
            raise UnitError("truncated", "the file ends before the end of the dataset")
    _fix_transfer_syntax(ds)
    return ds


def _read_forced(path: Path, **kwargs: Any) -> Dataset:
    """A file without the DICM preamble: accept it only if recognisable DICOM elements come out."""
    try:
        ds = pydicom.dcmread(path, force=True, **kwargs)
        ok = any(k in ds for k in _RECOGNISABLE)
    except Exception as exc:
        raise UnitError("not-dicom", f"no DICOM preamble and unparseable ({type(exc).__name__})") from exc
    if not ok:
        raise UnitError("not-dicom", "no DICOM preamble ('DICM') and no recognisable DICOM elements")
    return ds


def _fix_transfer_syntax(ds: Dataset) -> None:
    """Files without (0002,0010): record the encoding pydicom actually read, so pixels can decode."""
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRLittleEndian
            if little is not False
            else ExplicitVRBigEndian
        )
        ds.file_meta = meta


def _check_image(ds: Dataset) -> None:
    """Raise UnitError unless `ds` is a greyscale image that an installed plugin can decode."""
    if str(ds.get("SOPClassUID", "")) == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
        raise UnitError("no-pixel-data", "a DICOMDIR index, not an image")
    modality = str(ds.get("Modality", "") or "").upper()
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        classes = [ds.get("SOPClassUID"), ds.file_meta.get("MediaStorageSOPClassUID")]
        names = [str(getattr(uid, "name", "")) for uid in classes if uid]
        image = next((n for n in names if "Image Storage" in n), "")
        if image or all(k in ds for k in ("Rows", "Columns", "BitsAllocated")):
            raise UnitError(
                "truncated",
                f"{image or 'an object with Image Pixel attributes'} without pixel data: "
                "the file ends before its pixel data",
            )
        sop = names[0] if names else "object"
        raise UnitError(
            "no-pixel-data",
            f"{modality or 'unknown modality'} {sop} has no pixel data "
            "(reports, presentation states, RT plans/structures are skipped)",
        )
    if modality in _NOT_IMAGES:
        raise UnitError("unsupported", f"{modality} holds {_NOT_IMAGES[modality]}, not an image")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation") if k not in ds]
    if missing:
        raise UnitError("decode-error", f"required Image Pixel element(s) missing: {', '.join(missing)}")
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    samples = int(ds.get("SamplesPerPixel") or 1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples != 1:
        raise UnitError(
            "unsupported",
            f"PhotometricInterpretation {photometric} with {samples} sample(s) per "
            "pixel: only greyscale (MONOCHROME1/MONOCHROME2) images are ingested",
        )
    if int(ds.BitsAllocated) == 1:
        raise UnitError("unsupported", "1-bit (binary) pixel data is a mask, not an image")
    if "PixelData" in ds:
        _check_decoder(ds)


def _check_decoder(ds: Dataset) -> None:
    tsyntax = ds.file_meta.TransferSyntaxUID
    problem = _decoder_problem(tsyntax)
    if problem:
        raise UnitError(*problem)
    if (
        tsyntax == JPEGExtended12Bit
        and int(ds.get("BitsStored") or 8) > 8
        and importlib.util.find_spec("libjpeg") is None
    ):
        raise UnitError("no-decoder", f"12-bit 'JPEG Extended' needs pylibjpeg-libjpeg; {GPL_HINT}")


@functools.lru_cache(maxsize=64)
def _decoder_problem(tsyntax: UID) -> tuple[str, str] | None:
    """(reason, detail) if no installed pixel decoder handles `tsyntax`, else None (cached per syntax)."""
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        return (
            "unsupported",
            f"transfer syntax '{tsyntax.name}' has no pixel decoder (video and private syntaxes are not ingested)",
        )
    if not decoder.is_available:
        return (
            "no-decoder",
            f"no installed decoder for '{tsyntax.name}'; {GPL_HINT} "
            f"(options: {'; '.join(decoder.missing_dependencies)})",
        )
    return None


def _floats(ds: Dataset | None, keyword: str) -> list[float] | None:
    value = ds.get(keyword) if ds is not None else None
    if value is None or value == "":
        return None
    values = [float(v) for v in (value if isinstance(value, list | tuple | MultiValue) else [value])]
    return values if all(np.isfinite(values)) else None


def _first(values: list[float] | None) -> float | None:
    return values[0] if values else None


def first_item(ds: Dataset | None, seq: str) -> Dataset | None:
    """The first item of sequence `seq` in `ds`, or None when `ds` or the sequence is absent or empty."""
    items = ds.get(seq) if ds is not None else None
    return items[0] if items else None


Geometry = tuple[list[float] | None, list[float] | None, float | None, list[list[float]] | None]


def _geometry(ds: Dataset, n_frames: int) -> Geometry:
    """(orientation, pixel spacing, slice thickness, per-frame positions or None) of one file."""
    iop = _floats(ds, "ImageOrientationPatient")
    spacing = _floats(ds, "PixelSpacing") or _floats(ds, "ImagerPixelSpacing")
    thickness = _first(_floats(ds, "SliceThickness"))
    ipp = _floats(ds, "ImagePositionPatient")
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return iop, spacing, thickness, _frame_positions(ds, ipp, iop, n_frames) if n_frames > 1 else None
    shared, frames = first_item(ds, "SharedFunctionalGroupsSequence"), ds.PerFrameFunctionalGroupsSequence
    measures = first_item(shared, "PixelMeasuresSequence") or first_item(frames[0], "PixelMeasuresSequence")
    spacing = _floats(measures, "PixelSpacing") or spacing
    thickness = _first(_floats(measures, "SliceThickness")) or thickness
    orients = {
        tuple(np.round(o, 4).tolist()) if o else None
        for o in (
            _floats(
                first_item(f, "PlaneOrientationSequence") or first_item(shared, "PlaneOrientationSequence"),
                "ImageOrientationPatient",
            )
            for f in frames
        )
    }
    if len(orients) > 1:
        raise UnitError("unsupported", "the frames of this multi-frame file have different orientations")
    iop = list(orients.pop() or []) or iop
    positions = [
        _floats(
            first_item(f, "PlanePositionSequence") or first_item(shared, "PlanePositionSequence"),
            "ImagePositionPatient",
        )
        for f in frames
    ]
    complete = bool(iop) and len(positions) == n_frames and all(positions)
    return iop, spacing, thickness, positions if complete else None  # type: ignore[return-value]


def _frame_positions(
    ds: Dataset, ipp: list[float] | None, iop: list[float] | None, n_frames: int
) -> list[list[float]] | None:
    """Positions of an old-style multi-frame stack: one IPP plus GridFrameOffsetVector or SpacingBetweenSlices."""
    offsets = _floats(ds, "GridFrameOffsetVector")
    gap = _first(_floats(ds, "SpacingBetweenSlices"))
    if not offsets or len(offsets) != n_frames:
        offsets = [k * gap for k in range(n_frames)] if gap else None
    if offsets is None or not ipp or not iop:
        return None
    normal = np.cross(iop[:3], iop[3:])
    return [(np.asarray(ipp) + o * normal).tolist() for o in offsets]


def read_header(path: Path, relpath: str, key: bytes, max_voxels: int = MAX_VOXELS) -> DicomHeader:
    """Read one file's header, check it is a decodable greyscale image, and pseudonymise its identifiers.

    Args:
        path: The file.
        relpath: Its posix path relative to SOURCE (kept in the header, named in quarantine.csv).
        key: Pseudonym key of the identifiers' keyed hashes.
        max_voxels: Largest Rows × Columns × frames × samples accepted (checked before anything is decoded).

    Returns:
        The header; `pixel` says where the pixel bytes lie when they can be read without pydicom.

    Raises:
        UnitError: With a quarantine reason (empty-file, truncated, not-dicom, no-pixel-data,
            no-decoder, unsupported, decode-error, too-large, size-mismatch).
    """
    size = path.stat().st_size
    if size == 0:
        raise UnitError("empty-file", "the file is empty (0 bytes)")
    ds = read_dataset(path, header_only=True, defer_size="64 KB")
    if len(ds) == 0:
        raise UnitError("truncated", "no data elements after the file meta information (file cut short?)")
    if _pixels_cut_short(ds, size):
        raise UnitError("truncated", f"the file ends inside the pixel data ({size} bytes on disk)")
    try:
        _check_image(ds)
        check_size(ds, max_voxels)
        header = _header_from(ds, relpath, key)
        try:
            header.pixel = _native_pixels(ds, header)
        except Exception:  # an odd value here is reported (or not) by the full decode, as before
            header.pixel = None
        return header
    except UnitError:
        raise
    except Exception as exc:
        raise UnitError("decode-error", f"invalid header value ({type(exc).__name__}: {str(exc)[:120]})") from exc


def check_size(ds: Dataset, max_voxels: int) -> None:
    """Raise UnitError unless the pixel data fits `max_voxels` and is as long as the header says.

    too-large: Rows × Columns × frames × samples over `max_voxels` (nothing is decoded; a few bytes
    of RLE can declare 65535 × 65535 pixels), or more than MAX_FRAMES frames. size-mismatch: native
    (uncompressed or deflated) pixel data shorter than Rows × Columns × frames × samples ×
    BitsAllocated / 8, or longer by more than PADDING_LIMIT (pydicom drops excess padding, but would
    read it all first), or encapsulated data too short to hold one fragment per frame.
    """
    rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
    frames, samples = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
    if frames < 1:
        raise UnitError("decode-error", f"NumberOfFrames is {frames}")
    if frames > MAX_FRAMES:  # each frame costs ~100 bytes of bookkeeping before any voxel is read
        raise UnitError("too-large", f"NumberOfFrames {frames:,} is over {MAX_FRAMES:,} frames in one file")
    voxels = rows * cols * frames * samples
    if voxels > max_voxels:
        raise UnitError(
            "too-large",
            f"Rows × Columns × frames × samples = {rows} × {cols} × {frames} × {samples} = {voxels:,} voxels, "
            f"over the limit of {max_voxels:,}. Fix: if the image is real, raise --max-voxels (data.max_voxels)",
        )
    keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        return
    elem = ds.get_item(keyword, keep_deferred=True)
    length = elem.length if isinstance(elem, RawDataElement) else len(elem.value or b"")
    native = ds.file_meta.TransferSyntaxUID in _NATIVE or keyword != "PixelData"
    expected = -(-voxels * bits // 8)
    if native and (length == _UNDEFINED or not expected <= length <= expected + PADDING_LIMIT):
        held = "of undefined length" if length == _UNDEFINED else f"{length:,} bytes"
        raise UnitError(
            "size-mismatch",
            f"{keyword} holds {held}; Rows × Columns × frames × samples × BitsAllocated / 8 = "
            f"{rows} × {cols} × {frames} × {samples} × {bits} / 8 = {expected:,} bytes"
            + (f" (up to {PADDING_LIMIT:,} bytes of padding are accepted)" if length > expected else ""),
        )
    value = elem.value if length == _UNDEFINED else None
    if not native and isinstance(value, bytes) and frames * 8 > len(value):
        raise UnitError(
            "size-mismatch",
            f"{frames:,} frames cannot fit in {len(value):,} bytes of encapsulated pixel data (8 bytes per fragment)",
        )


def _pixels_cut_short(ds: Dataset, size: int) -> bool:
    """Native pixel data that runs past the end of the file (seen without reading the pixels)."""
    raw = ds.get_item("PixelData", keep_deferred=True) if "PixelData" in ds else None
    if not isinstance(raw, RawDataElement) or raw.length == 0xFFFFFFFF:
        return False
    return ds.file_meta.TransferSyntaxUID != DeflatedExplicitVRLittleEndian and raw.value_tell + raw.length > size


def _native_pixels(ds: Dataset, h: DicomHeader) -> dict[str, Any] | None:
    """Offset, length and dtype of plain little-endian single-frame MONOCHROME2 pixel data, else None.

    Such files are decoded by reading their pixel bytes directly (`decode_native`), exactly as
    pydicom's native decoder would; everything else goes through a full `dcmread` at decode time.
    """
    raw = ds.get_item("PixelData", keep_deferred=True) if "PixelData" in ds else None
    tsyntax = ds.file_meta.TransferSyntaxUID
    if (
        not isinstance(raw, RawDataElement)
        or raw.length == 0xFFFFFFFF
        or h.n_frames != 1
        or tsyntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        or any(
            k in ds
            for k in (
                "PerFrameFunctionalGroupsSequence",
                "ModalityLUTSequence",
                "FloatPixelData",
                "DoubleFloatPixelData",
                "NumberOfFrames",
            )
        )
        or not all(k in ds for k in ("BitsStored", "PixelRepresentation", "SamplesPerPixel"))
        or str(ds.PhotometricInterpretation).strip().upper() != "MONOCHROME2"
    ):
        return None
    allocated, stored, signed = int(ds.BitsAllocated), int(ds.BitsStored), int(ds.PixelRepresentation)
    nbytes = h.rows * h.cols * allocated // 8
    if (
        allocated not in (8, 16, 32)
        or not 0 < stored <= allocated
        or signed not in (0, 1)
        or raw.length not in (nbytes, nbytes + nbytes % 2)
        or nbytes == 0
    ):
        return None
    rescale = "RescaleSlope" in ds and "RescaleIntercept" in ds
    return {
        "offset": int(raw.value_tell),
        "nbytes": nbytes,
        "dtype": f"<{'iu'[1 - signed]}{allocated // 8}",
        "shift": allocated - stored,
        "rows": h.rows,
        "cols": h.cols,
        "rescale": [float(ds.RescaleSlope), float(ds.RescaleIntercept)] if rescale else None,
    }


def _header_from(ds: Dataset, relpath: str, key: bytes) -> DicomHeader:
    def text(kw: str) -> str:
        return str(ds.get(kw, "") or "").strip()

    notes = []
    series, study, patient = text("SeriesInstanceUID"), text("StudyInstanceUID"), text("PatientID")
    if not series:
        series = f"file:{relpath}"
        notes.append("no SeriesInstanceUID: the file is its own series")
    study = study or f"series:{series}"
    if not patient:
        patient = f"study:{study}"
        notes.append("no PatientID: the study is its own subject")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    iop, spacing, thickness, frame_ipp = _geometry(ds, n_frames)
    acquisition = "|".join(text(k) for k in ("AcquisitionNumber", "EchoNumbers", "TemporalPositionIdentifier"))
    return DicomHeader(
        relpath=relpath,
        series_key=_digest(key, "series-key", series),
        sop_key=digest(key, "sop", text("SOPInstanceUID") or relpath)[:32],
        subject_id=_pseudonym(key, "subject", patient),
        study_id=_pseudonym(key, "study", study),
        series_id=_pseudonym(key, "series", series),
        modality=text("Modality").upper(),
        manufacturer=text("Manufacturer"),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        n_frames=n_frames,
        spacing=spacing,
        thickness=thickness,
        slice_gap=_first(_floats(ds, "SpacingBetweenSlices")),
        iop=iop,
        ipp=_floats(ds, "ImagePositionPatient"),
        frame_ipp=frame_ipp,
        acquisition=acquisition,
        warnings=notes,
    )
