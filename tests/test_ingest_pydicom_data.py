"""Every pydicom / pydicom-data test file decodes to pydicom's pixel_array (+rescale) or is quarantined."""

from __future__ import annotations

import itertools
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pydicom.data.download as pydicom_download
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.pixels import apply_modality_lut

from pipeline.ingest import ingest, load_manifest, read_volume

REASONS = {
    "not-dicom",
    "empty-file",
    "truncated",
    "no-pixel-data",
    "no-decoder",
    "decode-error",
    "inconsistent-series",
    "unsupported",
}
# Files whose outcome is known exactly (the rest must decode or carry one of REASONS).
EXPECTED_REASON = {
    "MR_truncated.dcm": "truncated",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated",
    "JPEG-LL.dcm": "no-decoder",  # JPEG lossless P14: GPL decoder only
    "bad_sequence.dcm": "no-decoder",
    "JPGLosslessP14SV1_1s_1f_8b.dcm": "no-decoder",
    "JPEG-lossy.dcm": "no-decoder",  # 12-bit JPEG extended: GPL decoder only
    "JPGExtended.dcm": "no-decoder",
    "JPEG2000-embedded-sequence-delimiter.dcm": "decode-error",
    "GDCMJ2K_TextGBR.dcm": "unsupported",  # colour
    "US1_UNCR.dcm": "unsupported",
    "liver.dcm": "unsupported",  # SEG
    "rtdose.dcm": "unsupported",
    "test-SR.dcm": "no-pixel-data",
    "rtplan.dcm": "no-pixel-data",
    "rtstruct.dcm": "no-pixel-data",
    "waveform_ecg.dcm": "no-pixel-data",
    "README.txt": "not-dicom",
    "zipMR.gz": "not-dicom",
}
_BIG = 1_500_000  # bytes: larger files run only with the slow tests


def _pydicom_test_files() -> list[Path]:
    """pydicom.data.get_testdata_files("*") without network: downloads are switched off while listing."""
    previous = getattr(pydicom_download, "_SIMULATE_NETWORK_OUTAGE", False)
    pydicom_download._SIMULATE_NETWORK_OUTAGE = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names = get_testdata_files("*")
    finally:
        pydicom_download._SIMULATE_NETWORK_OUTAGE = previous
    return sorted({Path(p) for p in names if Path(p).is_file()}, key=lambda p: p.name)


FILES = _pydicom_test_files()


def _param(path: Path):
    marks = [pytest.mark.slow] if path.stat().st_size > _BIG else []
    return pytest.param(path, id=path.name, marks=marks)


@pytest.fixture(autouse=True)
def _key(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDXFER_KEY_FILE", str(tmp_path / "keys" / "pseudonym.key"))


def _expected(path: Path) -> np.ndarray | None:
    """pydicom's own decode (frames, rows, cols) + modality LUT/rescale + MONOCHROME1 inversion, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            grey = ds.get("PhotometricInterpretation") in ("MONOCHROME1", "MONOCHROME2")
            if not grey or ds.get("Modality") in ("SEG", "RTDOSE"):
                return None
            arr = ds.pixel_array
    except Exception:
        return None
    arr = arr.reshape(-1, ds.Rows, ds.Columns)
    groups = ds.get("SharedFunctionalGroupsSequence")
    if groups and "PixelValueTransformationSequence" in groups[0]:
        item = groups[0].PixelValueTransformationSequence[0]
        out = arr * float(item.RescaleSlope) + float(item.RescaleIntercept)
    else:
        out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        bits = ds.BitsStored
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2**bits - 1)
        ends = np.asarray(apply_modality_lut(np.array([lo, hi]), ds), dtype=np.float64)
        out = ends.min() + ends.max() - out
    return out.astype(np.float32)


def _equal_up_to_axes(volume: np.ndarray, frames: np.ndarray) -> bool:
    """True if `volume` is `frames` (as cols × rows × frames) under some axis permutation and flips."""
    xyz = np.transpose(frames, (2, 1, 0))
    for perm in itertools.permutations(range(3)):
        moved = np.transpose(xyz, perm)
        if moved.shape != volume.shape:
            continue
        for flips in itertools.product((False, True), repeat=3):
            view = moved[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
            if np.array_equal(view, volume):
                return True
    return False


def _ingest_one(path: Path, tmp_path: Path) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    src = tmp_path / "src"
    src.mkdir(parents=True)
    shutil.copy(path, src / path.name)
    ingest(src, None, tmp_path / "out", progress=False)
    quarantine = pd.read_csv(tmp_path / "out" / "quarantine.csv", keep_default_na=False)
    return load_manifest(tmp_path / "out"), quarantine, tmp_path / "out"


@pytest.mark.parametrize("path", [_param(p) for p in FILES])
def test_decodes_like_pydicom_or_is_quarantined(path, tmp_path):
    frame, quarantine, out = _ingest_one(path, tmp_path)
    expected = _expected(path)
    if path.name in EXPECTED_REASON:
        assert frame.empty
        assert list(quarantine["reason"]) == [EXPECTED_REASON[path.name]]
    elif expected is not None:  # pydicom decodes a greyscale image: we must too, to the same values
        assert quarantine.empty, quarantine.to_dict("records")
        volume, _ = read_volume(out, frame.iloc[0])
        assert _equal_up_to_axes(volume, expected)
    else:
        assert len(frame) + len(quarantine) == 1
        assert quarantine.empty or quarantine.iloc[0]["reason"] in REASONS
    assert all(d for d in quarantine["detail"]), "every quarantine entry explains itself"


def test_file_list_covers_both_packages():
    names = {p.name for p in FILES}
    assert {"CT_small.dcm", "MR_small_RLE.dcm", "RG1_UNCR.dcm", "RG1_J2KR.dcm"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["RG1", "RG3", "MR2", "693"])
def test_j2k_lossless_equals_uncompressed(stem, tmp_path):
    rows = []
    for variant in ("UNCR", "J2KR"):
        path = Path(get_testdata_file(f"{stem}_{variant}.dcm", download=False))
        frame, quarantine, out = _ingest_one(path, tmp_path / variant)
        assert quarantine.empty
        assert len(frame) == 1
        rows.append((frame.iloc[0], read_volume(out, frame.iloc[0])[0]))
    (row_u, vol_u), (row_j, vol_j) = rows
    np.testing.assert_array_equal(vol_u, vol_j)
    assert row_u["content_sha256"] == row_j["content_sha256"]


def test_monochrome1_chest_cr_is_inverted(tmp_path):
    path = Path(get_testdata_file("RG3_UNCR.dcm", download=False))
    frame, _, out = _ingest_one(path, tmp_path)
    ds = pydicom.dcmread(path)
    volume, _ = read_volume(out, frame.iloc[0])
    top = 2**ds.BitsStored - 1
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert frame.iloc[0]["modality"] == "CR"
    np.testing.assert_array_equal(volume[:, :, 0].T, top - ds.pixel_array.astype(np.float32))


def test_enhanced_ct_is_one_volume_with_frame_geometry(tmp_path):
    frame, quarantine, _ = _ingest_one(Path(get_testdata_file("eCT_Supplemental.dcm", download=False)), tmp_path)
    assert quarantine.empty
    assert frame.iloc[0]["shape"] == [512, 512, 2]
    assert frame.iloc[0]["spacing_mm"] == pytest.approx([0.388672, 0.388672, 10.0])
