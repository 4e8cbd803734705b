"""DICOM ingest: slice order, affines, rescale, MONOCHROME1, codecs, series splitting and bad files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from dicom_factory import (
    AXIAL,
    CORONAL,
    SAGITTAL,
    base_dataset,
    cr_image,
    ct_series,
    encapsulated,
    enhanced,
    save,
    set_pixels,
    world_to_voxel,
)
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, RLELossless, generate_uid

from pipeline.ingest import ingest, load_manifest, read_volume


@pytest.fixture(autouse=True)
def _key(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDXFER_KEY_FILE", str(tmp_path / "keys" / "pseudonym.key"))


def _run(src: Path, out: Path, **kw):
    result = ingest(src, None, out, progress=False, **kw)
    return result, load_manifest(out)


def _quarantine(out: Path) -> dict[str, tuple[str, str]]:
    q = pd.read_csv(out / "quarantine.csv", keep_default_na=False)
    return {row.path: (row.reason, row.detail) for row in q.itertuples()}


def _check_geometry(volume, affine, paths, expected, spacing, iop, origin, positions, tilt=0.0):
    """Every DICOM pixel lands, with its value, at the voxel its patient position maps to."""
    row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(row_dir, col_dir)
    for k, pos in enumerate(positions):
        for r in range(expected.shape[1]):
            for c in range(expected.shape[2]):
                corner = np.asarray(origin) + pos * (normal + tilt * col_dir)
                lps = corner + c * spacing[1] * row_dir + r * spacing[0] * col_dir
                assert volume[world_to_voxel(affine, lps)] == expected[k, r, c]


@pytest.mark.parametrize(
    ("iop", "spacing"),  # canonical spacing: columns 0.8 mm, rows 0.5 mm, slices 2 mm
    [(AXIAL, [0.8, 0.5, 2.0]), (SAGITTAL, [2.0, 0.8, 0.5]), (CORONAL, [0.8, 2.0, 0.5])],
    ids=["axial", "sagittal", "coronal"],
)
def test_series_geometry_known_answer(tmp_path, iop, spacing):
    paths, hu = ct_series(tmp_path / "src" / "p1", n=4, iop=iop, spacing=(0.5, 0.8))
    _, frame = _run(tmp_path / "src", tmp_path / "out")
    assert len(frame) == 1
    row = frame.iloc[0]
    volume, affine = read_volume(tmp_path / "out", row)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    _check_geometry(volume, affine, paths, hu, (0.5, 0.8), iop, (-10.0, -20.0, 30.0), [0, 2, 4, 6])
    assert row["spacing_mm"] == pytest.approx(spacing)
    assert row["n_files"] == 4
    assert row["modality"] == "CT"
    assert row["source_format"] == "dicom"


def test_gantry_tilt_gives_a_sheared_affine(tmp_path):
    paths, hu = ct_series(tmp_path / "src", n=4, tilt=0.25)
    _, frame = _run(tmp_path / "src", tmp_path / "out")
    volume, affine = read_volume(tmp_path / "out", frame.iloc[0])
    _check_geometry(volume, affine, paths, hu, (0.5, 0.8), AXIAL, (-10.0, -20.0, 30.0), [0, 2, 4, 6], tilt=0.25)
    assert "gantry tilt" in frame.iloc[0]["warnings"]


def test_axial_canonical_array_and_origin(tmp_path):
    """Axial LPS: columns and rows flip in RAS, slices ascend; the origin is the far corner of slice 0."""
    _, hu = ct_series(tmp_path / "src", n=3, rows=5, cols=6, spacing=(0.5, 0.8), origin=(-10, -20, 30))
    _, frame = _run(tmp_path / "src", tmp_path / "out")
    volume, affine = read_volume(tmp_path / "out", frame.iloc[0])
    expected = np.transpose(hu, (2, 1, 0))[::-1, ::-1, :]  # (cols, rows, slices), x and y reversed
    np.testing.assert_array_equal(volume, expected)
    np.testing.assert_allclose(affine[:3, 3], [10 - 5 * 0.8, 20 - 4 * 0.5, 30])
    np.testing.assert_allclose(np.diag(affine)[:3], [0.8, 0.5, 2.0])


def test_descending_positions_sort_by_position(tmp_path):
    """Same pixel stacks, positions reversed: the volume comes out reversed along z, affine unchanged."""
    paths, _ = ct_series(tmp_path / "a", n=5, seed=3)
    _, hu_desc = ct_series(tmp_path / "b", n=5, seed=3, positions=[8.0, 6.0, 4.0, 2.0, 0.0])
    _, fa = _run(tmp_path / "a", tmp_path / "oa")
    _, fb = _run(tmp_path / "b", tmp_path / "ob")
    va, aff_a = read_volume(tmp_path / "oa", fa.iloc[0])
    vb, aff_b = read_volume(tmp_path / "ob", fb.iloc[0])
    np.testing.assert_array_equal(vb, va[:, :, ::-1])
    np.testing.assert_allclose(aff_a, aff_b)
    _check_geometry(vb, aff_b, paths, hu_desc, (0.5, 0.8), AXIAL, (-10.0, -20.0, 30.0), [8, 6, 4, 2, 0])


def test_rescale_gives_hounsfield_units_int16(tmp_path):
    _, hu = ct_series(tmp_path / "src", slope=1.0, intercept=-1024.0)
    _, frame = _run(tmp_path / "src", tmp_path / "out")
    img = nib.load(tmp_path / "out" / frame.iloc[0]["image_path"])
    assert img.get_data_dtype() == np.int16
    assert float(np.asanyarray(img.dataobj).min()) == hu.min() < 0


def test_fractional_rescale_is_float32(tmp_path):
    _, hu = ct_series(tmp_path / "src", slope=0.25, intercept=-10.0)
    _, frame = _run(tmp_path / "src", tmp_path / "out")
    img = nib.load(tmp_path / "out" / frame.iloc[0]["image_path"])
    assert img.get_data_dtype() == np.float32
    assert sorted(np.asanyarray(img.dataobj).ravel()) == pytest.approx(sorted(hu.ravel()))


@pytest.mark.parametrize("slope", [None, 2.0])
def test_monochrome1_is_inverted_2d(tmp_path, slope):
    stored = cr_image(tmp_path / "src" / "cr.dcm", mono1=True, bits_stored=12, slope=slope, intercept=10.0)
    _, frame = _run(tmp_path / "src", tmp_path / "out")
    row = frame.iloc[0]
    volume, affine = read_volume(tmp_path / "out", row)
    s, c = (slope, 10.0) if slope else (1.0, 0.0)
    expected = s * (4095 - stored.astype(np.float64)) + c  # (lo + hi) - value in rescaled units
    assert volume.shape == (5, 7, 1)
    assert row["shape"] == [5, 7, 1]
    np.testing.assert_array_equal(volume[:, :, 0].T, expected)
    assert row["spacing_mm"] == pytest.approx([0.3, 0.2, 1.0])
    np.testing.assert_allclose(affine, np.diag([0.3, 0.2, 1.0, 1.0]))


def test_imager_pixel_spacing_and_monochrome2(tmp_path):
    stored = cr_image(tmp_path / "src" / "dx.dcm", mono1=False, imager_spacing=True, spacing=(0.15, 0.15))
    _, frame = _run(tmp_path / "src", tmp_path / "out")
    volume, _ = read_volume(tmp_path / "out", frame.iloc[0])
    np.testing.assert_array_equal(volume[:, :, 0].T, stored)
    assert frame.iloc[0]["spacing_mm"] == pytest.approx([0.15, 0.15, 1.0])


@pytest.mark.parametrize("syntax", [RLELossless, "1.2.840.10008.1.2"], ids=["rle", "implicit-vr"])
def test_encodings_decode_identically(tmp_path, syntax):
    ct_series(tmp_path / "plain", seed=5)
    ct_series(tmp_path / "coded", seed=5, transfer_syntax=syntax)
    _, fa = _run(tmp_path / "plain", tmp_path / "oa")
    _, fb = _run(tmp_path / "coded", tmp_path / "ob")
    assert fa.iloc[0]["content_sha256"] == fb.iloc[0]["content_sha256"]


def test_multiframe_without_positions_is_one_unit(tmp_path):
    ds = base_dataset("MR")
    stored = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    ds.PixelSpacing, ds.SpacingBetweenSlices = [0.5, 0.5], 3.0
    set_pixels(ds, stored)
    save(ds, tmp_path / "src" / "mf.dcm")
    _, frame = _run(tmp_path / "src", tmp_path / "out")
    volume, _ = read_volume(tmp_path / "out", frame.iloc[0])
    np.testing.assert_array_equal(volume, np.transpose(stored, (2, 1, 0)))
    assert frame.iloc[0]["spacing_mm"] == pytest.approx([0.5, 0.5, 3.0])
    assert "frames stacked along z" in frame.iloc[0]["warnings"]


def test_enhanced_multiframe_sorted_by_frame_position(tmp_path):
    expected = enhanced(tmp_path / "src" / "emr.dcm", [4.0, 0.0, 2.0], slope=2.0, intercept=-5.0)
    _, frame = _run(tmp_path / "src", tmp_path / "out")
    row = frame.iloc[0]
    volume, _ = read_volume(tmp_path / "out", row)
    assert row["shape"] == [3, 4, 3]
    assert row["spacing_mm"] == pytest.approx([0.6, 0.5, 2.0])
    in_z_order = expected[[1, 2, 0]]  # stored frames sorted by z: 0, 2, 4
    np.testing.assert_array_equal(volume, np.transpose(in_z_order, (2, 1, 0))[::-1, ::-1, :])


def test_enhanced_multiframe_with_repeated_positions_is_unsupported(tmp_path):
    enhanced(tmp_path / "src" / "emr.dcm", [0.0, 0.0, 2.0])
    _, frame = _run(tmp_path / "src", tmp_path / "out")
    assert frame.empty
    reason, detail = _quarantine(tmp_path / "out")["emr.dcm"]
    assert reason == "unsupported"
    assert "repeated frame positions" in detail


def test_two_series_in_one_folder(tmp_path):
    ct_series(tmp_path / "src", n=3, seed=1, name="a")
    ct_series(tmp_path / "src", n=5, seed=2, name="b")
    _, frame = _run(tmp_path / "src", tmp_path / "out")
    assert sorted(frame["n_files"]) == [3, 5]
    assert frame["series_id"].nunique() == 2
    assert frame["subject_id"].nunique() == 1


def test_series_split_by_orientation(tmp_path):
    uid = generate_uid()
    ct_series(tmp_path / "src", n=4, series_uid=uid, name="axial")
    ct_series(tmp_path / "src", n=2, series_uid=uid, iop=CORONAL, name="scout")
    _, frame = _run(tmp_path / "src", tmp_path / "out")
    assert sorted(frame["n_files"]) == [2, 4]
    assert frame["series_id"].nunique() == 1
    assert frame["image_id"].nunique() == 2


def test_repeated_positions_split_by_acquisition(tmp_path):
    uid = generate_uid()
    ct_series(tmp_path / "src", n=3, series_uid=uid, acquisition=1, name="first")
    ct_series(tmp_path / "src", n=3, series_uid=uid, acquisition=2, name="second")
    _, frame = _run(tmp_path / "src", tmp_path / "out")
    assert list(frame["n_files"]) == [3, 3]


def test_repeated_positions_same_acquisition_quarantined(tmp_path):
    uid = generate_uid()
    ct_series(tmp_path / "src", n=3, series_uid=uid, name="first")
    ct_series(tmp_path / "src", n=3, series_uid=uid, name="second")
    result, frame = _run(tmp_path / "src", tmp_path / "out")
    assert frame.empty
    assert result.n_quarantined == 6
    assert {r for r, _ in _quarantine(tmp_path / "out").values()} == {"inconsistent-series"}


def test_duplicate_copy_is_quarantined_and_series_kept(tmp_path):
    paths, _ = ct_series(tmp_path / "src", n=3)
    (tmp_path / "src" / "zz-copy.dcm").write_bytes(paths[1].read_bytes())
    _, frame = _run(tmp_path / "src", tmp_path / "out")
    assert list(frame["n_files"]) == [3]
    reason, detail = _quarantine(tmp_path / "out")["zz-copy.dcm"]
    assert reason == "duplicate-of"
    assert detail == paths[1].name  # the kept copy, relative to SOURCE


@pytest.mark.parametrize(
    ("positions", "thickness", "warning"),
    [
        ([0, 2, 4, 8, 10], 2.0, "gap: 1 missing slice(s)"),
        ([0, 2, 4.5, 6.5], 2.0, "irregular slice spacing"),
        ([0, 2, 4], [2.0, 2.0, 5.0], "mixed slice thickness: 2, 5 mm"),
    ],
    ids=["gap", "irregular", "thickness"],
)
def test_unit_warnings(tmp_path, positions, thickness, warning):
    ct_series(tmp_path / "src", positions=positions, thickness=thickness)
    _, frame = _run(tmp_path / "src", tmp_path / "out")
    assert warning in frame.iloc[0]["warnings"]


def test_clean_series_has_no_warnings(tmp_path):
    ct_series(tmp_path / "src", n=4)
    _, frame = _run(tmp_path / "src", tmp_path / "out")
    assert frame.iloc[0]["warnings"] == ""


def test_bad_files_are_quarantined_with_reasons(tmp_path):
    src = tmp_path / "src"
    paths, _ = ct_series(src / "good", n=3)
    (src / "junk").mkdir()
    (src / "junk" / "empty.dcm").write_bytes(b"")
    (src / "junk" / "notes.txt").write_text("patient list\nnot an image\n")
    data = paths[0].read_bytes()
    (src / "junk" / "cut-pixels.dcm").write_bytes(data[: len(data) - 20])
    (src / "junk" / "cut-header.dcm").write_bytes(data[:200])
    sr = base_dataset("SR", "1.2.840.10008.5.1.4.1.1.88.11")
    save(sr, src / "junk" / "report.dcm")
    encapsulated(src / "junk" / "lossless.dcm", JPEGLosslessSV1)
    encapsulated(src / "junk" / "broken-j2k.dcm", JPEG2000Lossless)
    rgb = base_dataset("OT")
    set_pixels(rgb, np.zeros((4, 4), np.uint8), photometric="RGB")
    rgb.SamplesPerPixel = 3
    save(rgb, src / "junk" / "rgb.dcm")
    (src / "junk" / "dangling.dcm").symlink_to(src / "junk" / "nowhere.dcm")  # broken, inside SOURCE
    result, frame = _run(src, tmp_path / "out")
    q = _quarantine(tmp_path / "out")
    reasons = {Path(p).name: r for p, (r, _) in q.items()}
    assert reasons == {
        "empty.dcm": "empty-file",
        "notes.txt": "not-dicom",
        "cut-pixels.dcm": "truncated",
        "cut-header.dcm": "truncated",
        "report.dcm": "no-pixel-data",
        "lossless.dcm": "no-decoder",
        "broken-j2k.dcm": "decode-error",
        "rgb.dcm": "unsupported",
        "dangling.dcm": "unsupported",
    }
    assert "medxfer[gpl-codecs]" in q["junk/lossless.dcm"][1]
    assert len(frame) == 1
    assert frame.iloc[0]["n_files"] == 3
    assert result.report["quarantined"]["by_reason"]["truncated"] == 2


def test_strict_lists_every_problem(tmp_path):
    ct_series(tmp_path / "src", n=2)
    (tmp_path / "src" / "empty.dcm").write_bytes(b"")
    (tmp_path / "src" / "readme.txt").write_text("hello")
    from pipeline.errors import DataError

    with pytest.raises(
        DataError, match=r"2 file\(s\) quarantined(?s:.*)empty-file +src-[0-9a-f]{16}(?s:.*)not-dicom +src-[0-9a-f]{16}"
    ) as err:
        ingest(tmp_path / "src", None, tmp_path / "out", strict=True, progress=False)
    assert "empty.dcm" not in str(err.value) and "readme" not in str(err.value)  # paths may name patients
    assert not (tmp_path / "out" / "manifest.parquet").exists()
