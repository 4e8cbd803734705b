"""Realistic synthetic DICOM cohorts (chest X-ray 2D, chest CT 3D) with a known answer."""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)
from scipy.ndimage import gaussian_filter

from pipeline.errors import ConfigError, did_you_mean

KINDS = ("cxr2d", "ct3d")

# site -> (manufacturer, X-ray model, CT model, institution, CXR pixel spacing, CXR shape, CT kernels)
_SITES: dict[str, tuple[str, str, str, str, float, tuple[int, int], tuple[str, str]]] = {
    "site-A": ("GE MEDICAL SYSTEMS", "Definium 6000", "Revolution CT",
               "NORTHGATE GENERAL HOSPITAL", 1.40, (256, 256), ("LUNG", "STANDARD")),
    "site-B": ("SIEMENS", "Ysio Max", "SOMATOM Definition AS",
               "ST. MARY UNIVERSITY CLINIC", 1.39, (256, 256), ("B70f", "B30f")),
    "site-C": ("Philips", "PCR Eleva S", "Ingenuity CT",
               "RIVERSIDE MEDICAL CENTRE", 1.43, (256, 240), ("YC", "B")),
}
_SITE_P = (0.4, 0.35, 0.25)
_SURNAMES = ("KOWALSKI", "NOWAK", "SMITH", "GARCIA", "MULLER", "ROSSI", "DUBOIS", "JANSSEN",
             "SILVA", "OKAFOR", "TANAKA", "NGUYEN", "PATEL", "COHEN", "HANSEN", "LINDQVIST",
             "MURPHY", "SCHMIDT", "FISCHER", "BERNARD", "KOVACS", "NOVAK", "IVANOV", "HASSAN",
             "OLSEN", "MORENO", "BROWN", "WILSON", "YILMAZ", "PETERS")
_FIRST = {"F": ("ANNA", "MARIA", "SOPHIE", "EMMA", "JULIA", "LAURA", "ELENA", "SARAH", "HANNA",
                "CLARA", "NADIA", "YUKI", "AMARA", "INGRID", "CHLOE"),
          "M": ("JAN", "PIOTR", "LUCAS", "DAVID", "MARCO", "THOMAS", "AHMED", "KENJI", "ERIK",
                "PAUL", "MATEO", "OMAR", "LIAM", "FELIX", "HUGO")}
_MONO1_FRACTION = 0.15
# Faint CXR opacity: peak attenuation added inside the lung (lung field ~0.17, soft tissue ~0.55).
_CXR_OPACITY = (0.05, 0.11)
_CXR_RADIUS = (0.04, 0.09)  # in units of the patient's thorax scale (~0.9 of the image half-width)


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


def make_cohort(out_dir: str | Path, kind: str = "cxr2d", n: int = 200, seed: int = 0,
                positive_fraction: float = 0.3, progress: bool = False) -> SyntheticCohort:
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
        raise ConfigError(f"{archive} already exists and was not written by `medxfer synth`; "
                          "refusing to overwrite it. Fix: choose an empty --out folder.")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".archive.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    token = rng.bytes(16).hex()
    patients = _make_patients(rng, n, positive_fraction, seed)
    layout = _Layout(tmp, rng, n)
    series_fn = _cxr_study if kind == "cxr2d" else _ct_study
    n_files = 0
    for p in _progress(patients, progress, f"synth {kind}"):
        jobs, leaves = series_fn(p, token), layout.study_leaves()
        for i in p.rng.permutation(len(jobs)):
            layout.write(*jobs[i], leaves)
            n_files += 1
    shutil.rmtree(archive, ignore_errors=True)
    os.replace(tmp, archive)
    labels = root / "labels.csv"
    _write_labels(labels, patients)
    n_pos = sum(p.label for p in patients)
    info = {"kind": kind, "n_patients": n, "n_positive": n_pos, "n_files": n_files,
            "seed": seed, "positive_fraction": positive_fraction}
    marker.write_text(json.dumps(info, indent=2) + "\n")
    return SyntheticCohort(root, archive, labels, kind, n, n_pos, n_files)


def _check_args(kind: str, n: int, positive_fraction: float) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown synthetic kind {kind!r}{did_you_mean(kind, KINDS)}; "
                          f"expected one of {', '.join(KINDS)}. Fix: pass --kind cxr2d or ct3d.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 4:
        raise ConfigError(f"synthetic cohort size n={n!r} is too small; expected an integer >= 4 "
                          "so both labels appear in every split. Fix: pass --n 4 or more.")
    if not 0.0 < float(positive_fraction) < 1.0:
        raise ConfigError(f"positive_fraction={positive_fraction!r} is outside (0, 1); expected "
                          "e.g. 0.3. Fix: choose a fraction strictly between 0 and 1.")


def _progress(items: list[_Patient], show: bool, desc: str) -> Any:
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="patient")


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
        name = f"{rng.choice(_SURNAMES)}^{rng.choice(_FIRST[sex])}"
        acc = f"{site[-1]}{study.year}{int(rng.integers(0, 10**6)):06d}"
        out.append(_Patient(i, f"MRN{int(mrns[i])}", name, sex, age, birth, study, site,
                            int(labels[i]), acc, np.random.default_rng(children[i])))
    return out


def _write_labels(path: Path, patients: list[_Patient]) -> None:
    tmp = path.with_suffix(".csv.partial")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["patient_id", "label", "sex", "age", "site"])
        for p in patients:
            w.writerow([p.patient_id, p.label, p.sex, p.age, p.site])
    os.replace(tmp, path)


class _Layout:
    """Random hex folders two levels deep; a study's files spread over the leaves of one top."""

    def __init__(self, root: Path, rng: np.random.Generator, n: int) -> None:
        self.rng, self.names = rng, set[str]()
        self.tops = []
        for _ in range(max(2, n // 8)):
            top = root / rng.bytes(3).hex()
            self.tops.append([top / rng.bytes(4).hex() for _ in range(int(rng.integers(1, 5)))])

    def study_leaves(self) -> list[Path]:
        return self.tops[int(self.rng.integers(len(self.tops)))]

    def write(self, ds: Dataset, updates: dict[str, Any], leaves: list[Path]) -> None:
        for key, value in updates.items():
            setattr(ds, key, value)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        folder = leaves[int(self.rng.integers(len(leaves)))]
        name = self.rng.bytes(8).hex().upper()
        while name in self.names:
            name = self.rng.bytes(8).hex().upper()
        self.names.add(name)
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ".dcm" if self.rng.random() < 0.6 else ""
        dcmwrite(folder / f"{name}{suffix}", ds, enforce_file_format=True)


def _uid(token: str, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=[token, *map(str, parts)]))


def _header(p: _Patient, token: str, sop_class: str, modality: str, model: str) -> Dataset:
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
    ds.AccessionNumber = p.accession
    ds.Modality = modality
    ds.Manufacturer, ds.InstitutionName = _SITES[p.site][0], _SITES[p.site][3]
    ds.ManufacturerModelName = model
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CHEST"
    ds.PatientName, ds.PatientID = p.name, p.patient_id
    ds.PatientBirthDate = p.birth.strftime("%Y%m%d")
    ds.PatientSex, ds.PatientAge = p.sex, f"{p.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = _uid(token, "study", p.index)
    ds.StudyID = str(p.index + 1)
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.RescaleSlope = 1
    return ds


# ---------------------------------------------------------------- chest X-ray (2D)


def _cxr_study(p: _Patient, token: str) -> list[tuple[Dataset, dict[str, Any]]]:
    """One study of one or two PA exposures; every exposure of a positive shows the opacity."""
    rng = p.rng
    _, dx_model, _, _, spacing, shape, _ = _SITES[p.site]
    anat = _cxr_anatomy(rng, p)
    finding = _cxr_finding(rng) if p.label else None
    jobs = []
    n_series = 1 if rng.random() < 0.6 else 2
    for s in range(n_series):
        cr = p.site == "site-C"  # a CR plate reader at one site, flat-panel DX elsewhere
        sop, modality = ((ComputedRadiographyImageStorage, "CR") if cr
                         else (DigitalXRayImageStorageForPresentation, "DX"))
        ds = _header(p, token, sop, modality, dx_model)
        img = _chest_image(rng, anat, finding, shape)
        mono1 = rng.random() < _MONO1_FRACTION
        if mono1:
            img = 4095 - img
        ds.SeriesInstanceUID = _uid(token, "series", p.index, s)
        ds.SeriesNumber, ds.InstanceNumber = s + 1, 1
        ds.SeriesDescription = "PA" if s == 0 else "PA REPEAT"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ViewPosition, ds.PatientOrientation = "PA", ["L", "F"]
        if not cr:
            ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImagerPixelSpacing = ds.PixelSpacing = [spacing, spacing]
        ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
        ds.Rows, ds.Columns = shape
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.RescaleIntercept, ds.RescaleType = 0, "US"
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        updates = {"SOPInstanceUID": _uid(token, "sop", p.index, s, 0),
                   "PixelData": img.astype("<u2").tobytes()}
        jobs.append((ds, updates))
    return jobs


def _cxr_anatomy(rng: np.random.Generator, p: _Patient) -> dict[str, float]:
    u = rng.uniform
    return {"s": u(0.84, 0.98) + (0.05 if p.sex == "M" else 0.0), "cx": u(-0.06, 0.06),
            "cy": u(-0.05, 0.07), "lw": u(0.9, 1.1), "lh": u(0.88, 1.08), "hw": u(0.85, 1.25),
            "dome": u(-0.04, 0.06), "rib0": u(-0.05, 0.05), "gap": u(0.115, 0.135),
            "gain": u(2500, 3500), "off": u(150, 450), "gamma": u(0.85, 1.15),
            "noise": u(15, 45), "mark": u(0.35, 0.7), "tilt": u(-0.05, 0.05)}


def _cxr_finding(rng: np.random.Generator) -> dict[str, float]:
    side = 1.0 if rng.random() < 0.5 else -1.0
    return {"side": side, "du": rng.uniform(-0.1 if side > 0 else -0.5, 0.5),
            "dv": rng.uniform(-0.6, 0.3), "r": rng.uniform(*_CXR_RADIUS),
            "c": rng.uniform(*_CXR_OPACITY)}


def _ramp(v: np.ndarray, width: float) -> np.ndarray:
    return np.clip(v / width + 0.5, 0.0, 1.0)


def _chest_image(rng: np.random.Generator, a: dict[str, float], finding: dict[str, float] | None,
                 shape: tuple[int, int]) -> np.ndarray:
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
        lungs = np.maximum(lungs, _ramp(1 - ux**2 - uy**2, 0.25) * _ramp(dome - uy, 0.06)
                           * _ramp(side * x - 0.07 * s, 0.04))
    heart = _ramp(1 - ((x - 0.12 * s) / (0.3 * s * a["hw"])) ** 2
                  - ((y - 0.3 * s) / (0.25 * s)) ** 2, 0.3)
    lungs *= 1 - 0.6 * heart
    thorax = _ramp(1 - (x / (0.8 * s)) ** 2 - ((y + 0.05 * s) / (0.72 * s)) ** 2, 0.1)
    below = _ramp(y - 0.45 * s - a["dome"] * 0.56 * s - 0.2 * ax**2 / s, 0.06)
    t = (y + 0.6 * s - a["rib0"] - 0.3 * s * ((ax - 0.06 * s) / (0.75 * s)) ** 2) / (a["gap"] * s)
    ribs = ((1 + np.cos(2 * np.pi * t)) / 2) ** 4 * thorax * (ax > 0.06 * s)
    clav = np.exp(-(((y + 0.66 * s - 0.22 * (ax - 0.06 * s)) / (0.025 * s)) ** 2)) * (ax < 0.5 * s)
    hil = np.exp(-(((ax - 0.15 * s) / (0.35 * s)) ** 2 + ((y + 0.05 * s) / (0.4 * s)) ** 2))
    marks = gaussian_filter(rng.standard_normal(x.shape).astype(np.float32), 2.0) * 1.3
    att = (0.5 * body + 0.2 * _ramp(0.1 * s - ax, 0.05) + 0.03 * _ramp(0.045 * s - ax, 0.015)
           + 0.22 * heart + 0.15 * below * body
           - lungs * (0.3 - 0.05 * hil - a["mark"] * marks * (0.2 + 0.4 * hil))
           + 0.08 * ribs * body + 0.1 * clav * body)
    if finding is not None:
        ux, uy = _lung_coords(x, y, s, a, finding["side"])
        d = np.hypot((ux - finding["du"]) * 0.3 * a["lw"], (uy - finding["dv"]) * 0.62 * a["lh"])
        att += finding["c"] / (1 + np.exp(np.clip((d / finding["r"] - 1) * 6, -30, 30)))
    att = gaussian_filter(np.clip(att, 0, None), 0.8)
    v = a["off"] + a["gain"] * att ** a["gamma"] * rng.uniform(0.95, 1.05)
    v += rng.standard_normal(v.shape) * a["noise"] * np.sqrt(v / 2000 + 0.05)
    return np.clip(np.rint(v), 0, 4095).astype(np.uint16)


def _lung_coords(x: np.ndarray, y: np.ndarray, s: float, a: dict[str, float],
                 side: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in units of one lung's half-axes; positive ux is lateral."""
    return ((side * x - 0.4 * s * a["lw"]) / (0.3 * s * a["lw"]),
            (y + 0.1 * s) / (0.62 * s * a["lh"]))


# ---------------------------------------------------------------- chest CT (3D)


def _ct_study(p: _Patient, token: str) -> list[tuple[Dataset, dict[str, Any]]]:
    """Two series (sharp and soft kernel) of one acquisition; InstanceNumber order varies."""
    rng = p.rng
    nz, ps = int(rng.integers(24, 41)), round(float(rng.uniform(0.6, 0.8)), 3)
    hu = _ct_phantom(rng, nz, ps, p)
    z0 = round(float(rng.uniform(-180, -120)), 2)
    x0, y0 = -31.5 * ps + rng.uniform(-3, 3), -31.5 * ps + rng.uniform(-3, 3)
    frame = _uid(token, "frame", p.index)
    jobs = []
    for s, (kernel, desc) in enumerate(zip(_SITES[p.site][6], ("LUNG", "STANDARD"), strict=True)):
        reverse = rng.random() < 0.5 if p.index else s == 1
        vol = _ct_kernel(rng, hu, sharp=s == 0)
        ds = _header(p, token, CTImageStorage, "CT", _SITES[p.site][2])
        ds.SeriesInstanceUID = _uid(token, "series", p.index, s)
        ds.FrameOfReferenceUID = frame
        ds.SeriesNumber, ds.AcquisitionNumber = s + 2, 1
        ds.SeriesDescription = f"CHEST 2.5mm {desc}"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ConvolutionKernel, ds.KVP, ds.PatientPosition = kernel, 120, "HFS"
        ds.SliceThickness = 2.5
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [ps, ps]
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = 64
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
        ds.RescaleIntercept, ds.RescaleType = -1024, "HU"
        ds.WindowCenter, ds.WindowWidth = (-600, 1500) if s == 0 else (40, 400)
        stored = np.clip(np.rint(vol) + 1024, -2048, 4095).astype("<i2")
        for k in range(nz):
            z = round(z0 + 2.5 * k, 2)
            updates = {"SOPInstanceUID": _uid(token, "sop", p.index, s, k),
                       "InstanceNumber": nz - k if reverse else k + 1,
                       "ImagePositionPatient": [round(x0, 3), round(y0, 3), z],
                       "SliceLocation": z, "PixelData": stored[k].tobytes()}
            jobs.append((ds, updates))
    return jobs


def _ct_phantom(rng: np.random.Generator, nz: int, ps: float, p: _Patient) -> np.ndarray:
    """Noise-free HU volume (z, y, x), z inferior->superior, rows anterior->posterior."""
    u = rng.uniform
    half = 31.5 * ps
    zz, yy, xx = np.mgrid[0:nz, 0:64, 0:64].astype(np.float32)
    x, y = (xx - 31.5) / 31.5, (yy - 31.5) / 31.5
    w = (zz - (nz - 1) / 2) / (nz / 2)
    a, b = u(0.82, 0.94) + (0.04 if p.sex == "M" else 0), u(0.6, 0.72)
    body_q = (x / a) ** 2 + (y / b) ** 2
    hu = np.full(x.shape, -1000.0, np.float32)
    hu[body_q < 1] = -90.0
    hu[body_q < 0.8] = u(15, 35)
    taper = np.sqrt(np.clip(1 - (0.75 * w) ** 2, 0, None)) * (1 - 0.15 * np.clip(-w, 0, None))
    lung = np.zeros(x.shape, bool)
    for side in (-1, 1):
        lq = ((x - side * 0.45 * a) / (0.32 * a * taper + 1e-3)) ** 2 + ((y + 0.05) / (0.7 * b)) ** 2
        lung |= lq < 1
    heart_q = ((x - 0.1 * a) / (0.3 * a)) ** 2 + ((y + 0.3 * b) / (0.4 * b)) ** 2
    lung &= ~((heart_q < 1 - 0.3 * w) | (np.abs(x) < 0.12 * a))
    hu[lung] = -850.0 + u(-30, 30)
    hu[heart_q < 1 - 0.3 * w] = 40.0
    spine_q = (x / (0.15 * b)) ** 2 + ((y - 0.7 * b) / (0.15 * b)) ** 2
    hu[spine_q < 1] = 250.0
    hu[(spine_q < 1) & (spine_q > 0.55)] = 700.0
    aorta = (x + 0.12 * a) ** 2 + (y - 0.3 * b) ** 2 < (0.09 * b) ** 2
    hu[aorta & (body_q < 0.8)] = 45.0
    ang = np.arctan2(y / b, x / a)
    shell = (body_q > 0.82) & (body_q < 0.93)
    for theta in np.r_[np.linspace(-1.2, 1.2, 5), np.linspace(np.pi - 1.2, np.pi + 1.2, 5)]:
        da = np.angle(np.exp(1j * (ang - theta - 0.25 * w)))
        hu[shell & (np.abs(da) < 0.1)] = 650.0
    _vessels(rng, hu, lung, ps, half)
    if p.label:
        _nodule(rng, hu, lung, ps)
    return hu


def _vessels(rng: np.random.Generator, hu: np.ndarray, lung: np.ndarray, ps: float,
             half: float) -> None:
    """Tubular vessels (~30-45 HU, partial volume) from each hilum out into the lung."""
    pts = np.argwhere(lung)
    zmm = np.arange(hu.shape[0], dtype=np.float32)[:, None, None] * 2.5
    ymm = np.arange(64, dtype=np.float32)[None, :, None] * ps
    xmm = np.arange(64, dtype=np.float32)[None, None, :] * ps
    for _ in range(14):
        end = pts[rng.integers(len(pts))] * np.array([2.5, ps, ps])
        start = np.array([hu.shape[0] * 1.25, 30 * ps, (32 + np.sign(end[2] - half) * 8) * ps])
        d = end - start
        t = ((zmm - start[0]) * d[0] + (ymm - start[1]) * d[1] + (xmm - start[2]) * d[2])
        t = np.clip(t / float(d @ d), 0, 1)
        dist = np.sqrt((zmm - start[0] - t * d[0]) ** 2 + (ymm - start[1] - t * d[1]) ** 2
                       + (xmm - start[2] - t * d[2]) ** 2)
        frac = np.clip((rng.uniform(0.5, 1.1) - dist) / ps + 0.5, 0, 1) * lung
        np.maximum(hu, hu + frac * (35.0 - hu), out=hu, where=frac > 0)


def _nodule(rng: np.random.Generator, hu: np.ndarray, lung: np.ndarray, ps: float) -> None:
    """A solid 4-8 mm nodule of 20-60 HU centred in the lung, away from its edge."""
    radius = rng.uniform(2.0, 4.0)
    margin = int(np.ceil(radius / ps)) + 1
    inner = lung.copy()
    inner[:, :margin] = inner[:, -margin:] = False
    inner[:, :, :margin] = inner[:, :, -margin:] = False
    inner[:1] = inner[-1:] = False
    interior = np.argwhere(inner & np.roll(lung, margin, 2) & np.roll(lung, -margin, 2)
                           & np.roll(lung, margin, 1) & np.roll(lung, -margin, 1))
    c = interior[rng.integers(len(interior))] if len(interior) else np.argwhere(lung)[0]
    zz, yy, xx = np.ogrid[0:hu.shape[0], 0:64, 0:64]
    dist = np.sqrt(((zz - c[0]) * 2.5) ** 2 + ((yy - c[1]) * ps) ** 2 + ((xx - c[2]) * ps) ** 2)
    frac = np.clip((radius - dist) / 1.0 + 0.5, 0, 1)
    hu += frac * (rng.uniform(20, 60) - hu)


def _ct_kernel(rng: np.random.Generator, hu: np.ndarray, sharp: bool) -> np.ndarray:
    """Reconstruction kernel look: sharp = edge-enhanced + more noise; soft = blurred + less."""
    blur = gaussian_filter(hu, (0, 0.8, 0.8))
    noise = gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), (0, 0.6, 0.6))
    if sharp:
        return hu + 0.4 * (hu - blur) + noise * 45.0
    return blur + noise * 18.0
