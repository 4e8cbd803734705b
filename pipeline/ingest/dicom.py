"""DICOM: read headers, group files into image units (series split by geometry), sort slices, affine, decode."""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, get_decoder
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
from pipeline.records import QuarantineEntry

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
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
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


@dataclass
class UnitPlan:
    """One image unit to decode: frames in slice order and the voxel → RAS affine (before canonical)."""

    image_id: str
    subject_id: str
    study_id: str
    series_id: str
    modality: str
    manufacturer: str
    source_format: str
    frames: list[tuple[str, int]]  # (relpath, frame index; -1 = the file's only frame)
    affine: list[list[float]] | None
    warnings: list[str] = field(default_factory=list)
    pixels: dict[str, dict[str, Any]] = field(default_factory=dict)  # relpath → DicomHeader.pixel

    @property
    def files(self) -> list[str]:
        return sorted({rel for rel, _ in self.frames})


# ------------------------------------------------------------------------------------------ reading


def _read(path: Path, **kwargs: Any) -> Dataset:
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


def _item(ds: Dataset | None, seq: str) -> Dataset | None:
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
    shared, frames = _item(ds, "SharedFunctionalGroupsSequence"), ds.PerFrameFunctionalGroupsSequence
    measures = _item(shared, "PixelMeasuresSequence") or _item(frames[0], "PixelMeasuresSequence")
    spacing = _floats(measures, "PixelSpacing") or spacing
    thickness = _first(_floats(measures, "SliceThickness")) or thickness
    orients = {
        tuple(np.round(o, 4).tolist()) if o else None
        for o in (
            _floats(
                _item(f, "PlaneOrientationSequence") or _item(shared, "PlaneOrientationSequence"),
                "ImageOrientationPatient",
            )
            for f in frames
        )
    }
    if len(orients) > 1:
        raise UnitError("unsupported", "the frames of this multi-frame file have different orientations")
    iop = list(orients.pop() or []) or iop
    positions = [
        _floats(_item(f, "PlanePositionSequence") or _item(shared, "PlanePositionSequence"), "ImagePositionPatient")
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

    Raises:
        UnitError: With a quarantine reason (empty-file, truncated, not-dicom, no-pixel-data,
            no-decoder, unsupported, decode-error).
    """
    size = path.stat().st_size
    if size == 0:
        raise UnitError("empty-file", "the file is empty (0 bytes)")
    ds = _read(path, defer_size="64 KB")
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


# ----------------------------------------------------------------------------------------- grouping


def _stackable(h: DicomHeader) -> bool:
    return h.n_frames == 1 and bool(h.iop) and bool(h.ipp) and h.frame_ipp is None


def _geometry_key(h: DicomHeader) -> str:
    iop = ",".join(f"{v:.3f}" for v in np.round(h.iop or [], 3) + 0.0)
    spacing = ",".join(f"{v:.4f}" for v in h.spacing or [])
    return f"iop={iop};size={h.rows}x{h.cols};ps={spacing}"


def _repeats(positions: list[list[float]], iop: list[float]) -> int:
    """How many slices share a position with another (positions projected on the slice normal, 0.01 mm)."""
    proj = np.round(np.asarray(positions) @ np.cross(iop[:3], iop[3:]), 2)
    return len(proj) - len(set(proj.tolist()))


def _overlap(members: list[DicomHeader]) -> int:
    return _repeats([h.ipp for h in members], members[0].iop)  # type: ignore[misc, arg-type]


def _split_duplicates(
    gkey: str, members: list[DicomHeader], quarantine: list[QuarantineEntry]
) -> list[tuple[str, list[DicomHeader]]]:
    """Slices sharing a position: drop copies of one instance, else split by acquisition, else quarantine."""
    if not _overlap(members):
        return [(gkey, members)]
    kept: dict[str, DicomHeader] = {}
    for h in members:
        if h.sop_key in kept:
            quarantine.append(
                QuarantineEntry(
                    h.relpath, "inconsistent-series", f"duplicate copy of the instance in {kept[h.sop_key].relpath}"
                )
            )
        else:
            kept[h.sop_key] = h
    members = list(kept.values())
    if not _overlap(members):
        return [(gkey, members)]
    by_acq: dict[str, list[DicomHeader]] = defaultdict(list)
    for h in members:
        by_acq[h.acquisition].append(h)
    if len(by_acq) > 1 and not any(_overlap(g) for g in by_acq.values()):
        return [(f"{gkey};acq={a}", g) for a, g in sorted(by_acq.items())]
    n_positions = len(members) - _overlap(members)
    for h in members:
        quarantine.append(
            QuarantineEntry(
                h.relpath,
                "inconsistent-series",
                f"{len(members)} slices of one series at only {n_positions} distinct "
                "positions (several stacks or repeated scans in one series)",
            )
        )
    return []


def plan_units(headers: list[DicomHeader], key: bytes) -> tuple[list[UnitPlan], list[QuarantineEntry]]:
    """Group headers into image units: by series, split by orientation/size/spacing and acquisition.

    Single-frame files with position and orientation are stacked; every other file (2D
    radiographs, multi-frame files) is a unit of its own.
    """
    series: dict[str, list[DicomHeader]] = defaultdict(list)
    for h in sorted(headers, key=lambda h: h.relpath):
        series[h.series_key].append(h)
    plans: list[UnitPlan] = []
    quarantine: list[QuarantineEntry] = []
    for series_key, members in sorted(series.items()):
        groups: dict[str, list[DicomHeader]] = defaultdict(list)
        for h in members:
            groups[_geometry_key(h) if _stackable(h) else f"file={h.sop_key}"].append(h)
        units = []
        for gkey, group in sorted(groups.items()):
            if _stackable(group[0]):
                units += _split_duplicates(gkey, group, quarantine)
            elif group[0].frame_ipp and _repeats(group[0].frame_ipp, group[0].iop or []):
                quarantine.append(
                    QuarantineEntry(
                        group[0].relpath,
                        "unsupported",
                        "multi-frame file with repeated frame positions (several stacks or time points)",
                    )
                )
            else:
                units.append((gkey, group))
        for split_key, group in units:
            image_key = series_key if len(units) == 1 else f"{series_key}|{split_key}"
            plans.append(_plan(group, pseudonym(key, "image", image_key)))
    return plans, quarantine


def _plan(group: list[DicomHeader], image_id: str) -> UnitPlan:
    h = group[0]
    notes = sorted({w for m in group for w in m.warnings})
    entries: list[tuple[str, int, list[float]]] = []
    if _stackable(h):
        entries = [(m.relpath, -1, m.ipp) for m in group if m.ipp]
    elif h.frame_ipp:
        entries = [(h.relpath, i, p) for i, p in enumerate(h.frame_ipp)]
    if entries:
        frames, affine, more = _stack(entries, h, [m.thickness for m in group])
    else:
        frames = [(h.relpath, i if h.n_frames > 1 else -1) for i in range(h.n_frames)]
        affine, more = _flat_affine(h)
    return UnitPlan(
        image_id,
        h.subject_id,
        h.study_id,
        h.series_id,
        h.modality,
        h.manufacturer,
        "dicom",
        frames,
        affine,
        notes + more,
        {m.relpath: m.pixel for m in group if m.pixel},
    )


def _in_plane(h: DicomHeader) -> tuple[list[float], list[str]]:
    if h.spacing and len(h.spacing) == 2 and min(h.spacing) > 0:
        return h.spacing, []
    return [1.0, 1.0], ["no PixelSpacing or ImagerPixelSpacing: 1 mm pixels assumed"]


def _flat_affine(h: DicomHeader) -> tuple[list[list[float]], list[str]]:
    """No patient geometry (radiographs, cine): x = column, y = row, z = frame, spacing on the diagonal."""
    (row_mm, col_mm), notes = _in_plane(h)
    dz = h.slice_gap or h.thickness or 1.0
    if h.n_frames > 1:
        notes.append("multi-frame file without frame positions: frames stacked along z in stored order")
    return np.diag([col_mm, row_mm, dz, 1.0]).tolist(), notes


def _stack(
    entries: list[tuple[str, int, list[float]]], h: DicomHeader, thicknesses: list[float | None]
) -> tuple[list[tuple[str, int]], list[list[float]], list[str]]:
    """Sort slices by position along the slice normal; build the LPS affine and flip it to RAS."""
    row, col = np.asarray(h.iop[:3]), np.asarray(h.iop[3:])  # type: ignore[index]
    normal = np.cross(row, col)
    pos = np.array([e[2] for e in entries], dtype=np.float64)
    order = np.argsort(pos @ normal, kind="stable")
    pos = pos[order]
    (row_mm, col_mm), notes = _in_plane(h)
    if len(entries) > 1:
        gaps = np.diff(pos @ normal)
        step_n = float(np.median(gaps))
        notes += _spacing_warnings(gaps, step_n)
        direction = (pos[-1] - pos[0]) / np.linalg.norm(pos[-1] - pos[0])
        cos = float(direction @ normal)
        step = direction * (step_n / cos)
        if cos < 0.9999:
            notes.append("slices are not stacked along the slice normal (gantry tilt?): the affine is sheared")
    else:
        step = normal * (h.slice_gap or h.thickness or 1.0)
        if np.argmax(np.abs(normal)) != 2:
            notes.append("single sagittal or coronal slice: in RAS order its one-voxel axis is x or y, not z")
    distinct = sorted({round(t, 3) for t in thicknesses if t})
    if len(distinct) > 1:
        notes.append(f"mixed slice thickness: {', '.join(f'{t:g}' for t in distinct)} mm")
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = row * col_mm, col * row_mm, step, pos[0]
    frames = [(entries[i][0], entries[i][1]) for i in order]
    return frames, (_LPS_TO_RAS @ affine).tolist(), notes


def _spacing_warnings(gaps: np.ndarray, step: float) -> list[str]:
    notes = []
    missing = [round(g / step) - 1 for g in gaps if g > 1.5 * step]
    if missing:
        notes.append(f"gap: {sum(missing)} missing slice(s) at {len(missing)} place(s) (slice spacing {step:.4g} mm)")
    irregular = [g for g in gaps if abs(g - step) > max(0.01 * step, 0.01) and g <= 1.5 * step]
    if irregular:
        notes.append(f"irregular slice spacing: {gaps.min():.4g} to {gaps.max():.4g} mm (median {step:.4g} mm)")
    return notes


# ----------------------------------------------------------------------------------------- decoding


def decode_plan(source: Path, plan: UnitPlan) -> np.ndarray:
    """Decode the frames of a unit in slice order into a float32 X×Y×Z array (x = column, y = row)."""
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
    """Pixel values of one file as float32 frames×rows×cols: modality LUT / rescale applied, MONOCHROME1 inverted."""
    try:
        ds = _read(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = ds.pixel_array
    except UnitError as exc:
        exc.relpath = relpath
        raise
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
    item = _item(per_frame, "PixelValueTransformationSequence") or _item(
        _item(ds, "SharedFunctionalGroupsSequence"), "PixelValueTransformationSequence"
    )
    out = Dataset()
    source = item if item is not None and "RescaleSlope" in item else ds
    if "RescaleSlope" in source and "RescaleIntercept" in source:
        out.RescaleSlope, out.RescaleIntercept = source.RescaleSlope, source.RescaleIntercept
    return out


def _decode_failure(exc: Exception, relpath: str) -> UnitError:
    text = str(exc)
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    if "less than expected" in text or "truncat" in text.lower():
        return UnitError("truncated", f"pixel data shorter than Rows×Columns×frames needs ({first})", relpath)
    if "12-bit precision" in text or "plugins are missing" in text:
        return UnitError("no-decoder", f"no installed plugin decodes this pixel data; {GPL_HINT}", relpath)
    return UnitError("decode-error", f"{type(exc).__name__}: {first}", relpath)
