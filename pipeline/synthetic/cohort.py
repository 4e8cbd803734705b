"""make_cohort(): write a synthetic DICOM cohort (archive/, labels.csv, synthetic.json) with a known answer."""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.errors import ConfigError, did_you_mean
from pipeline.io import atomic_path, write_text
from pipeline.synthetic.ct import ct_study
from pipeline.synthetic.cxr import cxr_study
from pipeline.synthetic.dicom_writer import Layout
from pipeline.synthetic.patients import Patient, make_patients

KINDS = ("cxr2d", "ct3d")


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


def make_cohort(
    out_dir: str | Path,
    kind: str = "cxr2d",
    n: int = 200,
    seed: int = 0,
    positive_fraction: float = 0.3,
    progress: bool = False,
) -> SyntheticCohort:
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
        raise ConfigError(
            f"{archive} already exists and was not written by `medxfer synth`; "
            "refusing to overwrite it. Fix: choose an empty --out folder."
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".archive.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    token = rng.bytes(16).hex()
    patients = make_patients(rng, n, positive_fraction, seed)
    layout = Layout(tmp, rng, n)
    study_fn = cxr_study if kind == "cxr2d" else ct_study
    for p in tqdm(patients, desc=f"synth {kind}", unit="patient", disable=not progress):
        layout.write_study(study_fn(p, token), p.rng)
    shutil.rmtree(archive, ignore_errors=True)
    os.replace(tmp, archive)
    labels = root / "labels.csv"
    _write_labels(labels, patients)
    n_pos = sum(p.label for p in patients)
    info = {
        "kind": kind,
        "n_patients": n,
        "n_positive": n_pos,
        "n_files": layout.n_files,
        "seed": seed,
        "positive_fraction": positive_fraction,
    }
    write_text(marker, json.dumps(info, indent=2) + "\n")
    return SyntheticCohort(root, archive, labels, kind, n, n_pos, layout.n_files)


def _check_args(kind: str, n: int, positive_fraction: float) -> None:
    if kind not in KINDS:
        raise ConfigError(
            f"unknown synthetic kind {kind!r}{did_you_mean(kind, KINDS)}; "
            f"expected one of {', '.join(KINDS)}. Fix: pass --kind cxr2d or ct3d."
        )
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 4:
        raise ConfigError(
            f"synthetic cohort size n={n!r} is invalid; expected an integer >= 4 "
            "so both labels appear in every split. Fix: pass --n 4 or more."
        )
    if not isinstance(positive_fraction, int | float) or not 0.0 < positive_fraction < 1.0:
        raise ConfigError(
            f"positive_fraction={positive_fraction!r} is outside (0, 1); expected "
            "e.g. 0.3. Fix: choose a fraction strictly between 0 and 1."
        )


def _write_labels(path: Path, patients: list[Patient]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["patient_id", "label", "sex", "age", "site"])
        for p in patients:
            w.writerow([p.patient_id, p.label, p.sex, p.age, p.site])
