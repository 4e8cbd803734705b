"""DICOM files of a synthetic study: the shared header, UIDs, and a fast writer byte-identical to dcmwrite."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from pipeline.synthetic.patients import SITES, Patient

Job = tuple[Dataset, dict[str, Any]]  # a series' shared header + one file's own elements


class Layout:
    """Hex-named folders two levels deep; a study's files spread over the leaves of one top.

    Files come out byte-identical to pydicom's ``dcmwrite(..., enforce_file_format=True)``
    (preamble, file meta with group length, explicit VR little endian), but the elements shared
    by a series are encoded once, which makes writing thousands of slices several times faster.
    """

    def __init__(self, root: Path, rng: np.random.Generator, n: int) -> None:
        self.rng, self.names, self.n_files = rng, set[str](), 0
        self.tops = []
        for _ in range(max(2, n // 8)):
            top = root / rng.bytes(3).hex()
            self.tops.append([top / rng.bytes(4).hex() for _ in range(int(rng.integers(2, 5)))])

    def write_study(self, jobs: list[Job], rng: np.random.Generator) -> None:
        leaves = self.tops[int(self.rng.integers(len(self.tops)))]
        shared: dict[int, tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]] = {}
        for i in rng.permutation(len(jobs)):
            ds, own = jobs[int(i)]
            if id(ds) not in shared:
                shared[id(ds)] = _encode_shared(ds)
            meta, body = shared[id(ds)]
            meta = sorted([*meta, (0x00020003, _raw(0x00020003, "UI", own["SOPInstanceUID"]))])
            meta_bytes = b"".join(b for _, b in meta)
            group = _raw(0x00020000, "UL", struct.pack("<I", len(meta_bytes)))
            body = sorted(body + [(t, _raw(t, vr, own[k])) for k, (t, vr) in _OWN.items() if k in own])
            data = b"".join([b"\0" * 128, b"DICM", group, meta_bytes, *(b for _, b in body)])
            self._file(leaves).write_bytes(data)
            self.n_files += 1

    def _file(self, leaves: list[Path]) -> Path:
        folder = leaves[int(self.rng.integers(len(leaves)))]
        name = self.rng.bytes(8).hex().upper()
        while name in self.names:
            name = self.rng.bytes(8).hex().upper()
        self.names.add(name)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / (name + (".dcm" if self.rng.random() < 0.6 else ""))


# Elements that differ between the files of a series: keyword -> (tag, VR)
_OWN = {
    "SOPInstanceUID": (0x00080018, "UI"),
    "InstanceNumber": (0x00200013, "IS"),
    "ImagePositionPatient": (0x00200032, "DS"),
    "SliceLocation": (0x00201041, "DS"),
    "PixelData": (0x7FE00010, "OW"),
}


def _encode_shared(ds: Dataset) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """Encode a series' file meta (minus group length and instance UID) and shared elements."""
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2")  # placeholder: set per file
    write_file_meta_info(DicomBytesIO(), ds.file_meta, enforce_standard=True)  # fills defaults
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    out: list[list[tuple[int, bytes]]] = [[], []]
    for k, dataset in enumerate((ds.file_meta, ds)):
        for elem in dataset:
            if int(elem.tag) not in (0x00020000, 0x00020003):
                start = fp.tell()
                write_data_element(fp, elem)
                out[k].append((int(elem.tag), bytes(fp.getvalue()[start:])))
    return out[0], out[1]


def _raw(tag: int, vr: str, value: Any) -> bytes:
    """Explicit VR little endian encoding of one element (text, numbers or bytes)."""
    if isinstance(value, bytes):
        data = value
    else:
        data = "\\".join(map(str, value if isinstance(value, list) else [value])).encode()
        data += (b"\0" if vr == "UI" else b" ") * (len(data) % 2)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in ("OB", "OW"):
        return head + struct.pack("<HI", 0, len(data)) + data
    return head + struct.pack("<H", len(data)) + data


def set_elements(ds: Dataset, values: dict[str, Any]) -> None:
    """Set DICOM elements by keyword."""
    for keyword, value in values.items():
        setattr(ds, keyword, value)


def make_uid(token: str, *parts: object) -> str:
    """A UID derived from the cohort token and `parts`: the same cohort seed gives the same UIDs."""
    return str(generate_uid(entropy_srcs=[token, *map(str, parts)]))


def study_header(p: Patient, token: str, sop_class: UID, modality: str, model: str) -> Dataset:
    """Patient/study/equipment modules shared by every file of a study."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = p.study_date.strftime("%Y%m%d")
    ds.StudyTime = f"{int(p.rng.integers(7, 19)):02d}{int(p.rng.integers(0, 60)):02d}00"
    ds.AccessionNumber, ds.Modality = p.accession, modality
    ds.Manufacturer, ds.InstitutionName = SITES[p.site][0], SITES[p.site][3]
    ds.ManufacturerModelName, ds.ReferringPhysicianName = model, ""
    ds.StudyDescription = ds.BodyPartExamined = "CHEST"
    ds.PatientName, ds.PatientID = p.name, p.patient_id
    ds.PatientBirthDate = p.birth.strftime("%Y%m%d")
    ds.PatientSex, ds.PatientAge = p.sex, f"{p.age:03d}Y"
    ds.StudyInstanceUID = make_uid(token, "study", p.index)
    ds.StudyID = str(p.index + 1)
    ds.SamplesPerPixel, ds.BitsAllocated, ds.RescaleSlope = 1, 16, "1"
    return ds
