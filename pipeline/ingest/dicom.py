"""DICOM files: read one file's header, check it is a decodable greyscale image, pseudonymise its identifiers."""

from __future__ import annotations

import functools
import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
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

from pipeline.ingest.nifti import UnitError
from pipeline.ingest.pseudonym import digest, pseudonym

GPL_HINT = "the GPLv3 decoder pylibjpeg-libjpeg installs as an optional extra: pip install 'medxfer[gpl-codecs]'"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_NOT_IMAGES = {
    "RTDOSE": "an RT dose grid",
    "SEG": "a segmentation mask",
    "RTSTRUCT": "an RT structure set",
    "REG": "a registration",
    "RWV": "a real-world value map",
}
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


def read_dataset(path: Path, **kwargs: Any) -> Dataset:
    """dcmread with every failure mapped to a quarantine reason (truncated, not-dicom)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds: Dataset = pydicom.dcmread(path, **kwargs)
        except InvalidDicomError:
            ds = _read_forced(path, **kwargs)
        except EOFError as exc:
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
        sop = getattr(ds.get("SOPClassUID"), "name", "") or "object"
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


def read_header(path: Path, relpath: str, key: bytes) -> DicomHeader:
    """Read one file's header, check it is a decodable greyscale image, and pseudonymise its identifiers.

    Args:
        path: The file.
        relpath: Its posix path relative to SOURCE (kept in the header, named in quarantine.csv).
        key: Pseudonym key of the identifiers' keyed hashes.

    Returns:
        The header; `pixel` says where the pixel bytes lie when they can be read without pydicom.

    Raises:
        UnitError: With a quarantine reason (empty-file, truncated, not-dicom, no-pixel-data,
            no-decoder, unsupported, decode-error).
    """
    size = path.stat().st_size
    if size == 0:
        raise UnitError("empty-file", "the file is empty (0 bytes)")
    ds = read_dataset(path, defer_size="64 KB")
    if len(ds) == 0:
        raise UnitError("truncated", "no data elements after the file meta information (file cut short?)")
    if _pixels_cut_short(ds, size):
        raise UnitError("truncated", f"the file ends inside the pixel data ({size} bytes on disk)")
    try:
        _check_image(ds)
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


def _pixels_cut_short(ds: Dataset, size: int) -> bool:
    """Native pixel data that runs past the end of the file (seen without reading the pixels)."""
    raw = ds.get_item("PixelData") if "PixelData" in ds else None
    if not isinstance(raw, RawDataElement) or raw.length == 0xFFFFFFFF:
        return False
    return ds.file_meta.TransferSyntaxUID != DeflatedExplicitVRLittleEndian and raw.value_tell + raw.length > size


def _native_pixels(ds: Dataset, h: DicomHeader) -> dict[str, Any] | None:
    """Offset, length and dtype of plain little-endian single-frame MONOCHROME2 pixel data, else None.

    Such files are decoded by reading their pixel bytes directly (`decode_native`), exactly as
    pydicom's native decoder would; everything else goes through a full `dcmread` at decode time.
    """
    raw = ds.get_item("PixelData") if "PixelData" in ds else None
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
