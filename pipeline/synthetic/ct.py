"""Synthetic chest CT (3D, HU): a thorax phantom with vessels, a solid nodule in positives, two kernels."""

from __future__ import annotations

import numpy as np
from pydicom.uid import CTImageStorage
from scipy.ndimage import gaussian_filter

from pipeline.synthetic.dicom_writer import Job, make_uid, set_elements, study_header
from pipeline.synthetic.patients import SITES, Patient

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


def ct_study(p: Patient, token: str) -> list[Job]:
    """Two series (sharp and soft kernel) of one acquisition; InstanceNumber order varies."""
    rng = p.rng
    nz, ps = int(rng.integers(24, 41)), round(float(rng.uniform(0.6, 0.8)), 3)
    hu = _ct_phantom(rng, nz, ps, p)
    z0 = float(rng.uniform(-180, -120))
    x0, y0 = -31.5 * ps + rng.uniform(-3, 3), -31.5 * ps + rng.uniform(-3, 3)
    frame = make_uid(token, "frame", p.index)
    jobs = []
    for s, (kernel, desc) in enumerate(zip(SITES[p.site][6], ("LUNG", "STANDARD"), strict=True)):
        reverse = rng.random() < 0.5 if p.index else s == 1  # patient 0 always has both orders
        ds = study_header(p, token, CTImageStorage, "CT", SITES[p.site][2])
        ds.SeriesInstanceUID = make_uid(token, "series", p.index, s)
        ds.FrameOfReferenceUID = frame
        ds.SeriesNumber, ds.AcquisitionNumber = s + 2, 1
        ds.SeriesDescription = f"CHEST 2.5mm {desc}"
        set_elements(ds, _CT_FIXED)
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
                        "SOPInstanceUID": make_uid(token, "sop", p.index, s, k),
                        "InstanceNumber": nz - k if reverse else k + 1,
                        "ImagePositionPatient": [f"{x0:.3f}", f"{y0:.3f}", z],
                        "SliceLocation": z,
                        "PixelData": stored[k].tobytes(),
                    },
                )
            )
    return jobs


def _ct_phantom(rng: np.random.Generator, nz: int, ps: float, p: Patient) -> np.ndarray:
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
