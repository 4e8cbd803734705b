"""Realistic synthetic DICOM cohorts (chest X-ray 2D, chest CT 3D) with a known answer."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

from pipeline.errors import ConfigError, did_you_mean
from pipeline.io import atomic_path, write_text

KINDS = ("cxr2d", "ct3d")

# site -> (manufacturer, X-ray model, CT model, institution, CXR pixel spacing (mm),
#          CXR rows x columns, CT kernels (sharp, soft))
_SITES: dict[str, tuple[str, str, str, str, str, tuple[int, int], tuple[str, str]]] = {
    "site-A": (
        "GE MEDICAL SYSTEMS",
        "Definium 6000",
        "Revolution CT",
        "NORTHGATE GENERAL HOSPITAL",
        "1.4",
        (256, 256),
        ("LUNG", "STANDARD"),
    ),
    "site-B": (
        "SIEMENS",
        "Ysio Max",
        "SOMATOM Definition AS",
        "ST. MARY UNIVERSITY CLINIC",
        "1.39",
        (256, 256),
        ("B70f", "B30f"),
    ),
    "site-C": ("Philips", "PCR Eleva S", "Ingenuity CT", "RIVERSIDE MEDICAL CENTRE", "1.43", (256, 240), ("YC", "B")),
}
_SITE_P = (0.4, 0.35, 0.25)
_SURNAMES = (
    "KOWALSKI NOWAK SMITH GARCIA MULLER ROSSI DUBOIS JANSSEN SILVA OKAFOR TANAKA NGUYEN "
    "PATEL COHEN HANSEN LINDQVIST MURPHY SCHMIDT FISCHER BERNARD KOVACS NOVAK IVANOV "
    "HASSAN OLSEN MORENO BROWN WILSON YILMAZ PETERS"
).split()
_GIVEN = {
    "F": "ANNA MARIA SOPHIE EMMA JULIA LAURA ELENA SARAH HANNA CLARA NADIA AMARA".split(),
    "M": "JAN PIOTR LUCAS DAVID MARCO THOMAS AHMED KENJI ERIK PAUL MATEO OMAR".split(),
}
_MONO1_FRACTION = 0.15  # share of radiographs stored MONOCHROME1 (inverted)
# CXR opacity: peak attenuation added in the lung (lung field ~0.2, soft tissue ~0.5) and radius
# in units of the thorax scale. Tuned so an ImageNet linear probe reaches AUROC ~0.85-0.9.
_CXR_OPACITY = (0.18, 0.31)
_CXR_RADIUS = (0.05, 0.10)
_CXR_FIXED = {
    "ImageType": ["ORIGINAL", "PRIMARY"],
    "ViewPosition": "PA",
    "PatientOrientation": ["L", "F"],
    "BitsStored": 12,
    "HighBit": 11,
    "PixelRepresentation": 0,
    "RescaleIntercept": "0",
    "RescaleType": "US",
    "WindowCenter": "2048",
    "WindowWidth": "4096",
}
_CT_FIXED = {
    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
    "KVP": "120",
    "PatientPosition": "HFS",
    "SliceThickness": "2.5",
    "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"],
    "PhotometricInterpretation": "MONOCHROME2",
    "Rows": 64,
    "Columns": 64,
    "BitsStored": 16,
    "HighBit": 15,
    "PixelRepresentation": 1,
    "RescaleIntercept": "-1024",
    "RescaleType": "HU",
}
_Job = tuple[Dataset, dict[str, Any]]  # a series' shared header + one file's own elements


@dataclass
class SyntheticCohort:
    """A generated cohort: DICOM files under `archive_dir`, ground truth in `labels_csv`."""

    root: Path
    archive_dir: Path
    labels_csv: Path
    kind: str
    n_patients: int
    n_positive: int
    n_files: int


@dataclass
class _Patient:
    index: int
    patient_id: str
    name: str
    sex: str
    age: int
    birth: date
    study_date: date
    site: str
    label: int
    accession: str
    rng: np.random.Generator


def make_cohort(
    out_dir: str | Path,
    kind: str = "cxr2d",
    n: int = 200,
    seed: int = 0,
    positive_fraction: float = 0.3,
    progress: bool = False,
) -> SyntheticCohort:
    """Write a synthetic DICOM cohort and its labels; the same seed gives the same bytes.

    Args:
        out_dir: Output folder; receives ``archive/`` (DICOM files in hex-named nested folders),
            ``labels.csv`` (``patient_id,label,sex,age,site``) and ``synthetic.json``.
        kind: ``"cxr2d"`` (DX/CR chest radiographs; positives carry a faint round opacity) or
            ``"ct3d"`` (two CT series per study in HU; positives carry a small solid nodule).
        n: Number of patients (one study each), at least 4.
        seed: Seed of every random choice, UIDs included.
        positive_fraction: Fraction of positive patients, strictly between 0 and 1.
        progress: Show a progress bar.

    Returns:
        The cohort's paths and counts.

    Raises:
        ConfigError: Unknown kind, n < 4, positive_fraction outside (0, 1), or an existing
            ``archive/`` in `out_dir` that this function did not write.
    """
    _check_args(kind, n, positive_fraction)
    root = Path(out_dir)
    archive, marker = root / "archive", root / "synthetic.json"
    if archive.exists() and not marker.exists():
        raise ConfigError(
            f"{archive} already exists and was not written by `medxfer synth`; "
            "refusing to overwrite it. Fix: choose an empty --out folder."
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".archive.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    token = rng.bytes(16).hex()
    patients = _make_patients(rng, n, positive_fraction, seed)
    layout = _Layout(tmp, rng, n)
    study_fn = _cxr_study if kind == "cxr2d" else _ct_study
    for p in tqdm(patients, desc=f"synth {kind}", unit="patient", disable=not progress):
        layout.write_study(study_fn(p, token), p.rng)
    shutil.rmtree(archive, ignore_errors=True)
    os.replace(tmp, archive)
    labels = root / "labels.csv"
    _write_labels(labels, patients)
    n_pos = sum(p.label for p in patients)
    info = {
        "kind": kind,
        "n_patients": n,
        "n_positive": n_pos,
        "n_files": layout.n_files,
        "seed": seed,
        "positive_fraction": positive_fraction,
    }
    write_text(marker, json.dumps(info, indent=2) + "\n")
    return SyntheticCohort(root, archive, labels, kind, n, n_pos, layout.n_files)


def _check_args(kind: str, n: int, positive_fraction: float) -> None:
    if kind not in KINDS:
        raise ConfigError(
            f"unknown synthetic kind {kind!r}{did_you_mean(kind, KINDS)}; "
            f"expected one of {', '.join(KINDS)}. Fix: pass --kind cxr2d or ct3d."
        )
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 4:
        raise ConfigError(
            f"synthetic cohort size n={n!r} is invalid; expected an integer >= 4 "
            "so both labels appear in every split. Fix: pass --n 4 or more."
        )
    if not isinstance(positive_fraction, int | float) or not 0.0 < positive_fraction < 1.0:
        raise ConfigError(
            f"positive_fraction={positive_fraction!r} is outside (0, 1); expected "
            "e.g. 0.3. Fix: choose a fraction strictly between 0 and 1."
        )


def _make_patients(rng: np.random.Generator, n: int, fraction: float, seed: int) -> list[_Patient]:
    n_pos = min(max(round(fraction * n), 1), n - 1)
    labels = rng.permutation(np.r_[np.ones(n_pos, int), np.zeros(n - n_pos, int)])
    mrns = rng.choice(9_000_000, size=n, replace=False) + 1_000_000
    children = np.random.SeedSequence([seed, 7919]).spawn(n)
    out = []
    for i in range(n):
        sex = "F" if rng.random() < 0.5 else "M"
        age = int(rng.integers(22, 91))
        study = date(2018, 1, 1) + timedelta(days=int(rng.integers(0, 6 * 365)))
        birth = study - timedelta(days=age * 365 + int(rng.integers(1, 360)))
        site = str(rng.choice(list(_SITES), p=_SITE_P))
        name = f"{rng.choice(_SURNAMES)}^{rng.choice(_GIVEN[sex])}"
        acc = f"{site[-1]}{study.year}{int(rng.integers(0, 10**6)):06d}"
        out.append(
            _Patient(
                i,
                f"MRN{int(mrns[i])}",
                name,
                sex,
                age,
                birth,
                study,
                site,
                int(labels[i]),
                acc,
                np.random.default_rng(children[i]),
            )
        )
    return out


def _write_labels(path: Path, patients: list[_Patient]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["patient_id", "label", "sex", "age", "site"])
        for p in patients:
            w.writerow([p.patient_id, p.label, p.sex, p.age, p.site])


class _Layout:
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

    def write_study(self, jobs: list[_Job], rng: np.random.Generator) -> None:
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


def _set(ds: Dataset, values: dict[str, Any]) -> None:
    for keyword, value in values.items():
        setattr(ds, keyword, value)


def _uid(token: str, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=[token, *map(str, parts)]))


def _header(p: _Patient, token: str, sop_class: UID, modality: str, model: str) -> Dataset:
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
    ds.Manufacturer, ds.InstitutionName = _SITES[p.site][0], _SITES[p.site][3]
    ds.ManufacturerModelName, ds.ReferringPhysicianName = model, ""
    ds.StudyDescription = ds.BodyPartExamined = "CHEST"
    ds.PatientName, ds.PatientID = p.name, p.patient_id
    ds.PatientBirthDate = p.birth.strftime("%Y%m%d")
    ds.PatientSex, ds.PatientAge = p.sex, f"{p.age:03d}Y"
    ds.StudyInstanceUID = _uid(token, "study", p.index)
    ds.StudyID = str(p.index + 1)
    ds.SamplesPerPixel, ds.BitsAllocated, ds.RescaleSlope = 1, 16, "1"
    return ds


# ---------------------------------------------------------------- chest X-ray (2D)


def _cxr_study(p: _Patient, token: str) -> list[_Job]:
    """One study of one or two PA exposures; every exposure of a positive shows the opacity."""
    rng = p.rng
    _, model, _, _, spacing, shape, _ = _SITES[p.site]
    cr = p.site == "site-C"  # a CR plate reader at one site, flat-panel DX elsewhere
    sop = ComputedRadiographyImageStorage if cr else DigitalXRayImageStorageForPresentation
    anat, finding = _cxr_anatomy(rng, p), _cxr_finding(rng) if p.label else None
    jobs = []
    for s in range(1 if rng.random() < 0.6 else 2):
        img = _chest_image(rng, anat, finding, shape)
        mono1 = rng.random() < _MONO1_FRACTION
        ds = _header(p, token, sop, "CR" if cr else "DX", model)
        ds.SeriesInstanceUID = _uid(token, "series", p.index, s)
        ds.SeriesNumber, ds.InstanceNumber = s + 1, 1
        ds.SeriesDescription = "PA" if s == 0 else "PA REPEAT"
        _set(ds, _CXR_FIXED if cr else {**_CXR_FIXED, "PresentationIntentType": "FOR PRESENTATION"})
        ds.ImagerPixelSpacing = ds.PixelSpacing = [spacing, spacing]
        ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
        ds.Rows, ds.Columns = shape
        pixels = (4095 - img if mono1 else img).astype("<u2").tobytes()
        jobs.append((ds, {"SOPInstanceUID": _uid(token, "sop", p.index, s), "PixelData": pixels}))
    return jobs


def _cxr_anatomy(rng: np.random.Generator, p: _Patient) -> dict[str, float]:
    u = rng.uniform
    return {
        "s": u(0.84, 0.98) + (0.05 if p.sex == "M" else 0.0),
        "cx": u(-0.06, 0.06),
        "cy": u(-0.05, 0.07),
        "lw": u(0.9, 1.1),
        "lh": u(0.88, 1.08),
        "hw": u(0.85, 1.25),
        "dome": u(-0.04, 0.06),
        "rib0": u(-0.05, 0.05),
        "gap": u(0.115, 0.135),
        "gain": u(2500, 3500),
        "off": u(150, 450),
        "gamma": u(0.85, 1.15),
        "noise": u(15, 45),
        "mark": u(0.35, 0.7),
        "tilt": u(-0.05, 0.05),
    }


def _cxr_finding(rng: np.random.Generator) -> dict[str, float]:
    side = 1.0 if rng.random() < 0.5 else -1.0
    return {
        "side": side,
        "du": rng.uniform(-0.1 if side > 0 else -0.5, 0.5),
        "dv": rng.uniform(-0.6, 0.3),
        "r": rng.uniform(*_CXR_RADIUS),
        "c": rng.uniform(*_CXR_OPACITY),
    }


def _ramp(v: np.ndarray, width: float) -> np.ndarray:
    return np.clip(v / width + 0.5, 0.0, 1.0)


def _chest_image(
    rng: np.random.Generator, a: dict[str, float], finding: dict[str, float] | None, shape: tuple[int, int]
) -> np.ndarray:
    """12-bit MONOCHROME2 chest radiograph (bright = attenuating) with per-exposure jitter."""
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    s = a["s"]
    x = (xx - cols / 2) / 128 - a["cx"] - rng.normal(0, 0.015)
    y = (yy - rows / 2) / 128 - a["cy"] - rng.normal(0, 0.015)
    x, y = x + a["tilt"] * y, y - a["tilt"] * x
    ax = np.abs(x)
    top = np.clip((-0.5 * s - y) / (0.5 * s), 0, 1)
    body = _ramp(0.22 * s + 0.68 * s * np.sqrt(1 - top**2) - ax, 0.05)
    lungs = np.zeros_like(x)
    for side in (-1.0, 1.0):
        ux, uy = _lung_coords(x, y, s, a, side)
        dome = 0.62 + a["dome"] + 0.06 * side + 0.35 * ux**2
        lungs = np.maximum(
            lungs, _ramp(1 - ux**2 - uy**2, 0.25) * _ramp(dome - uy, 0.06) * _ramp(side * x - 0.07 * s, 0.04)
        )
    heart = _ramp(1 - ((x - 0.12 * s) / (0.3 * s * a["hw"])) ** 2 - ((y - 0.3 * s) / (0.25 * s)) ** 2, 0.3)
    lungs *= 1 - 0.6 * heart
    thorax = _ramp(1 - (x / (0.8 * s)) ** 2 - ((y + 0.05 * s) / (0.72 * s)) ** 2, 0.1)
    below = _ramp(y - 0.45 * s - a["dome"] * 0.56 * s - 0.2 * ax**2 / s, 0.06)
    t = (y + 0.6 * s - a["rib0"] - 0.3 * s * ((ax - 0.06 * s) / (0.75 * s)) ** 2) / (a["gap"] * s)
    ribs = ((1 + np.cos(2 * np.pi * t)) / 2) ** 4 * thorax * (ax > 0.06 * s)
    clav = np.exp(-(((y + 0.66 * s - 0.22 * (ax - 0.06 * s)) / (0.025 * s)) ** 2)) * (ax < 0.5 * s)
    hil = np.exp(-(((ax - 0.15 * s) / (0.35 * s)) ** 2 + ((y + 0.05 * s) / (0.4 * s)) ** 2))
    marks = gaussian_filter(rng.standard_normal(x.shape).astype(np.float32), 2.0) * 1.3
    att = (
        0.5 * body
        + 0.2 * _ramp(0.1 * s - ax, 0.05)
        + 0.03 * _ramp(0.045 * s - ax, 0.015)
        + 0.22 * heart
        + 0.15 * below * body
        - lungs * (0.3 - 0.05 * hil - a["mark"] * marks * (0.2 + 0.4 * hil))
        + 0.08 * ribs * body
        + 0.1 * clav * body
    )
    if finding is not None:
        ux, uy = _lung_coords(x, y, s, a, finding["side"])
        d = np.hypot((ux - finding["du"]) * 0.3 * a["lw"], (uy - finding["dv"]) * 0.62 * a["lh"])
        blob = finding["c"] / (1 + np.exp(np.clip((d / finding["r"] - 1) * 6, -30, 30)))
        att += blob * np.clip(2 * lungs, 0, 1)
    att = gaussian_filter(np.clip(att, 0, None), 0.8)
    v = a["off"] + a["gain"] * att ** a["gamma"] * rng.uniform(0.95, 1.05)
    v += rng.standard_normal(v.shape) * a["noise"] * np.sqrt(v / 2000 + 0.05)
    return np.clip(np.rint(v), 0, 4095).astype(np.uint16)


def _lung_coords(
    x: np.ndarray, y: np.ndarray, s: float, a: dict[str, float], side: float
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in units of one lung's half-axes; positive ux is lateral."""
    return ((side * x - 0.4 * s * a["lw"]) / (0.3 * s * a["lw"]), (y + 0.1 * s) / (0.62 * s * a["lh"]))


# ---------------------------------------------------------------- chest CT (3D)


def _ct_study(p: _Patient, token: str) -> list[_Job]:
    """Two series (sharp and soft kernel) of one acquisition; InstanceNumber order varies."""
    rng = p.rng
    nz, ps = int(rng.integers(24, 41)), round(float(rng.uniform(0.6, 0.8)), 3)
    hu = _ct_phantom(rng, nz, ps, p)
    z0 = float(rng.uniform(-180, -120))
    x0, y0 = -31.5 * ps + rng.uniform(-3, 3), -31.5 * ps + rng.uniform(-3, 3)
    frame = _uid(token, "frame", p.index)
    jobs = []
    for s, (kernel, desc) in enumerate(zip(_SITES[p.site][6], ("LUNG", "STANDARD"), strict=True)):
        reverse = rng.random() < 0.5 if p.index else s == 1  # patient 0 always has both orders
        ds = _header(p, token, CTImageStorage, "CT", _SITES[p.site][2])
        ds.SeriesInstanceUID = _uid(token, "series", p.index, s)
        ds.FrameOfReferenceUID = frame
        ds.SeriesNumber, ds.AcquisitionNumber = s + 2, 1
        ds.SeriesDescription = f"CHEST 2.5mm {desc}"
        _set(ds, _CT_FIXED)
        ds.ConvolutionKernel, ds.PixelSpacing = kernel, [str(ps), str(ps)]
        ds.WindowCenter, ds.WindowWidth = ("-600", "1500") if s == 0 else ("40", "400")
        vol = _ct_kernel(rng, hu, sharp=s == 0)
        stored = np.clip(np.rint(vol) + 1024, -1024, 4095).astype("<i2")
        for k in range(nz):
            z = f"{z0 + 2.5 * k:.2f}"
            jobs.append(
                (
                    ds,
                    {
                        "SOPInstanceUID": _uid(token, "sop", p.index, s, k),
                        "InstanceNumber": nz - k if reverse else k + 1,
                        "ImagePositionPatient": [f"{x0:.3f}", f"{y0:.3f}", z],
                        "SliceLocation": z,
                        "PixelData": stored[k].tobytes(),
                    },
                )
            )
    return jobs


def _ct_phantom(rng: np.random.Generator, nz: int, ps: float, p: _Patient) -> np.ndarray:
    """Noise-free HU volume (z, y, x): z inferior->superior, rows anterior->posterior."""
    u = rng.uniform
    y, x = (np.mgrid[0:64, 0:64].astype(np.float32) - 31.5) / 31.5
    w = ((np.arange(nz, dtype=np.float32) - (nz - 1) / 2) / (nz / 2))[:, None, None]
    a, b = u(0.82, 0.94) + (0.04 if p.sex == "M" else 0), u(0.6, 0.72)
    body_q = (x / a) ** 2 + (y / b) ** 2
    plane = np.where(body_q < 0.8, u(15, 35), np.where(body_q < 1, -90.0, -1000.0))
    hu = np.repeat(plane[None].astype(np.float32), nz, axis=0)
    taper = np.sqrt(np.clip(1 - (0.75 * w) ** 2, 0, None)) * (1 - 0.15 * np.clip(-w, 0, None))
    lung = np.zeros(hu.shape, bool)
    for side in (-1, 1):
        lq = ((x - side * 0.45 * a) / (0.32 * a * taper)) ** 2 + ((y + 0.05) / (0.7 * b)) ** 2
        lung |= lq < 1
    heart_q = ((x - 0.1 * a) / (0.3 * a)) ** 2 + ((y + 0.3 * b) / (0.4 * b)) ** 2
    heart = heart_q < 1 - 0.3 * w
    lung &= ~heart & (np.abs(x) > 0.12 * a)
    hu[lung] = -850.0 + u(-30, 30)
    hu[heart] = 40.0
    spine_q = (x / (0.15 * b)) ** 2 + ((y - 0.7 * b) / (0.15 * b)) ** 2
    hu[:, spine_q < 1] = 350.0  # vertebral body: cancellous core, cortical rim
    hu[:, (spine_q < 1) & (spine_q > 0.5)] = 950.0
    hu[:, ((x + 0.12 * a) ** 2 + (y - 0.3 * b) ** 2 < (0.09 * b) ** 2) & (body_q < 0.8)] = 45.0
    shell = (body_q > 0.82) & (body_q < 0.93)  # ribs: bone spots that slide around with z
    ang = np.arctan2(y[shell] / b, x[shell] / a)[None, :] - 0.25 * w[:, :, 0]
    rib = np.zeros(ang.shape, bool)
    for theta in np.r_[np.linspace(-1.2, 1.2, 5), np.linspace(np.pi - 1.2, np.pi + 1.2, 5)]:
        rib |= np.abs((ang - theta + np.pi) % (2 * np.pi) - np.pi) < 0.1
    hu[:, shell] = np.where(rib, 650.0, hu[:, shell])
    _vessels(rng, hu, lung, ps)
    if p.label:
        _nodule(rng, hu, lung, ps)
    return hu


def _vessels(rng: np.random.Generator, hu: np.ndarray, lung: np.ndarray, ps: float) -> None:
    """Tubular vessels (~35 HU, partial volume) running from each hilum out into the lung."""
    idx = np.argwhere(lung)
    pts = idx * np.array([2.5, ps, ps], np.float32)
    vals = hu[lung]
    for _ in range(14):
        end = pts[rng.integers(len(pts))]
        start = np.array([hu.shape[0] * 1.25, 30 * ps, (32 + np.sign(end[2] / ps - 32) * 8) * ps])
        d = end - start
        t = np.clip((pts - start) @ d / float(d @ d), 0, 1)
        dist = np.linalg.norm(pts - start - t[:, None] * d, axis=1)
        frac = np.clip((rng.uniform(0.5, 1.1) - dist) / ps + 0.5, 0, 1)
        vals = np.maximum(vals, vals + frac * (35.0 - vals))
    hu[lung] = vals


def _nodule(rng: np.random.Generator, hu: np.ndarray, lung: np.ndarray, ps: float) -> None:
    """A solid 4-8 mm nodule of 20-60 HU centred in the lung, away from its edge."""
    radius = rng.uniform(2.0, 4.0)
    m = int(np.ceil(radius / ps)) + 1
    inner = lung & np.roll(lung, m, 2) & np.roll(lung, -m, 2) & np.roll(lung, m, 1)
    inner &= np.roll(lung, -m, 1)
    inner[[0, -1]] = False
    cands = np.argwhere(inner)
    c = cands[rng.integers(len(cands))] if len(cands) else np.argwhere(lung)[0]
    zz, yy, xx = np.ogrid[0 : hu.shape[0], 0:64, 0:64]
    dist = np.sqrt(((zz - c[0]) * 2.5) ** 2 + ((yy - c[1]) * ps) ** 2 + ((xx - c[2]) * ps) ** 2)
    frac = np.clip(radius - dist + 0.5, 0, 1)
    hu += frac * (rng.uniform(20, 60) - hu)


def _ct_kernel(rng: np.random.Generator, hu: np.ndarray, sharp: bool) -> np.ndarray:
    """Reconstruction-kernel look: sharp = edge-enhanced, noisier; soft = blurred, quieter."""
    blur = gaussian_filter(hu, (0, 0.8, 0.8))
    noise = gaussian_filter(rng.standard_normal(hu.shape, np.float32), (0, 0.6, 0.6))
    if sharp:
        return hu + 0.4 * (hu - blur) + noise * 45.0
    return blur + noise * 18.0
