"""Tests for pipeline.synthetic: realistic synthetic DICOM cohorts with a known answer."""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from pipeline.errors import ConfigError
from pipeline.synthetic import KINDS, SyntheticCohort, make_cohort
from pipeline.synthetic.ct import _ct_phantom
from pipeline.synthetic.cxr import _chest_image, _cxr_anatomy
from pipeline.synthetic.patients import Patient, make_patients

HEADERS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "AccessionNumber",
    "InstitutionName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StudyDate",
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "BodyPartExamined",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "PixelSpacing",
    "InstanceNumber",
    "SeriesNumber",
    "SeriesDescription",
)
HEX = re.compile(r"^[0-9A-Fa-f]+$")


def _files(cohort: SyntheticCohort) -> list[Path]:
    return sorted(p for p in cohort.archive_dir.rglob("*") if p.is_file())


def _read_all(cohort: SyntheticCohort) -> list[tuple[Path, Dataset]]:
    return [(f, pydicom.dcmread(f)) for f in _files(cohort)]


def _labels(cohort: SyntheticCohort) -> list[dict[str, str]]:
    with cohort.labels_csv.open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cxr(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCohort:
    return make_cohort(tmp_path_factory.mktemp("cxr"), "cxr2d", n=16, seed=3)


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCohort:
    return make_cohort(tmp_path_factory.mktemp("ct"), "ct3d", n=4, seed=1, positive_fraction=0.5)


@pytest.mark.parametrize("which", ["cxr", "ct"])
def test_files_decode_with_full_headers_and_file_meta(which: str, request: pytest.FixtureRequest) -> None:
    cohort = request.getfixturevalue(which)
    files = _read_all(cohort)
    assert len(files) == cohort.n_files > 0
    for path, ds in files:
        assert path.read_bytes()[128:132] == b"DICM"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        missing = [k for k in HEADERS if k not in ds or ds[k].value in (None, "")]
        assert not missing, f"{path.name}: {missing}"
        assert re.fullmatch(r"MRN\d{7}", ds.PatientID)
        assert re.fullmatch(r"[A-Z]+\^[A-Z]+", str(ds.PatientName))
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_files_are_byte_identical_to_pydicom_dcmwrite(cxr: SyntheticCohort, ct: SyntheticCohort) -> None:
    for path in _files(cxr)[:5] + _files(ct)[:5]:
        ds = pydicom.dcmread(path)
        fresh = Dataset()
        for elem in ds:
            fresh.add(pydicom.DataElement(elem.tag, elem.VR, elem.value))
        fresh.file_meta = ds.file_meta
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, fresh, enforce_file_format=True)
        assert buf.getvalue() == path.read_bytes(), path.name


def test_cxr_images_look_like_chest_radiographs(cxr: SyntheticCohort) -> None:
    photometric = set()
    for _, ds in _read_all(cxr):
        expected_sop = {
            "DX": pydicom.uid.DigitalXRayImageStorageForPresentation,
            "CR": pydicom.uid.ComputedRadiographyImageStorage,
        }
        assert ds.SOPClassUID == expected_sop[ds.Modality]
        assert (ds.BitsStored, ds.PixelRepresentation) == (12, 0)
        assert 1.3 < float(ds.PixelSpacing[0]) < 1.5
        img = ds.pixel_array.astype(float)
        assert img.max() <= 4095
        assert img.shape[0] == 256
        photometric.add(ds.PhotometricInterpretation)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            img = 4095 - img
        corner, centre = img[:20, :8].mean(), img[120:200, 118:138].mean()
        assert corner + 500 < centre  # air outside the body darker than the mediastinum


def test_cxr_has_monochrome1_and_monochrome2(cxr: SyntheticCohort) -> None:
    counts: dict[str, int] = defaultdict(int)
    for _, ds in _read_all(cxr):
        counts[ds.PhotometricInterpretation] += 1
    assert counts["MONOCHROME1"] >= 1
    assert counts["MONOCHROME2"] > counts["MONOCHROME1"]


def test_cxr_studies_have_one_or_two_series(cxr: SyntheticCohort) -> None:
    series: dict[str, set[str]] = defaultdict(set)
    for _, ds in _read_all(cxr):
        series[ds.StudyInstanceUID].add(ds.SeriesInstanceUID)
    sizes = [len(v) for v in series.values()]
    assert len(series) == cxr.n_patients
    assert set(sizes) == {1, 2}


def test_cxr_opacity_is_faint_local_and_inside_the_lung() -> None:
    patient = make_patients(np.random.default_rng(0), 4, 0.5, 0)[0]
    anat = _cxr_anatomy(np.random.default_rng(1), patient)
    finding = {"side": 1.0, "du": 0.2, "dv": -0.2, "r": 0.08, "c": 0.2}
    with_, without = (_chest_image(np.random.default_rng(2), anat, f, (256, 256)) for f in (finding, None))
    diff = with_.astype(float) - without.astype(float)
    changed = diff > 50
    assert 0.002 < changed.mean() < 0.03  # a small round patch, not a global shift
    rows, cols = np.nonzero(changed)
    assert cols.mean() > 128  # side +1 = patient's left lung = image right
    assert without[rows, cols].mean() < np.median(without)  # it sits on dark lung


def test_ct_values_are_hounsfield_units(ct: SyntheticCohort) -> None:
    for _, ds in _read_all(ct):
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert (ds.BitsAllocated, ds.PixelRepresentation) == (16, 1)
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
        assert ds.pixel_array.dtype == np.int16
    for vol, spacing in _ct_volumes(ct).values():
        hu = vol[len(vol) // 2]
        assert hu[:3, :3].max() < -900  # air in the corners
        assert -100 < np.median(hu[28:36, 28:36]) < 100  # mediastinum: soft tissue
        col = round(31.5 - 0.38 * 31.5)
        assert np.median(hu[26:34, col - 3 : col + 3]) < -600  # right lung
        assert vol.max() > 500  # spine and ribs
        assert 0.6 <= spacing <= 0.8


def _ct_volumes(ct: SyntheticCohort) -> dict[str, tuple[np.ndarray, float]]:
    by_series: dict[str, list[Dataset]] = defaultdict(list)
    for _, ds in _read_all(ct):
        by_series[ds.SeriesInstanceUID].append(ds)
    out = {}
    for uid, dss in by_series.items():
        dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
        vol = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
        out[uid] = (vol, float(dss[0].PixelSpacing[0]))
    return out


def test_ct_geometry_is_consistent(ct: SyntheticCohort) -> None:
    by_series: dict[str, list[Dataset]] = defaultdict(list)
    for _, ds in _read_all(ct):
        by_series[ds.SeriesInstanceUID].append(ds)
    for dss in by_series.values():
        assert 24 <= len(dss) <= 40
        assert (dss[0].Rows, dss[0].Columns) == (64, 64)
        dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
        z = np.array([float(d.ImagePositionPatient[2]) for d in dss])
        np.testing.assert_allclose(np.diff(z), 2.5, atol=0.011)
        np.testing.assert_allclose([float(d.SliceLocation) for d in dss], z)
        assert {tuple(map(float, d.ImageOrientationPatient)) for d in dss} == {(1, 0, 0, 0, 1, 0)}
        assert len({tuple(map(float, d.ImagePositionPatient[:2])) for d in dss}) == 1
        assert {float(d.SliceThickness) for d in dss} == {2.5}
        assert sorted(d.InstanceNumber for d in dss) == list(range(1, len(dss) + 1))


def test_ct_studies_have_two_kernels_and_instance_number_order_varies(ct: SyntheticCohort) -> None:
    studies: dict[str, dict[str, list[Dataset]]] = defaultdict(lambda: defaultdict(list))
    for _, ds in _read_all(ct):
        studies[ds.StudyInstanceUID][ds.SeriesInstanceUID].append(ds)
    orders = set()
    for series in studies.values():
        assert len(series) == 2
        descs = sorted(s[0].SeriesDescription.split()[-1] for s in series.values())
        assert descs == ["LUNG", "STANDARD"]
        assert len({s[0].FrameOfReferenceUID for s in series.values()}) == 1
        for dss in series.values():
            by_instance = sorted(dss, key=lambda d: d.InstanceNumber)
            z = [float(d.ImagePositionPatient[2]) for d in by_instance]
            orders.add("ascending" if z == sorted(z) else "descending")
            assert z in (sorted(z), sorted(z, reverse=True))
    assert orders == {"ascending", "descending"}  # sorting by InstanceNumber is wrong somewhere


def test_ct_nodule_is_small_solid_and_in_the_lung() -> None:
    patients = make_patients(np.random.default_rng(0), 4, 0.5, 0)
    pos = next(p for p in patients if p.label == 1)
    neg = Patient(**{**pos.__dict__, "label": 0})
    with_ = _ct_phantom(np.random.default_rng(5), 30, 0.7, pos)
    without = _ct_phantom(np.random.default_rng(5), 30, 0.7, neg)
    changed = np.abs(with_ - without) > 1
    voxel_mm3 = 2.5 * 0.7 * 0.7
    assert 4 / 3 * np.pi * 1.5**3 < changed.sum() * voxel_mm3 < 4 / 3 * np.pi * 4.5**3
    assert without[changed].mean() < -500  # placed in the lung
    assert 20 <= with_[changed].max() <= 60  # solid, soft-tissue density core


def test_archive_layout_hides_structure(cxr: SyntheticCohort) -> None:
    files = _files(cxr)
    suffixes = {f.suffix for f in files}
    assert suffixes == {"", ".dcm"}
    for f in files:
        rel = f.relative_to(cxr.archive_dir).parts
        assert len(rel) == 3
        assert all(HEX.match(part) for part in rel[:2])
        assert HEX.match(f.stem)
    folders_per_study: dict[str, set[Path]] = defaultdict(set)
    for path, ds in _read_all(cxr):
        folders_per_study[ds.StudyInstanceUID].add(path.parent.parent)
    assert all(len(v) == 1 for v in folders_per_study.values())


def test_ct_series_files_are_spread_and_named_out_of_slice_order(ct: SyntheticCohort) -> None:
    by_series: dict[str, list[tuple[Path, float]]] = defaultdict(list)
    for path, ds in _read_all(ct):
        by_series[ds.SeriesInstanceUID].append((path, float(ds.ImagePositionPatient[2])))
    for items in by_series.values():
        assert len({path.parent for path, _ in items}) > 1
        z_by_name = [z for _, z in sorted(items, key=lambda item: item[0].name)]
        assert z_by_name not in (sorted(z_by_name), sorted(z_by_name, reverse=True))


def test_labels_match_dicom_patients(cxr: SyntheticCohort) -> None:
    rows = _labels(cxr)
    assert list(rows[0]) == ["patient_id", "label", "sex", "age", "site"]
    by_id = {r["patient_id"]: r for r in rows}
    assert len(by_id) == len(rows) == cxr.n_patients
    seen = set()
    manufacturer_by_site: dict[str, set[str]] = defaultdict(set)
    for _, ds in _read_all(cxr):
        row = by_id[ds.PatientID]
        seen.add(ds.PatientID)
        assert row["sex"] == ds.PatientSex
        assert int(row["age"]) == int(ds.PatientAge[:3])
        manufacturer_by_site[row["site"]].add(ds.Manufacturer)
    assert seen == set(by_id)
    assert {r["label"] for r in rows} == {"0", "1"}
    assert all(len(m) == 1 for m in manufacturer_by_site.values())
    assert sum(int(r["label"]) for r in rows) == cxr.n_positive == round(0.3 * 16)


@pytest.mark.parametrize(("n", "fraction", "expected"), [(10, 0.5, 5), (8, 0.25, 2), (4, 0.01, 1)])
def test_positive_fraction_is_honoured(tmp_path: Path, n: int, fraction: float, expected: int) -> None:
    cohort = make_cohort(tmp_path, "cxr2d", n=n, seed=0, positive_fraction=fraction)
    labels = [int(r["label"]) for r in _labels(cohort)]
    assert cohort.n_positive == sum(labels) == expected
    assert len(labels) == n


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    def snapshot(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    a = snapshot(make_cohort(tmp_path / "a", "cxr2d", n=5, seed=11).root)
    b = snapshot(make_cohort(tmp_path / "b", "cxr2d", n=5, seed=11).root)
    c = snapshot(make_cohort(tmp_path / "c", "cxr2d", n=5, seed=12).root)
    assert a == b
    assert set(a) != set(c)


def test_rerun_replaces_own_archive_but_refuses_a_foreign_one(tmp_path: Path) -> None:
    first = make_cohort(tmp_path / "out", "ct3d", n=4, seed=0)
    again = make_cohort(tmp_path / "out", "cxr2d", n=4, seed=0)
    assert len(_files(again)) == again.n_files != first.n_files
    foreign = tmp_path / "foreign"
    (foreign / "archive").mkdir(parents=True)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        make_cohort(foreign, "cxr2d", n=4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "cxr"}, r"unknown synthetic kind 'cxr' \(did you mean 'cxr2d'\?\)"),
        ({"kind": "mri"}, r"expected one of cxr2d, ct3d"),
        ({"n": 3}, r"n=3 is invalid; expected an integer >= 4"),
        ({"positive_fraction": 0.0}, r"positive_fraction=0.0 is outside \(0, 1\)"),
        ({"positive_fraction": 1.0}, r"positive_fraction=1.0 is outside"),
    ],
)
def test_bad_arguments_raise_config_error(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        make_cohort(tmp_path, **kwargs)
    assert info.value.exit_code == 2
    assert not (tmp_path / "archive").exists()


def test_progress_bar_is_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_cohort(tmp_path, "cxr2d", n=4, progress=True)
    assert "synth cxr2d" in capsys.readouterr().err
    assert KINDS == ("cxr2d", "ct3d")
