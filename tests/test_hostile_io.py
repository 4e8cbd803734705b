"""Hospital networks (issue 15): concurrent runs on one folder, full disks, free-text labels, paths in errors.

Concurrency uses real processes (`python -m pipeline ...`). A holder is parked at a known point
with its lock held by giving it a named pipe as key file: it blocks reading the key until the
test writes one, or kills it. Full disks are small tmpfs mounts (root only; skipped otherwise).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import TEST_KEY_HEX, fixed_key
from dicom_factory import cr_image, ct_series

from pipeline import tracking
from pipeline.cli import main
from pipeline.errors import BusyError, ConfigError, DataError
from pipeline.ingest import ingest, load_manifest
from pipeline.io import LOCK_NAME, exclusive, is_temp
from pipeline.synthetic import make_cohort

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
FAKE_NAME = "Dr Jane Roe"


def _medxfer(*args: object) -> list[str]:
    return [sys.executable, "-m", "pipeline", *map(str, args)]


def _parked(tmp_path: Path, *args: object) -> tuple[subprocess.Popen, Path]:
    """Start `medxfer ARGS --key-file FIFO`: it takes its lock, then waits for a key on the named pipe."""
    fifo = tmp_path / f"key-{time.monotonic_ns()}.fifo"
    os.mkfifo(fifo, 0o600)
    log = (tmp_path / f"{fifo.name}.stderr").open("w")
    proc = subprocess.Popen(_medxfer(*args, "--key-file", fifo), env=ENV, stdout=log, stderr=log, cwd=tmp_path)
    return proc, fifo


def _wait_for_lock(lock: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until `proc` has written its PID into `lock` (it holds the flock by then)."""
    deadline = time.monotonic() + timeout
    while f"PID {proc.pid} " not in (lock.read_text() if lock.exists() else ""):
        assert proc.poll() is None, f"the holder exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"the holder never took {lock}"
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _consistent(manifest_dir: Path) -> pd.DataFrame:
    """The manifest, after checking every row's image exists and images/ holds nothing else (no temp files)."""
    frame = load_manifest(manifest_dir)
    images = {p.name for p in (manifest_dir / "images").iterdir()}
    assert all((manifest_dir / p).is_file() for p in frame["image_path"])
    assert images == {f"{i}.nii" for i in frame["image_id"]}, sorted(images - {f"{i}.nii" for i in frame["image_id"]})
    return frame


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict:
    """Synthetic CXR archives: `small` (4 patients), `cxr` (8) and `big` (30), and the fixed key file."""
    root = tmp_path_factory.mktemp("hostile")
    return {
        "small": make_cohort(root / "small", kind="cxr2d", n=4, seed=5),
        "cxr": make_cohort(root / "cxr", kind="cxr2d", n=8, seed=3),
        "big": make_cohort(root / "big", kind="cxr2d", n=30, seed=4),
        "key": fixed_key(root / "keys" / "pseudonym.key"),
    }


# ---------------------------------------------------------------------------------------------- locks


def test_a_lock_is_exclusive_refuses_at_once_and_is_free_again_after_release(tmp_path):
    lock = tmp_path / "out" / LOCK_NAME
    with exclusive(lock, "manifest folder out"):
        other = subprocess.run(
            [sys.executable, "-c", f"from pipeline.io import exclusive\nwith exclusive({str(lock)!r}, 'x'): pass"],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert other.returncode != 0 and f"PID {os.getpid()} " in other.stderr
        with pytest.raises(BusyError, match=rf"in use by another medxfer process \(PID {os.getpid()} on "):
            with exclusive(lock, "manifest folder out"):  # a second open file: flock refuses it too
                pass
    assert lock.read_text() == ""  # released: no stale PID left for the next reader
    with exclusive(lock, "manifest folder out"):
        assert f"PID {os.getpid()} " in lock.read_text()


def test_a_second_ingest_refuses_at_once_naming_the_holder_and_a_killed_holders_lock_is_taken(tmp_path, cohorts):
    small, big, key = cohorts["small"], cohorts["big"], cohorts["key"]
    out = tmp_path / "manifest"
    ingest(small.archive_dir, small.labels_csv, out, key_file=key, progress=False)  # the manifest others use
    before = _consistent(out)
    holder, _ = _parked(tmp_path, "ingest", big.archive_dir, "--labels", big.labels_csv, "--out", out)
    try:
        _wait_for_lock(out / LOCK_NAME, holder)
        second = subprocess.run(
            _medxfer("ingest", small.archive_dir, "--labels", small.labels_csv, "--out", out, "--key-file", key),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 1
        assert f"manifest folder {out} is in use by another medxfer process (PID {holder.pid} " in second.stderr
        assert "Traceback" not in second.stderr and "Fix: wait for that run" in second.stderr
        assert holder.poll() is None  # refused while the holder still runs: it did not wait for it
    finally:
        _kill(holder)
    assert _consistent(out).equals(before)
    result = ingest(big.archive_dir, big.labels_csv, out, key_file=key, progress=False)  # takes the dead lock
    assert result.n_units == len(_consistent(out)) > len(before)


def test_an_ingest_killed_while_writing_images_leaves_a_consistent_manifest(tmp_path, cohorts):
    small, big, key = cohorts["small"], cohorts["big"], cohorts["key"]
    out = tmp_path / "manifest"
    ingest(small.archive_dir, small.labels_csv, out, key_file=key, progress=False)
    before, manifest = _consistent(out), (out / "manifest.parquet").read_bytes()
    old = {f"{i}.nii" for i in before["image_id"]}
    holder, fifo = _parked(tmp_path, "ingest", big.archive_dir, "--labels", big.labels_csv, "--out", out)
    try:
        _wait_for_lock(out / LOCK_NAME, holder)
        fifo.write_text(TEST_KEY_HEX + "\n")  # go on: scan, then decode and write images
        deadline = time.monotonic() + 300
        while not {p.name for p in (out / "images").iterdir()} - old:  # its first new image (or temp file)
            assert holder.poll() is None and time.monotonic() < deadline, "the holder never wrote an image"
            time.sleep(0.005)
    finally:
        _kill(holder)
    assert (out / "manifest.parquet").read_bytes() == manifest  # killed mid-write: the previous manifest...
    assert all((out / p).is_file() for p in before["image_path"])  # ...and every image it names are intact
    result = ingest(big.archive_dir, big.labels_csv, out, key_file=key, progress=False)  # takes the dead lock
    after = _consistent(out)  # the killed run's images are reused or removed; none is orphaned
    assert len(after) == result.n_units == big.n_files
    assert not any(is_temp(p) for p in (out / "images").iterdir())


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    """A registered random-init tf_efficientnet_lite0 (64×64, 2D xray) in a sqlite MLflow store."""
    import torch

    from pipeline.adapt import CalibratedNet, build_model
    from pipeline.prepare import make_spec
    from pipeline.run import log_packaged

    root = tmp_path_factory.mktemp("hostile-mlflow")
    uri = tracking.connect(f"sqlite:///{root / 'mlflow.db'}")
    torch.manual_seed(0)
    net, _ = build_model("tf_efficientnet_lite0", "none", num_classes=2, in_channels=1, dims="2d")
    spec = make_spec("2d", "xray", [64, 64], {"mean": (0.5,), "std": (0.5,)})
    meta = {
        "prepare": spec.as_dict(),
        "classes": ["0", "1"],
        "temperature": 1.0,
        "operating_point": {"rule": "youden", "threshold": 0.5},
        "train_run_id": "test",
    }
    with tracking.start_run("hostile-tests"):
        info = log_packaged(CalibratedNet(net, 1.0), np.zeros((1, 1, 64, 64), np.float32), meta, "h")
    return {"uri": uri, "model": f"models:/h/{info['version']}"}


@pytest.mark.slow
def test_a_second_score_into_the_same_output_refuses_naming_the_holder(tmp_path, cohorts, model):
    cxr, key = cohorts["cxr"], cohorts["key"]
    out = tmp_path / "pred.parquet"
    common = ("--model", model["model"], "--tracking-uri", model["uri"], "--out", out)
    holder, _ = _parked(tmp_path, "score", cxr.archive_dir, *common)
    try:
        _wait_for_lock(Path(f"{out}.work") / LOCK_NAME, holder)
        second = subprocess.run(
            _medxfer("score", cxr.archive_dir, *common, "--key-file", key),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 1
        assert f"score output {out} is in use by another medxfer process (PID {holder.pid} " in second.stderr
        assert "Traceback" not in second.stderr
        assert holder.poll() is None
    finally:
        _kill(holder)
    assert not out.exists()
    assert main(["score", str(cxr.archive_dir), *map(str, common), "--key-file", str(key)]) == 0  # takes it over
    table = pd.read_parquet(out)
    assert (table["status"] == "ok").sum() == len(load_manifest(Path(f"{out}.work") / "manifest")) == cxr.n_files


# ------------------------------------------------------------------------------------------ full disk


@pytest.fixture
def small_disk(tmp_path):
    """A factory of tmpfs mounts of a given size in KiB (unmounted afterwards); skips unless root can mount."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is tested on a small tmpfs, and mounting one needs root: run the suite as root")
    mounted: list[Path] = []

    def mount(kib: int, inodes: int | None = None) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        options = f"size={kib}k" + (f",nr_inodes={inodes}" if inodes else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); a full disk is tested where mount works")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"medxfer {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("workers", [1, 2])  # 2: the error comes back from a spawned worker
def test_ingest_on_a_full_disk_explains_removes_its_images_and_keeps_the_previous_manifest(
    small_disk, cohorts, capsys, workers
):
    small, cxr, key = cohorts["small"], cohorts["cxr"], cohorts["key"]
    out = small_disk(1024) / "manifest"  # the small archive fits (5 images); the 9 of the other do not
    ingest(small.archive_dir, small.labels_csv, out, key_file=key, progress=False)
    before = {n: (out / n).read_bytes() for n in ("manifest.parquet", "ingest_report.json", "quarantine.csv")}
    images_before = {p.name for p in (out / "images").iterdir()}
    code = main(["ingest", str(cxr.archive_dir), "--labels", str(cxr.labels_csv), "--out", str(out),
                 "--key-file", str(key), "--workers", str(workers)])  # fmt: skip
    err = capsys.readouterr().err
    line = _error_line(err, "ingest")
    assert code == 1 and "Traceback" not in err
    assert f"ingest stopped: the disk is full where it writes {out} (" in line
    space = r"\(\d+\.\d MB free when it stopped, \d+\.\d MB after the clean-up; its 1\.\d MB of source files to decode"
    assert re.search(space, line), line
    assert re.search(r"The [1-9]\d* image file\(s\) \(\d+\.\d MB\) this run had written were removed", line)
    assert "; the previous manifest is unchanged." in line and "Fix: free space on that disk" in line
    assert {n: (out / n).read_bytes() for n in before} == before
    assert {p.name for p in (out / "images").iterdir()} == images_before  # no orphan, no temp file
    _consistent(out)


@pytest.mark.slow  # the registered model takes ~25 s to build and log
def test_score_on_a_full_disk_explains_and_leaves_no_images_behind(small_disk, cohorts, model, capsys):
    cxr, key = cohorts["cxr"], cohorts["key"]
    disk = small_disk(768)
    out = disk / "pred.parquet"
    code = main(["score", str(cxr.archive_dir), "--model", model["model"], "--tracking-uri", model["uri"],
                 "--out", str(out), "--key-file", str(key)])  # fmt: skip
    err = capsys.readouterr().err
    line = _error_line(err, "score")
    assert code == 1 and "Traceback" not in err
    assert f"the disk is full where it writes {out}.work/manifest" in line and "Fix: free space" in line
    assert not out.exists()
    images = Path(f"{out}.work") / "manifest" / "images"
    assert [p.name for p in images.iterdir()] == []  # this run's images removed, temp files too
    assert shutil.disk_usage(disk).used < 64 * 1024  # the disk is not left full


def _inodes_used(disk: Path) -> int:
    st = os.statvfs(disk)
    return st.f_files - st.f_ffree


@pytest.mark.slow  # the registered model takes ~25 s to build and log
def test_score_that_fills_the_disk_while_committing_chunks_keeps_nothing_partial_and_resumes(
    small_disk, cohorts, model, capsys
):
    """A disk that runs out of inodes (ENOSPC too) right after the archive is ingested, so the first chunk fails."""
    cxr, key = cohorts["cxr"], cohorts["key"]
    args = ["score", str(cxr.archive_dir), "--model", model["model"], "--tracking-uri", model["uri"],
            "--key-file", str(key)]  # fmt: skip
    probe = small_disk(8192)  # the same score with room: how many inodes its chunks and outputs take
    assert main([*args, "--out", str(probe / "pred.parquet")]) == 0
    work = probe / "pred.parquet.work"
    after_chunks = sum(1 for _ in (work / "chunks").rglob("*")) + len(list(probe.glob("pred.parquet*"))) - 1
    disk = small_disk(8192, inodes=_inodes_used(probe) - after_chunks + 1)  # room for chunks/, not for a part
    out = disk / "pred.parquet"
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    line = _error_line(err, "score")
    assert "Traceback" not in err and f"score stopped: the disk is full where it writes {disk} (" in line
    assert f"No partial file is left: 0 scored chunk(s) already committed stay in {out}.work (" in line
    assert "No pred.parquet was written." in line and "Fix: free space" in line
    assert not out.exists() and not [p for p in disk.rglob("*") if is_temp(p)]
    assert load_manifest(Path(f"{out}.work") / "manifest").shape[0] == cxr.n_files  # the ingest is kept...
    subprocess.run(["mount", "-o", "remount,nr_inodes=10000", str(disk)], check=True)
    assert main([*args, "--out", str(out)]) == 0  # ...so once there is room the same command goes on
    assert pd.read_parquet(out).equals(pd.read_parquet(probe / "pred.parquet"))


def test_any_command_on_a_full_disk_gets_a_message_not_a_traceback(small_disk, capsys):
    disk = small_disk(256)
    assert main(["synth", "--out", str(disk / "cohort"), "--n", "8"]) == 1
    line = _error_line(capsys.readouterr().err, "synth")
    assert "synth stopped: the disk is full where it writes " in line and "Fix: free space" in line


# ------------------------------------------------------------------------------- labels and messages


def _labels_with(path: Path, labels_csv: Path, **columns: list[str]) -> Path:
    frame = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    for name, values in columns.items():
        frame[name] = [values[i % len(values)] for i in range(len(frame))]
    frame.to_csv(path, index=False)
    return path


def _all_bytes(root: Path, skip: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file() and skip not in p.parents}


@pytest.mark.slow
def test_free_text_columns_never_reach_manifest_mlflow_evaluation_or_report(tmp_path, monkeypatch):
    from pipeline.run import run
    from pipeline.run.demo import demo_config

    monkeypatch.chdir(tmp_path)  # MLflow artifacts (./mlruns) stay under tmp_path
    cohort = make_cohort(tmp_path / "cohort", kind="cxr2d", n=40, seed=7)
    comments = [f"seen by {FAKE_NAME}", FAKE_NAME, "", "follow up with Dr Jane Roe in 6 weeks"]
    _labels_with(cohort.labels_csv, cohort.labels_csv, comment=comments)
    assert FAKE_NAME in cohort.labels_csv.read_text()
    cfg = demo_config(tmp_path, cohort)
    cfg.prepare.size = [64, 64]
    cfg.finetune.epochs, cfg.finetune.early_stopping.patience, cfg.evaluate.bootstrap = 2, 1, 20
    cfg.tracking.register_as = "hostile-free-text"
    result = run(cfg, report=tmp_path / "report.html", progress=False)
    assert "comment" not in load_manifest(tmp_path / "manifest").columns
    params = tracking.get_run(result["run_id"])["params"]
    assert not [k for k, v in params.items() if "Roe" in k or "Roe" in v]
    evaluation = tracking.download_artifacts(result["run_id"], "evaluation.json", tmp_path / "dl")
    assert "Roe" not in evaluation.read_text()
    outputs = _all_bytes(tmp_path, skip=tmp_path / "cohort")
    assert str(tmp_path / "report.html") in outputs and str(tmp_path / "mlflow.db") in outputs
    assert any("mlartifacts" in p for p in outputs) and any(p.endswith("manifest.parquet") for p in outputs)
    leaked = [p for p, data in outputs.items() if b"Jane Roe" in data]  # not "Roe": base64 figures hold it by chance
    assert leaked == []
    report = json.loads((tmp_path / "manifest" / "ingest_report.json").read_text())
    assert report["labels"]["not_declared"] == ["comment"]  # left out, and said so


def _tiny_archive(root: Path, n: int = 12) -> tuple[Path, Path]:
    """Two radiographs; a labels file of `n` patients (rows without images are fine for these tests)."""
    src = root / "src"
    cr_image(src / "a" / "cr.dcm", patient_id="P0")
    cr_image(src / "b" / "cr.dcm", patient_id="P1", seed=2)
    labels = root / "labels.csv"
    labels.write_text("patient_id,label\n" + "".join(f"P{i},{i % 2}\n" for i in range(n)))
    return src, labels


@pytest.mark.parametrize(
    ("column", "values", "phrase"),
    [
        ("comment", [FAKE_NAME, "ok", "Roe, Jane"], "person names"),
        ("reader", ["ROE^JANE", "DOE^JOHN"], "person names"),
        (
            "scan_date",
            ["2021-03-04", "04/03/2021", "20210304", "4 Mar 2021", "March 4, 2021"],
            "dates on lines 2, 3, 4, 5, 6",
        ),
        ("contact", ["jane.roe@example.org", "x"], "ID numbers, phone numbers or e-mail addresses"),
        ("ref", ["A1234567", "x"], "ID numbers"),
        ("ward", [f"W{i:02d}" for i in range(12)], "12 distinct values for 12 patients"),
        ("note", ["patient was anxious about the procedure and asked for sedation"], "free text"),
    ],
)
def test_identifier_like_subgroups_are_refused_naming_the_column_not_the_values(
    tmp_path, capsys, key_file, column, values, phrase
):
    src, labels = _tiny_archive(tmp_path)
    _labels_with(labels, labels, **{column: values})
    code = main(["ingest", str(src), "--labels", str(labels), "--out", str(tmp_path / "out"), "--subgroup", column,
                 "--key-file", str(key_file)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"subgroup column(s) ['{column}'] hold identifier-like values" in err and phrase in err
    assert f"leave ['{column}'] out of the declared subgroups" in err
    assert not [v for v in values if len(v) > 2 and v in err]  # never a value
    assert not (tmp_path / "out" / "manifest.parquet").exists()


@pytest.fixture
def key_file(tmp_path):
    return fixed_key(tmp_path / "keys" / "pseudonym.key")


def test_categorical_subgroups_are_carried_and_undeclared_columns_are_not(tmp_path, key_file):
    src, labels = _tiny_archive(tmp_path)
    _labels_with(labels, labels, site=["A", "B"], scanner=["X1", "Y2", "Z3"], comment=[FAKE_NAME])
    ingest(src, labels, tmp_path / "out", key_file=key_file, subgroups=["scanner"], progress=False)
    frame = load_manifest(tmp_path / "out")
    assert list(frame.columns[-2:]) == ["site", "scanner"] and set(frame["scanner"]) <= {"X1", "Y2", "Z3"}
    assert not [p for p, data in _all_bytes(tmp_path / "out", tmp_path / "none").items() if b"Jane Roe" in data]


@pytest.mark.parametrize(
    ("column", "values"),
    [
        ("race", ["White", "Black or African American", "Native Hawaiian or Other Pacific Islander", "Asian"]),
        ("site", ["site-A", "Hospital North", "St Thomas'", "2"]),
        ("scanner", ["GE MEDICAL SYSTEMS", "Ingenuity CT", "1Ingenuity128", "SIEMENS"]),
        ("age_group", ["60-69", "90+", "<18"]),
        ("year", ["2019", "2020", "2021"]),  # a year alone is not a date element that identifies
    ],
)
def test_ordinary_categories_pass_the_screen(tmp_path, key_file, column, values):
    src, labels = _tiny_archive(tmp_path)
    _labels_with(labels, labels, **{column: values})
    ingest(src, labels, tmp_path / "out", key_file=key_file, subgroups=[column], progress=False)
    assert set(load_manifest(tmp_path / "out")[column]) <= set(values)


def test_a_default_subgroup_with_identifiers_is_refused_too(tmp_path, key_file):
    src, labels = _tiny_archive(tmp_path)
    _labels_with(labels, labels, site=["St Mary's", "Dr Jane Roe's clinic"])
    with pytest.raises(DataError, match=r"(?s)\['site'\] hold identifier-like.*rename the column in labels\.csv"):
        ingest(src, labels, tmp_path / "out", key_file=key_file, progress=False)


def test_an_identifying_column_declared_as_subgroup_is_a_config_error(tmp_path, key_file):
    src, labels = _tiny_archive(tmp_path)
    with pytest.raises(ConfigError, match=r"subgroup column\(s\) \['patient_name'\] name identifiers"):
        ingest(src, labels, tmp_path / "out", key_file=key_file, subgroups=["Patient_Name"], progress=False)


def test_config_subgroups_are_screened_before_training(tmp_path, key_file):
    from pipeline.config import Config
    from pipeline.run import ensure_manifest

    src, labels = _tiny_archive(tmp_path)
    _labels_with(labels, labels, comment=[FAKE_NAME, "fine"])
    cfg = Config()
    cfg.data.source, cfg.data.labels, cfg.data.manifest = str(src), str(labels), str(tmp_path / "out")
    cfg.data.key_file, cfg.data.strict = str(key_file), False
    cfg.evaluate.subgroups = ["sex", "comment"]
    with pytest.raises(DataError, match=r"\['comment'\] hold identifier-like values") as err:
        ensure_manifest(cfg, progress=False)
    assert "Roe" not in str(err.value)


def test_the_strict_error_names_no_archive_path(tmp_path, key_file, capsys):
    src = tmp_path / "src"
    paths, _ = ct_series(src / "ROE^JANE_MRN0042" / "s1", n=3, patient_id="MRN0042")
    copy = pydicom.dcmread(paths[0])
    copy.ImageComments = "edited copy"  # same SOPInstanceUID, other content: the original's detail names the copy
    copy.save_as(paths[0].parent / "copy-MRN0042.dcm")
    (src / "DOE_JOHN_MRN0099").mkdir()
    (src / "DOE_JOHN_MRN0099" / "empty.dcm").write_bytes(b"")
    out = tmp_path / "out"
    code = main(["ingest", str(src), "--out", str(out), "--strict", "--key-file", str(key_file)])
    err = capsys.readouterr().err
    line = _error_line(err, "ingest")
    assert code == 1 and "Traceback" not in err
    assert "strict ingest stopped: 2 file(s) quarantined" in line
    assert f"{out / 'quarantine-strict.csv'} gives each reference's path" in line
    for secret in ("ROE", "JANE", "MRN0042", "DOE", "MRN0099", str(src)):
        assert secret not in err, secret
    listed = dict(re.findall(r"^  ([a-z-]+) +(src-[0-9a-f]{16}):", err, re.MULTILINE))
    assert len(listed) == 2 and "empty-file" in listed
    listing = pd.read_csv(out / "quarantine-strict.csv", dtype=str, keep_default_na=False).set_index("ref")
    assert listing.loc[listed["empty-file"], "path"] == "DOE_JOHN_MRN0099/empty.dcm"  # the local file resolves refs
    (clash,) = [ref for reason, ref in listed.items() if reason != "empty-file"]
    assert listing.loc[clash, "path"] == paths[0].relative_to(src).as_posix()
    assert "ROE^JANE_MRN0042/s1/copy-MRN0042.dcm" in listing.loc[clash, "detail"]  # in clear in the local file only
