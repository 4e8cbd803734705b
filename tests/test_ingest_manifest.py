"""End-to-end ingest: manifest schema, labels and splits, privacy, atomic and incremental runs, workers, key file."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicom_factory import PHI, cr_image, ct_series, write_nifti

from pipeline.errors import ConfigError, DataError
from pipeline.ingest import ingest, load_manifest, read_volume
from pipeline.records import MANIFEST_COLUMNS

PATIENTS = ["MRN0001", "MRN0002", "MRN0003", "MRN0004"]


def _archive(root: Path) -> tuple[Path, Path]:
    """4 DICOM patients (CT series, CRs), one NIfTI subject, and a labels file with problems."""
    src = root / "archive"
    ct_series(src / "a" / "s1", n=3, patient_id=PATIENTS[0], seed=1)
    ct_series(src / "a" / "s2", n=2, patient_id=PATIENTS[0], seed=2)
    ct_series(src / "b", n=3, patient_id=PATIENTS[1], seed=3)
    cr_image(src / "c" / "cr.dcm", patient_id=PATIENTS[2])
    cr_image(src / "d" / "cr.dcm", patient_id=PATIENTS[3], seed=4)
    write_nifti(src / "sub-N1" / "anat" / "sub-N1_T1w.nii.gz", np.ones((4, 4, 3), np.float32), np.eye(4))
    (src / "d" / "notes.txt").write_text("not an image")
    labels = root / "labels.csv"
    labels.write_text(
        "patient_id,label,sex,age,site,patient_name,scanner\n"
        f"{PATIENTS[0]},1,F,64,A,{PHI['PatientName']},X\n"
        f"{PATIENTS[1]},0,M,37,B,{PHI['PatientName']},Y\n"
        f"{PATIENTS[2]},0,F,91,A,{PHI['PatientName']},X\n"
        "sub-N1,1,M,50,C,,Z\n"
        "MRN9999,1,F,40,A,,X\n"
    )  # no images
    return src, labels


@pytest.fixture
def key_file(tmp_path, monkeypatch):
    path = tmp_path / "keys" / "pseudonym.key"
    monkeypatch.setenv("MEDXFER_KEY_FILE", str(path))
    return path


@pytest.fixture
def archive(tmp_path, key_file):
    return _archive(tmp_path)


def test_manifest_schema_and_join(tmp_path, archive):
    src, labels = archive
    result = ingest(src, labels, tmp_path / "out", progress=False, subgroups=["scanner"])
    frame = load_manifest(tmp_path / "out")
    assert list(frame.columns) == [*MANIFEST_COLUMNS, "sex", "age_band", "site", "scanner"]
    assert result.n_units == len(frame) == 6
    assert result.n_quarantined == 1
    assert sorted(frame["modality"]) == ["CR", "CR", "CT", "CT", "CT", "MR"]
    for col, prefix in (("image_id", "img-"), ("subject_id", "sub-"), ("study_id", "stu-"), ("series_id", "ser-")):
        assert frame[col].str.fullmatch(prefix + "[0-9a-f]{16}").all()
    assert (frame["image_path"] == "images/" + frame["image_id"] + ".nii").all()
    assert all((tmp_path / "out" / p).is_file() for p in frame["image_path"])
    ct = frame[frame["modality"] == "CT"]
    assert ct["subject_id"].nunique() == 2
    assert set(ct["label"]) == {"0", "1"}
    assert set(frame.loc[frame["age_band"] != "", "age_band"]) == {"60-69", "30-39", "90+", "50-59"}
    unlabeled = frame[frame["label"] == ""]
    assert len(unlabeled) == 1
    assert unlabeled.iloc[0]["split"] == ""
    assert unlabeled.iloc[0]["sex"] == ""
    labelled = frame[frame["label"] != ""]
    assert set(labelled["split"]) <= {"train", "val", "test"}
    assert (labelled["split"] != "").all()
    assert (labelled.groupby("subject_id")["split"].nunique() == 1).all()
    assert frame["content_sha256"].str.fullmatch("[0-9a-f]{64}").all()
    assert isinstance(frame.iloc[0]["shape"], list)
    assert isinstance(frame.iloc[0]["n_files"], np.integer)
    assert frame.loc[frame["modality"] == "CT", "manufacturer"].eq("ACME Imaging").all()


def test_report_counts_and_label_problems(tmp_path, archive):
    src, labels = archive
    report = ingest(src, labels, tmp_path / "out", progress=False).report
    assert report == json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    assert report["files_seen"] == 12
    assert report["units"] == 6
    assert report["quarantined"] == {"files": 1, "by_reason": {"not-dicom": 1}}
    assert report["labels"]["problems"] == [
        {"line": 6, "problem": "no-images", "detail": "no images for this patient_id"}
    ]
    assert report["labels"]["unlabeled_units"] == 1
    assert report["labels"]["dropped"] == ["patient_name"]
    counted = sum(s["units"] for s in report["splits"].values())
    assert counted == 6
    assert report["splits"]["unlabeled"]["units"] == 1
    import hashlib

    assert report["manifest_sha256"] == hashlib.sha256((tmp_path / "out" / "manifest.parquet").read_bytes()).hexdigest()
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert list(q.columns) == ["path", "reason", "detail"]
    assert list(q["path"]) == ["d/notes.txt"]


def _identifiers(src: Path, labels: Path) -> set[str]:
    found = set(PATIENTS) | set(PHI.values())
    for path in src.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        found |= {
            str(ds[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
        }
    return found | {"sub-N1", str(src), str(labels)}


def test_no_identifiers_in_any_output_or_log(tmp_path, archive, key_file, caplog):
    src, labels = archive
    caplog.set_level(logging.DEBUG)
    ingest(src, labels, tmp_path / "out", progress=False)
    ingest(src, labels, tmp_path / "out", progress=False)  # a cached re-run writes the cache too
    secrets = _identifiers(src, labels) | {key_file.read_text().strip()}
    outputs = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(outputs) >= 9
    assert not list((tmp_path / "out").rglob("*.key"))
    for path in outputs:
        data = path.read_bytes()
        leaked = [s for s in secrets if s.encode() in data]
        assert not leaked, f"{path.name} contains {leaked}"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert not [s for s in secrets if s in logged]
    report = (tmp_path / "out" / "ingest_report.json").read_text()
    assert "notes.txt" not in report
    assert "archive" not in report


def test_rerun_reuses_units_and_keeps_ids(tmp_path, archive):
    src, labels = archive
    first = ingest(src, labels, tmp_path / "out", progress=False)
    manifest = (tmp_path / "out" / "manifest.parquet").read_bytes()
    second = ingest(src, labels, tmp_path / "out", progress=False)
    assert second.report["units_reused"] == 6
    assert second.report["units_decoded"] == 0
    assert (tmp_path / "out" / "manifest.parquet").read_bytes() == manifest
    cr = src / "c" / "cr.dcm"
    os.utime(cr, ns=(cr.stat().st_atime_ns, cr.stat().st_mtime_ns + 10**9))
    third = ingest(src, labels, tmp_path / "out", progress=False)
    assert third.report["units_decoded"] == 1
    assert third.report["units_reused"] == 5
    assert (
        load_manifest(tmp_path / "out")["image_id"].tolist()
        == pd.read_parquet(__import__("io").BytesIO(manifest))["image_id"].tolist()
    )
    assert first.report["manifest_sha256"] == third.report["manifest_sha256"]


def test_removed_units_lose_their_images(tmp_path, archive):
    src, labels = archive
    ingest(src, labels, tmp_path / "out", progress=False)
    for path in (src / "b").iterdir():
        path.unlink()
    ingest(src, labels, tmp_path / "out", progress=False)
    frame = load_manifest(tmp_path / "out")
    images = {p.name for p in (tmp_path / "out" / "images").iterdir()}
    assert images == {f"{i}.nii" for i in frame["image_id"]}
    assert len(images) == 5


def test_failed_strict_run_leaves_previous_manifest(tmp_path, archive):
    src, labels = archive
    (src / "d" / "notes.txt").unlink()
    ingest(src, labels, tmp_path / "out", strict=True, progress=False)
    before = {
        n: (tmp_path / "out" / n).read_bytes() for n in ("manifest.parquet", "quarantine.csv", "ingest_report.json")
    }
    (src / "b" / "empty.dcm").write_bytes(b"")
    with pytest.raises(DataError, match=r"1 file\(s\) quarantined(?s:.*)empty-file +(src-[0-9a-f]{16})") as err:
        ingest(src, labels, tmp_path / "out", strict=True, progress=False)
    assert {n: (tmp_path / "out" / n).read_bytes() for n in before} == before
    assert "b/empty.dcm" not in str(err.value)
    listing = pd.read_csv(tmp_path / "out" / "quarantine-strict.csv", dtype=str, keep_default_na=False)
    ref = re.search(r"empty-file +(src-[0-9a-f]{16})", str(err.value)).group(1)
    assert listing.set_index("ref").loc[ref, "path"] == "b/empty.dcm"
    (src / "b" / "empty.dcm").unlink()
    ingest(src, labels, tmp_path / "out", strict=True, progress=False)
    assert not (tmp_path / "out" / "quarantine-strict.csv").exists()  # a successful run removes the listing


def test_strict_fails_on_conflicting_labels(tmp_path, archive):
    src, labels = archive
    (src / "d" / "notes.txt").unlink()
    labels.write_text(labels.read_text() + f"{PATIENTS[1]},1,M,37,B,,Y\n")
    with pytest.raises(DataError, match=r"labels line 7: same patient_id as line 3"):
        ingest(src, labels, tmp_path / "out", strict=True, progress=False)


@pytest.mark.slow
def test_workers_give_the_same_manifest(tmp_path, archive):
    src, labels = archive
    ingest(src, labels, tmp_path / "one", progress=False, workers=1)
    ingest(src, labels, tmp_path / "two", progress=True, workers=2)
    assert (tmp_path / "one" / "manifest.parquet").read_bytes() == (tmp_path / "two" / "manifest.parquet").read_bytes()


def test_progress_bar_runs(tmp_path, archive, capsys):
    src, labels = archive
    ingest(src, labels, tmp_path / "out", progress=True)
    assert "decoding image units" in capsys.readouterr().err


def test_key_file_created_private_and_outside_out(tmp_path, archive, key_file):
    src, labels = archive
    ingest(src, labels, tmp_path / "out", progress=False)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_text().strip()) == 64
    with pytest.raises(ConfigError, match="inside the manifest directory"):
        ingest(src, labels, tmp_path / "out", key_file=tmp_path / "out" / "k.key", progress=False)


def test_other_key_gives_other_pseudonyms(tmp_path, archive):
    src, labels = archive
    ingest(src, labels, tmp_path / "a", progress=False)
    ingest(src, labels, tmp_path / "b", progress=False)
    ingest(src, labels, tmp_path / "c", key_file=tmp_path / "other.key", progress=False)
    a, b, c = (load_manifest(tmp_path / n) for n in "abc")
    assert a["image_id"].tolist() == b["image_id"].tolist()
    assert not set(a["subject_id"]) & set(c["subject_id"])


def test_malformed_key_file(tmp_path, archive):
    src, labels = archive
    bad = tmp_path / "bad.key"
    bad.write_text("not-hex")
    with pytest.raises(ConfigError, match="must hold 64 hex characters"):
        ingest(src, labels, tmp_path / "out", key_file=bad, progress=False)


def test_bad_arguments(tmp_path, archive):
    src, labels = archive
    with pytest.raises(DataError, match="is not a folder"):
        ingest(tmp_path / "missing", labels, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match=r"labels file .* not found"):
        ingest(src, tmp_path / "nope.csv", tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="workers=0"):
        ingest(src, labels, tmp_path / "out", workers=0, progress=False)
    with pytest.raises(ConfigError, match="leave nothing for train"):
        ingest(src, labels, tmp_path / "out", val=0.6, test=0.5, progress=False)


def test_unlabeled_archive(tmp_path, archive):
    src, _ = archive
    ingest(src, None, tmp_path / "out", progress=False)
    frame = load_manifest(tmp_path / "out")
    assert list(frame.columns) == list(MANIFEST_COLUMNS)
    assert (frame["label"] == "").all()
    assert (frame["split"] == "").all()


def test_load_manifest_errors(tmp_path, archive):
    with pytest.raises(DataError, match="not found; run `medxfer ingest"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    pd.DataFrame({"image_id": ["x"], "label": ["1"]}).to_parquet(tmp_path / "bad" / "manifest.parquet")
    with pytest.raises(DataError, match=r"missing \['subject_id'"):
        load_manifest(tmp_path / "bad")


def test_read_volume_by_row_or_id(tmp_path, archive):
    src, labels = archive
    ingest(src, labels, tmp_path / "out", progress=False)
    row = load_manifest(tmp_path / "out").iloc[0]
    by_row, affine = read_volume(tmp_path / "out", row)
    by_id, _ = read_volume(tmp_path / "out", row["image_id"])
    assert by_row.dtype == np.float32
    assert affine.shape == (4, 4)
    assert list(by_row.shape) == row["shape"]
    np.testing.assert_array_equal(by_row, by_id)
    (tmp_path / "out" / row["image_path"]).unlink()
    with pytest.raises(DataError, match="is missing; re-run"):
        read_volume(tmp_path / "out", row)


def test_training_ingest_is_strict_by_default(tmp_path, archive):
    """`train`/`run` stop on a quarantined file before any training; `data.strict: false` goes on."""
    from pipeline.config import Config
    from pipeline.run import ensure_manifest

    src, labels = archive  # holds d/notes.txt, which ingest quarantines
    cfg = Config()
    cfg.data.source, cfg.data.labels, cfg.data.manifest = str(src), str(labels), str(tmp_path / "out")
    assert cfg.data.strict is True
    with pytest.raises(DataError, match=r"(?s)1 file\(s\) quarantined.*not-dicom +src-.*data\.strict: false"):
        ensure_manifest(cfg, progress=False)
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    cfg.data.strict = False
    ensure_manifest(cfg, progress=False)
    assert len(load_manifest(tmp_path / "out")) == 6


def test_every_evaluation_of_a_test_split_is_counted_beside_the_manifest(tmp_path):
    import json

    from pipeline.run.cohort import TEST_LOG, count_test_evaluation

    ids = ["img-b", "img-a", "img-c"]
    first = count_test_evaluation(tmp_path, ids, "run1")
    assert count_test_evaluation(tmp_path, list(reversed(ids)), "run2") == (first[0], 2)  # order does not matter
    other, n = count_test_evaluation(tmp_path, [*ids, "img-d"], "run3")  # a changed split starts its own count
    assert other != first[0] and n == 1
    log = json.loads((tmp_path / TEST_LOG).read_text())
    assert log[first[0]] == {"count": 2, "runs": ["run1", "run2"]}
    (tmp_path / TEST_LOG).write_text("{not json")  # a damaged log restarts rather than stopping evaluation
    assert count_test_evaluation(tmp_path, ids, "run4")[1] == 1
