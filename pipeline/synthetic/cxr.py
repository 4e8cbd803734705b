"""Synthetic chest radiographs (DX/CR, 2D): drawn anatomy, a faint round opacity in positives."""

from __future__ import annotations

import numpy as np
from pydicom.uid import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation
from scipy.ndimage import gaussian_filter

from pipeline.synthetic.dicom_writer import Job, make_uid, set_elements, study_header
from pipeline.synthetic.patients import SITES, Patient

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


def cxr_study(p: Patient, token: str) -> list[Job]:
    """One study of one or two PA exposures; every exposure of a positive shows the opacity."""
    rng = p.rng
    _, model, _, _, spacing, shape, _ = SITES[p.site]
    cr = p.site == "site-C"  # a CR plate reader at one site, flat-panel DX elsewhere
    sop = ComputedRadiographyImageStorage if cr else DigitalXRayImageStorageForPresentation
    anat, finding = _cxr_anatomy(rng, p), _cxr_finding(rng) if p.label else None
    jobs = []
    for s in range(1 if rng.random() < 0.6 else 2):
        img = _chest_image(rng, anat, finding, shape)
        mono1 = rng.random() < _MONO1_FRACTION
        ds = study_header(p, token, sop, "CR" if cr else "DX", model)
        ds.SeriesInstanceUID = make_uid(token, "series", p.index, s)
        ds.SeriesNumber, ds.InstanceNumber = s + 1, 1
        ds.SeriesDescription = "PA" if s == 0 else "PA REPEAT"
        set_elements(ds, _CXR_FIXED if cr else {**_CXR_FIXED, "PresentationIntentType": "FOR PRESENTATION"})
        ds.ImagerPixelSpacing = ds.PixelSpacing = [spacing, spacing]
        ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
        ds.Rows, ds.Columns = shape
        pixels = (4095 - img if mono1 else img).astype("<u2").tobytes()
        jobs.append((ds, {"SOPInstanceUID": make_uid(token, "sop", p.index, s), "PixelData": pixels}))
    return jobs


def _cxr_anatomy(rng: np.random.Generator, p: Patient) -> dict[str, float]:
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
