"""Hostile archives: memory bombs, size mismatches, truncation, duplicates and symlinks end in quarantine
with the right reason, every file is accounted for, and the console lists every exclusion."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from crashing_task import twice_or_die
from dicom_factory import (
    cr_image,
    ct_series,
    ct_slice,
    deflated,
    encapsulated,
    rle_bomb,
    save,
    write_nifti,
)
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from pipeline.cli import main
from pipeline.config import from_dict
from pipeline.errors import ConfigError, DataError
from pipeline.ingest import ingest, load_manifest, read_volume
from pipeline.ingest.dicom import read_header
from pipeline.ingest.dicom_deflate import file_meta
from pipeline.ingest.manifest import _Runner
from pipeline.ingest.nifti import UnitError

ROOT = Path(__file__).resolve().parents[1]
KEY = b"k" * 32


@pytest.fixture(autouse=True)
def _key(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDXFER_KEY_FILE", str(tmp_path / "keys" / "pseudonym.key"))


def _quarantine(out: Path) -> dict[str, tuple[str, str]]:
    q = pd.read_csv(out / "quarantine.csv", keep_default_na=False)
    return {row.path: (row.reason, row.detail) for row in q.itertuples()}


def _cut_before_pixels(path: Path) -> bytes:
    """The file's bytes up to (not including) its PixelData element: cut at an element boundary."""
    data = path.read_bytes()
    return data[: data.rindex(b"\xe0\x7f\x10\x00")]


def hostile_archive(src: Path, outside: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Good files and hostile ones (each tiny on disk) under `src`; a folder and a file outside it.

    Returns:
        (relpath → expected quarantine reason, relpath of a good single-file unit → its stored values).
    """
    ct_series(src / "good" / "ct", n=3)
    good = {"good/cr.dcm": cr_image(src / "good" / "cr.dcm", mono1=False).astype(np.float64)}
    flat = ct_slice(shape=(6, 5))
    deflated(src / "good" / "deflated.dcm", flat)
    good["good/deflated.dcm"] = flat.pixel_array.astype(np.float64)
    expected = {
        "bombs/rle-65535x65535.dcm": "too-large",
        "bombs/deflate-2gib-pixels.dcm": "size-mismatch",
        "bombs/deflate-2gib-trailer.dcm": "size-mismatch",
        "bombs/deflate-declares-65535x65535.dcm": "too-large",
        "bombs/short-pixels.dcm": "size-mismatch",
        "bombs/billion-frames.dcm": "too-large",
        "bombs/frames-without-fragments.dcm": "size-mismatch",
        "cut/before-pixels.dcm": "truncated",
        "cut/inside-pixels.dcm": "truncated",
        "zz-copies/cr-1.dcm": "duplicate-of",
        "zz-copies/cr-2.dcm": "duplicate-of",
        "linked-in.dcm": "duplicate-of",
        "linked-out.dcm": "outside-source",
    }
    rle_bomb(src / "bombs" / "rle-65535x65535.dcm")
    deflated(src / "bombs" / "deflate-2gib-pixels.dcm", ct_slice(shape=(64, 64)), extra_zero_bytes=2 << 30)
    deflated(src / "bombs" / "deflate-2gib-trailer.dcm", ct_slice(), trailer_zero_bytes=2 << 30)
    deflated(src / "bombs" / "deflate-declares-65535x65535.dcm", ct_slice(), declared=(65535, 65535))
    short = ct_slice()
    short.Rows = short.Columns = 4096  # 32 bytes of pixel data under a header needing 32 MiB
    save(short, src / "bombs" / "short-pixels.dcm")
    frames = ct_slice(shape=(1, 1))
    frames.compress(RLELossless)
    frames.NumberOfFrames = 1_000_000_000  # 1e9 voxels, within the limit, but a billion frames to plan
    save(frames, src / "bombs" / "billion-frames.dcm")
    frames.NumberOfFrames = 50_000  # under the frame limit; one RLE fragment cannot hold them
    frames.SOPInstanceUID = generate_uid()
    save(frames, src / "bombs" / "frames-without-fragments.dcm")
    whole = save(ct_slice(shape=(16, 16)), src / "cut" / "whole.dcm")
    (src / "cut" / "before-pixels.dcm").write_bytes(_cut_before_pixels(whole))
    (src / "cut" / "inside-pixels.dcm").write_bytes(whole.read_bytes()[:-100])
    whole.unlink()
    for copy in ("cr-1.dcm", "cr-2.dcm"):
        (src / "zz-copies").mkdir(exist_ok=True)
        (src / "zz-copies" / copy).write_bytes((src / "good" / "cr.dcm").read_bytes())
    (src / "linked-in.dcm").symlink_to(sorted((src / "good" / "ct").iterdir())[0])
    save(ct_slice(patient_id="OUTSIDE01"), outside / "elsewhere.dcm")
    (src / "linked-out.dcm").symlink_to(outside / "elsewhere.dcm")
    ct_series(outside / "folder", n=2, patient_id="OUTSIDE02")
    (src / "linked-folder").symlink_to(outside / "folder", target_is_directory=True)
    (src / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return expected, good


def _check_outcome(out: Path, expected: dict[str, str], good: dict[str, np.ndarray]) -> None:
    """Every hostile file quarantined with its reason, every good file in a unit, nothing else."""
    q = _quarantine(out)
    assert {p: r for p, (r, _) in q.items()} == expected
    assert q["zz-copies/cr-1.dcm"][1] == q["zz-copies/cr-2.dcm"][1] == "good/cr.dcm"  # the kept copy
    assert q["linked-in.dcm"][1].startswith("good/ct/")
    frame = load_manifest(out)
    assert sorted(frame["n_files"]) == [1, 1, 3]
    volumes = [read_volume(out, i)[0][:, :, 0] for i in frame.loc[frame["n_files"] == 1, "image_id"]]
    cr, ct = good["good/cr.dcm"], good["good/deflated.dcm"]
    assert any(v.shape == cr.T.shape and np.array_equal(v, cr.T) for v in volumes)  # no geometry: x = column
    assert any(v.shape == ct.T.shape and np.array_equal(v, ct.T[::-1, ::-1]) for v in volumes)  # axial LPS → RAS
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["files_seen"] == len(expected) + 5  # 5 good files: 3 CT slices, the CR, the deflated slice
    assert report["files_in_units"] == 5
    assert report["skipped"] == {"hidden": 1, "symlinked_folders": 1}


@pytest.mark.parametrize("workers", [1, 2])
def test_hostile_archive_is_quarantined_with_reasons(tmp_path, workers):
    expected, good = hostile_archive(tmp_path / "src", tmp_path / "outside")
    result = ingest(tmp_path / "src", None, tmp_path / "out", progress=False, workers=workers)
    _check_outcome(tmp_path / "out", expected, good)
    assert result.n_units == 3
    assert result.n_quarantined == len(expected)


def test_capped_address_space_survives_the_bombs(tmp_path):
    """The hostile archive ingests under RLIMIT_AS = (address space after imports) + 1 GiB; the
    RLE bomb alone, with the voxel limit lifted, does not (so the cap binds)."""
    expected, good = hostile_archive(tmp_path / "src", tmp_path / "outside")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def capped(src: Path, out: Path, *extra: str) -> dict:
        facts = out.with_suffix(".json")
        cmd = [sys.executable, str(ROOT / "tests" / "capped_ingest.py"), str(1 << 30), str(facts)]
        proc = subprocess.run(
            [*cmd, "ingest", str(src), "--out", str(out), *extra], env=env, capture_output=True, text=True
        )
        return {
            "returncode": proc.returncode,
            "stderr": proc.stderr,
            **(json.loads(facts.read_text()) if facts.exists() else {}),
        }

    run = capped(tmp_path / "src", tmp_path / "out")
    assert run["returncode"] == 0, run["stderr"][-2000:]
    _check_outcome(tmp_path / "out", expected, good)
    assert run["vmpeak_kb"] * 1024 <= run["cap_bytes"]
    print(f"hostile archive under a {run['cap_bytes'] / 2**30:.2f} GiB cap: peak RSS {run['vmhwm_kb'] / 1024:.0f} MiB")
    (tmp_path / "rle").mkdir()
    (tmp_path / "src" / "bombs" / "rle-65535x65535.dcm").rename(tmp_path / "rle" / "rle.dcm")
    control = capped(tmp_path / "rle", tmp_path / "out-rle", "--max-voxels", str(10**10))
    quarantined = _quarantine(tmp_path / "out-rle") if (tmp_path / "out-rle" / "quarantine.csv").exists() else {}
    # killed (the RLE plugin aborts when an allocation fails) or MemoryError → too-large "out of memory"
    assert control["returncode"] != 0 or "out of memory" in quarantined["rle.dcm"][1]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the cut values; ingest runs it quietly
@pytest.mark.parametrize("kind", ["native", "deflated"])
def test_a_file_cut_anywhere_after_its_meta_is_truncated(tmp_path, kind):
    """Never not-dicom, no-pixel-data or decode-error: every cut after the 'DICM' magic is `truncated`."""
    path = tmp_path / "whole.dcm"
    if kind == "native":
        save(ct_slice(shape=(8, 8)), path)
    else:
        deflated(path, ct_slice(shape=(8, 8)))
    data, meta = path.read_bytes(), file_meta(path)
    assert meta is not None
    cut = tmp_path / "cut.dcm"
    reasons = {}
    assert data[128:132] == b"DICM" and meta[1] > 300  # cuts inside the file meta information too
    for end in range(132, len(data)):
        cut.write_bytes(data[:end])
        with pytest.raises(UnitError) as err:
            read_header(cut, "cut.dcm", KEY)
        reasons[end] = err.value.reason
    assert set(reasons.values()) == {"truncated"}, {e: r for e, r in reasons.items() if r != "truncated"}


def test_an_image_unit_over_max_voxels_is_too_large_and_the_limit_is_reread(tmp_path):
    ct_series(tmp_path / "src" / "ct", n=4, rows=5, cols=6)  # 30 voxels a file, 120 the unit
    cr_image(tmp_path / "src" / "cr.dcm", rows=7, cols=5)  # 35 voxels
    out = tmp_path / "out"
    result = ingest(tmp_path / "src", None, out, progress=False, max_voxels=100)
    q = _quarantine(out)
    assert result.n_units == 1
    assert sorted(p for p, (r, _) in q.items() if r == "too-large") == sorted(
        f"ct/{p.name}" for p in (tmp_path / "src" / "ct").iterdir()
    )
    assert all(
        "the image unit (4 file(s), 4 frame(s)) holds 120 voxels, over the limit of 100" in d for _, d in q.values()
    )
    ingest(tmp_path / "src", None, out, progress=False, max_voxels=32)  # the CR is now too large at scan
    assert _quarantine(out)["cr.dcm"][0] == "too-large"
    assert load_manifest(out).empty
    result = ingest(tmp_path / "src", None, out, progress=False)  # default limit: cached verdicts do not stick
    assert (result.n_units, result.n_quarantined) == (2, 0)


def test_max_voxels_must_be_positive(tmp_path):
    (tmp_path / "src").mkdir()
    assert main(["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--max-voxels", "0"]) == 2
    with pytest.raises(ConfigError, match=r"data.max_voxels: must be ≥ 1, got 0"):
        from_dict({"data": {"max_voxels": 0}})
    assert from_dict({"data": {"max_voxels": 10**9}}).data.max_voxels == 10**9


def test_console_lists_every_exclusion_without_ids_or_tracebacks(tmp_path):
    """Issue 16: duplicates, conflicting labels and label rows without images are counted on the
    console, next to quarantine reasons; a failing decoder's traceback and the patient folders are not shown."""
    src = tmp_path / "src"
    ct_series(src / "MRN0001_Quixote", n=3, patient_id="MRN0001")
    cr_image(src / "MRN0002_Panza" / "cr.dcm", patient_id="MRN0002")
    cr_image(src / "MRN0003_Rocinante" / "cr.dcm", patient_id="MRN0003")
    for copy in ("copy-1.dcm", "copy-2.dcm"):
        (src / "MRN0002_Panza" / copy).write_bytes((src / "MRN0002_Panza" / "cr.dcm").read_bytes())
    whole = save(ct_slice(patient_id="MRN0004"), src / "MRN0004_Dulcinea" / "ct.dcm")
    whole.write_bytes(_cut_before_pixels(whole))
    rle_bomb(src / "MRN0005_Sanson" / "huge.dcm")
    encapsulated(src / "MRN0006_Teresa" / "broken.dcm", JPEG2000Lossless)  # the decoder plugin logs a traceback
    (src / ".DS_Store").write_bytes(b"\x00")
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label\nMRN0001,1\nMRN0002,0\nMRN0002,1\nMRN0009,1\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "ingest",
        str(src),
        "--labels",
        str(labels),
        "--out",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console
    assert (
        "10 files: 5 in 3 image units, 3 quarantined (1 decode-error, 1 too-large, 1 truncated), "
        "2 duplicates (duplicate-of)" in console
    )
    assert "skipped: 1 hidden file or folder" in console
    assert (
        "labels: 1 labels row for a patient with no images; 1 patient with conflicting labels rows: unlabelled; "
        "2 image units without a label (kept, in no split)" in console
    )
    assert "Traceback" not in console and "Error" not in console, console
    assert not any(s in console for s in ("MRN", "Quixote", "Panza", "Rocinante")), console
    q = _quarantine(tmp_path / "out")
    for copy in ("copy-2.dcm", "cr.dcm"):  # the first copy by path is kept
        assert q[f"MRN0002_Panza/{copy}"] == ("duplicate-of", "MRN0002_Panza/copy-1.dcm")


def test_same_uid_copies_are_duplicates_and_different_files_collide(tmp_path):
    """A byte-identical copy is duplicate-of the kept file (strict lets it pass); a different file
    with the same SOPInstanceUID is a uid-collision (strict stops)."""
    src = tmp_path / "src"
    cr_image(src / "a.dcm", seed=1)
    (src / "b-copy.dcm").write_bytes((src / "a.dcm").read_bytes())
    result = ingest(src, None, tmp_path / "out", progress=False, strict=True)
    assert (result.n_units, _quarantine(tmp_path / "out")) == (1, {"b-copy.dcm": ("duplicate-of", "a.dcm")})
    other = pydicom.dcmread(src / "a.dcm")
    other.PixelData = bytes(len(other.PixelData))  # same UIDs, other pixels
    other.save_as(src / "c-other.dcm")
    with pytest.raises(DataError, match=r"1 file\(s\) quarantined(?s:.*)uid-collision +src-[0-9a-f]{16}: same "):
        ingest(src, None, tmp_path / "out", progress=False, strict=True)  # files by reference: paths may name patients
    strict = pd.read_csv(tmp_path / "out" / "quarantine-strict.csv", dtype=str, keep_default_na=False)
    assert list(strict["path"]) == ["c-other.dcm"] and list(strict["reason"]) == ["uid-collision"]
    ingest(src, None, tmp_path / "out", progress=False)
    reason, detail = _quarantine(tmp_path / "out")["c-other.dcm"]
    assert (reason, detail) == ("uid-collision", "same SOPInstanceUID as a.dcm (kept), different content")


def test_a_nifti_declaring_too_many_voxels_is_never_loaded(tmp_path):
    """A 100-byte .nii.gz header declaring 4000 × 4000 × 400 voxels (no data) is too-large, not read."""
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    img.header.set_data_shape((4000, 4000, 400))
    (tmp_path / "src").mkdir()
    header = img.header.binaryblock + b"\x00" * 4  # the header and its extension flag, no voxels
    (tmp_path / "src" / "bomb.nii.gz").write_bytes(gzip.compress(header))
    write_nifti(tmp_path / "src" / "small.nii", np.ones((4, 4, 4), np.int16), np.eye(4))
    result = ingest(tmp_path / "src", None, tmp_path / "out", progress=False, max_voxels=100)
    q = _quarantine(tmp_path / "out")
    assert (result.n_units, q["bomb.nii.gz"][0]) == (1, "too-large")
    assert "6,400,000,000 voxels, over the limit of 100" in q["bomb.nii.gz"][1]


def test_a_dead_worker_costs_only_its_own_task():
    """With a pool, the task that kills its worker gets the crash result; every other task its own result."""
    with _Runner(2, progress=False) as run:
        results = run.map(twice_or_die, [(i, 3) for i in range(6)], "tasks", [1] * 6, lambda value, fatal: "died")
        assert results == [0, 2, 4, "died", 8, 10]
        assert run.map(twice_or_die, [(i, -1) for i in range(3)], "again", [1] * 3) == [0, 2, 4]  # a fresh pool
