"""NIfTI ingest: any orientation → RAS, 4D/corrupt quarantined, subject rule (path column, BIDS, first folder)."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from dicom_factory import PHI, write_nifti

from pipeline.ingest import ingest, load_manifest, read_volume
from pipeline.ingest.nifti import bids_modality, nifti_subject
from pipeline.ingest.pseudonym import load_or_create_key, pseudonym


@pytest.fixture
def key_file(tmp_path, monkeypatch):
    path = tmp_path / "keys" / "pseudonym.key"
    monkeypatch.setenv("MEDXFER_KEY_FILE", str(path))
    return path


def _subject(key_file, raw: str) -> str:
    key, _ = load_or_create_key(key_file)
    return pseudonym(key, "subject", raw)


def test_lps_volume_is_reoriented_to_ras(tmp_path, key_file):
    data = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2)
    lps = np.array([[-2.0, 0, 0, 50], [0, -1.5, 0, 40], [0, 0, 3.0, -10], [0, 0, 0, 1]])
    write_nifti(tmp_path / "src" / "p01" / "ct.nii.gz", data, lps)
    ingest(tmp_path / "src", None, tmp_path / "out", progress=False)
    frame = load_manifest(tmp_path / "out")
    volume, affine = read_volume(tmp_path / "out", frame.iloc[0])
    np.testing.assert_array_equal(volume, data[::-1, ::-1, :])
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(affine[:3, 3], [50 - 2.0 * 3, 40 - 1.5 * 2, -10])
    row = frame.iloc[0]
    assert row["spacing_mm"] == pytest.approx([2.0, 1.5, 3.0])
    assert row["shape"] == [4, 3, 2]
    assert row["source_format"] == "nifti"
    assert row["manufacturer"] == ""
    assert row["n_files"] == 1
    header = nib.load(tmp_path / "out" / row["image_path"]).header
    assert header["descrip"].item() == b""
    assert header["db_name"].item() == b""
    assert header["aux_file"].item() == b""
    assert PHI["PatientName"].encode() not in (tmp_path / "out" / row["image_path"]).read_bytes()


def test_2d_nifti_becomes_x_y_1(tmp_path, key_file):
    write_nifti(tmp_path / "src" / "p1" / "xray.nii", np.ones((5, 4), np.float32) * 0.5, np.eye(4))
    ingest(tmp_path / "src", None, tmp_path / "out", progress=False)
    frame = load_manifest(tmp_path / "out")
    assert frame.iloc[0]["shape"] == [5, 4, 1]
    assert nib.load(tmp_path / "out" / frame.iloc[0]["image_path"]).get_data_dtype() == np.float32


def test_4d_and_corrupt_are_quarantined(tmp_path, key_file):
    src = tmp_path / "src"
    write_nifti(src / "p1" / "bold.nii.gz", np.zeros((3, 3, 3, 2), np.float32), np.eye(4))
    write_nifti(src / "p1" / "single.nii.gz", np.zeros((3, 3, 3, 1), np.float32), np.eye(4))
    (src / "p2").mkdir()
    (src / "p2" / "junk.nii.gz").write_bytes(b"\x00" * 100)
    good = write_nifti(src / "p3" / "cut.nii.gz", np.random.default_rng(0).random((20, 20, 20)), np.eye(4))
    raw = gzip.decompress(good.read_bytes())
    good.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    result = ingest(src, None, tmp_path / "out", progress=False)
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert dict(zip(q["path"], q["reason"], strict=True)) == {
        "p1/bold.nii.gz": "nifti-4d",
        "p2/junk.nii.gz": "nifti-corrupt",
        "p3/cut.nii.gz": "nifti-corrupt",
    }
    assert result.n_units == 1  # the 4D file with one volume is a 3D image


@pytest.mark.parametrize(
    ("relpath", "subject"),
    [
        ("rawdata/sub-07/ses-1/anat/sub-07_ses-1_T1w.nii.gz", "sub-07"),
        ("P12/visit2/brain.nii", "P12"),
        ("loose_scan.nii.gz", "loose_scan"),
    ],
    ids=["bids", "first-folder", "root-file"],
)
def test_subject_rule(relpath, subject):
    assert nifti_subject(relpath) == subject


def test_bids_modality_from_suffix():
    assert bids_modality("sub-1/anat/sub-1_T1w.nii.gz") == "MR"
    assert bids_modality("sub-1/ct/sub-1_ct.nii") == "CT"
    assert bids_modality("P1/scan.nii") == ""


def test_labels_join_by_path_then_subject_rule(tmp_path, key_file):
    src = tmp_path / "src"
    vol = np.zeros((3, 3, 3), np.int16)
    write_nifti(src / "sub-01" / "anat" / "sub-01_T1w.nii.gz", vol, np.eye(4))
    write_nifti(src / "batch" / "a.nii", vol, np.eye(4))
    write_nifti(src / "batch" / "b.nii", vol, np.eye(4))
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label,path,modality\nsub-01,1,,\nPA,0,batch/a.nii,ct\nPB,1,batch/b.nii,\n")
    ingest(src, labels, tmp_path / "out", progress=False)
    frame = load_manifest(tmp_path / "out").set_index("subject_id")
    assert frame.loc[_subject(key_file, "sub-01"), "label"] == "1"
    assert frame.loc[_subject(key_file, "sub-01"), "modality"] == "MR"  # from the BIDS suffix
    assert frame.loc[_subject(key_file, "PA"), "label"] == "0"
    assert frame.loc[_subject(key_file, "PA"), "modality"] == "CT"  # from the labels column
    assert frame.loc[_subject(key_file, "PB"), "label"] == "1"
    assert frame.loc[_subject(key_file, "PB"), "modality"] == ""
