"""Small synthetic DICOM / NIfTI files with known answers for the ingest tests."""

from __future__ import annotations

import copy
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

# Identifying values written into every synthetic file: the privacy tests grep outputs for them.
PHI = {
    "PatientName": "Quixote^Alonso",
    "PatientBirthDate": "19470311",
    "AccessionNumber": "ACC7781234",
    "InstitutionName": "Saint Zebulon Infirmary",
    "ReferringPhysicianName": "Sancho^Panza",
}
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def base_dataset(
    modality: str = "CT",
    sop_class: str = CTImageStorage,
    patient_id: str = "MRN0001",
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> Dataset:
    """Patient, study, series and equipment modules with identifying values from PHI."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.Manufacturer = "ACME Imaging"
    ds.PatientID = patient_id
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    return ds


def set_pixels(
    ds: Dataset, stored: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None
) -> None:
    """Native pixel data for a 2D (rows, cols) or multi-frame (frames, rows, cols) integer array."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if stored.dtype.kind == "i" else 0
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()


def save(ds: Dataset, path: Path, transfer_syntax: str | None = None) -> Path:
    """Write `ds` as a DICOM file; RLE Lossless is encoded by pydicom itself, others set the encoding."""
    ds.SOPInstanceUID = ds.get("SOPInstanceUID") or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if transfer_syntax == RLELossless:
        ds.compress(RLELossless)
    elif transfer_syntax:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_series(
    folder: Path,
    *,
    n: int = 4,
    rows: int = 5,
    cols: int = 6,
    spacing: tuple[float, float] = (0.5, 0.8),
    positions: list[float] | None = None,
    iop: tuple[float, ...] = AXIAL,
    origin: tuple[float, float, float] = (-10.0, -20.0, 30.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    thickness: list[float] | float = 2.0,
    seed: int = 0,
    patient_id: str = "MRN0001",
    series_uid: str | None = None,
    study_uid: str | None = None,
    transfer_syntax: str | None = None,
    acquisition: int = 1,
    modality: str = "CT",
    name: str = "ct",
    tilt: float = 0.0,
) -> tuple[list[Path], np.ndarray]:
    """A series of single-frame slices written in shuffled order under shuffled file names.

    Slice k lies at origin + positions[k] * (normal + tilt * column direction) (tilt ≠ 0: a gantry
    tilt, the stack is sheared). Instance numbers and file names follow a
    random permutation, so only the positions tell the order.

    Returns:
        (paths in slice order, expected values (n, rows, cols) = stored * slope + intercept).
    """
    rng = np.random.default_rng(seed)
    positions = positions if positions is not None else [2.0 * k for k in range(n)]
    n = len(positions)
    stored = rng.integers(0, 3000, size=(n, rows, cols)).astype(np.int16)
    normal = np.cross(iop[:3], iop[3:])
    series_uid, study_uid = series_uid or generate_uid(), study_uid or generate_uid()
    thick = thickness if isinstance(thickness, list) else [thickness] * n
    order = rng.permutation(n)
    paths: list[Path] = [Path()] * n
    for rank, k in enumerate(order):
        ds = base_dataset(modality, CTImageStorage, patient_id, study_uid, series_uid)
        ds.ImageOrientationPatient = list(iop)
        offset = positions[k] * (normal + tilt * np.asarray(iop[3:]))
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + offset]
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = thick[k]
        ds.InstanceNumber = int(rank + 1)
        ds.AcquisitionNumber = acquisition
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        set_pixels(ds, stored[k])
        paths[k] = save(ds, folder / f"{name}-{rng.integers(1_000_000):06d}-{rank}.dcm", transfer_syntax)
    return paths, stored.astype(np.float64) * slope + intercept


def cr_image(
    path: Path,
    *,
    rows: int = 7,
    cols: int = 5,
    spacing: tuple[float, float] = (0.2, 0.3),
    mono1: bool = True,
    bits_stored: int = 12,
    slope: float | None = None,
    intercept: float = 0.0,
    patient_id: str = "MRN0002",
    seed: int = 1,
    imager_spacing: bool = False,
) -> np.ndarray:
    """A 2D radiograph (no patient geometry). Returns the stored values (rows, cols)."""
    stored = np.random.default_rng(seed).integers(0, 2**bits_stored, size=(rows, cols)).astype(np.uint16)
    ds = base_dataset("CR", ComputedRadiographyImageStorage, patient_id)
    if imager_spacing:
        ds.ImagerPixelSpacing = list(spacing)
    else:
        ds.PixelSpacing = list(spacing)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    set_pixels(ds, stored, photometric="MONOCHROME1" if mono1 else "MONOCHROME2", bits_stored=bits_stored)
    save(ds, path)
    return stored


def enhanced(
    path: Path,
    z_positions: list[float],
    *,
    slope: float = 2.0,
    intercept: float = -5.0,
    spacing: tuple[float, float] = (0.5, 0.6),
    seed: int = 2,
) -> np.ndarray:
    """An enhanced (functional groups) axial multi-frame file, frames stored in the given z order.

    Returns:
        The expected values per stored frame (frames, rows, cols) = stored * slope + intercept.
    """
    stored = np.random.default_rng(seed).integers(0, 1000, size=(len(z_positions), 4, 3)).astype(np.uint16)
    ds = base_dataset("MR", "1.2.840.10008.5.1.4.1.1.4.1")  # Enhanced MR Image Storage
    shared = Dataset()
    orientation, measures, transform = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = list(AXIAL)
    measures.PixelSpacing, measures.SliceThickness = list(spacing), 1.0
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, intercept, "US"
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for z in z_positions:
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, float(z)]
        item.PlanePositionSequence = [position]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    set_pixels(ds, stored)
    save(ds, path)
    return stored.astype(np.float64) * slope + intercept


def encapsulated(path: Path, transfer_syntax: str, payload: bytes = b"\x00\x01" * 50) -> Path:
    """A CT slice whose (fake) compressed pixel data uses `transfer_syntax`."""
    ds = base_dataset()
    ds.ImageOrientationPatient, ds.ImagePositionPatient, ds.PixelSpacing = list(AXIAL), [0.0, 0.0, 0.0], [1.0, 1.0]
    set_pixels(ds, np.zeros((4, 4), np.int16))
    ds.PixelData = encapsulate([payload])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Save `data` with `affine` (NIfTI-1; .nii or .nii.gz by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header["descrip"] = PHI["PatientName"].encode()  # must not survive ingest
    nib.save(img, str(path))
    return path


def world_to_voxel(affine: np.ndarray, lps: np.ndarray) -> tuple[int, ...]:
    """The voxel of a RAS-affine image that holds the LPS point `lps`."""
    ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
    return tuple(int(v) for v in np.rint(np.linalg.solve(affine, ras)[:3]))


# ------------------------------------------------------------------------------------ hostile files


def ct_slice(patient_id: str = "MRN0001", shape: tuple[int, int] = (4, 4), z: float = 0.0, seed: int = 3) -> Dataset:
    """One small axial CT slice (int16 values 0..999) with geometry, ready for `save`."""
    ds = base_dataset(patient_id=patient_id)
    ds.ImageOrientationPatient, ds.ImagePositionPatient, ds.PixelSpacing = list(AXIAL), [0.0, 0.0, z], [1.0, 1.0]
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, 0.0
    set_pixels(ds, np.random.default_rng(seed).integers(0, 1000, size=shape).astype(np.int16))
    return ds


def rle_bomb(path: Path, rows: int = 65535, cols: int = 65535) -> Path:
    """A few hundred bytes of RLE Lossless data (a 4×4 slice) under a header declaring rows × cols pixels.

    pydicom's RLE decoder allocates rows × cols × 2 bytes before finding out the data is too short.
    """
    ds = ct_slice()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.compress(RLELossless)
    ds.Rows, ds.Columns = rows, cols
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def deflated(
    path: Path,
    ds: Dataset,
    *,
    extra_zero_bytes: int = 0,
    trailer_zero_bytes: int = 0,
    declared: tuple[int, int] | None = None,
) -> Path:
    """`ds` written with Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99), streamed.

    Args:
        path: The file to write.
        ds: A dataset with native PixelData.
        extra_zero_bytes: Zero bytes appended to the PixelData value (its length grows with them): a
            deflate bomb that inflates far past what Rows × Columns declare, in ~1 KB per MiB.
        trailer_zero_bytes: Size of a Data Set Trailing Padding element (FFFC,FFFC) after the pixel
            data: a bomb whose header and pixel data are consistent.
        declared: (Rows, Columns) to write instead of the real ones.
    """
    pixels = bytes(ds.PixelData)
    head = copy.deepcopy(ds)
    del head.PixelData
    if declared:
        head.Rows, head.Columns = declared
    head.SOPInstanceUID = ds.get("SOPInstanceUID") or generate_uid()
    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.MediaStorageSOPInstanceUID = head.SOPInstanceUID
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, head)
    length = len(pixels) + extra_zero_bytes
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length + length % 2)
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [out.getvalue(), z.compress(body.getvalue() + element + pixels), z.flush(zlib.Z_FULL_FLUSH)]
    chunks += _zeros(z, extra_zero_bytes + length % 2)
    if trailer_zero_bytes:
        chunks += [z.compress(struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, trailer_zero_bytes))]
        chunks += _zeros(z, trailer_zero_bytes)
    chunks.append(z.flush())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.writelines(chunks)
    return path


def _zeros(z: zlib._Compress, n: int) -> list[bytes]:
    """`n` zero bytes through compressor `z`, ~1 KB per MiB: after a full flush the same input
    deflates to the same bytes, so one MiB is deflated once and its output repeated."""
    mib, rest = divmod(n, 1 << 20)
    chunks = [z.flush(zlib.Z_FULL_FLUSH)]
    if mib:
        chunks += [z.compress(bytes(1 << 20)) + z.flush(zlib.Z_FULL_FLUSH)] * mib
    return [*chunks, z.compress(bytes(rest))]
