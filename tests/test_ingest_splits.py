"""Patient-level splits: within one patient of target per label stratum, deterministic, stable as patients join."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import fixed_key
from dicom_factory import cr_image

from pipeline.errors import ConfigError, DataError
from pipeline.ingest import ingest, load_manifest
from pipeline.ingest.pseudonym import load_or_create_key, pseudonym, unit_interval
from pipeline.ingest.splits import (
    assign_splits,
    check_fractions,
    moved_subjects,
    next_split,
    split_fractions,
    stratum_of,
)
from pipeline.records import MANIFEST_COLUMNS

KEY = bytes(32)


def _subjects(n: int, start: int = 0) -> dict[str, list[str]]:
    return {f"sub-{i:016x}": [str(i % 2)] for i in range(start, start + n)}


def _random_cohort(rng: random.Random) -> tuple[dict[str, list[str]], float, float, int]:
    """A random cohort: 5..300 subjects, 2 or 3 classes at a random prevalence, a few multi-label subjects."""
    n, prevalence = rng.randint(5, 300), rng.uniform(0.02, 0.6)
    classes = ["0", "1"] if rng.random() < 0.7 else ["0", "1", "2"]
    subjects = {}
    for _ in range(n):
        labels = [rng.choice(classes[1:]) if rng.random() < prevalence else "0"]
        if rng.random() < 0.05:
            labels.append(rng.choice(classes))
        subjects[f"sub-{rng.getrandbits(64):016x}"] = labels
    val, test = rng.choice([0.0, 0.1, 0.15, 0.2, 0.25]), rng.choice([0.05, 0.1, 0.15, 0.2, 0.3])
    return subjects, val, test, rng.randint(0, 10**6)


def _worst_deviation(subjects: dict[str, list[str]], splits: dict[str, str], val: float, test: float) -> float:
    """The largest |count − fraction × stratum size| over strata and splits, in patients."""
    by_stratum: dict[tuple[str, ...], Counter[str]] = {}
    for subject, labels in subjects.items():
        by_stratum.setdefault(stratum_of(labels), Counter())[splits[subject]] += 1
    fractions = {"train": 1 - val - test, "val": val, "test": test}
    return max(
        abs(counts[s] - fractions[s] * sum(counts.values())) for counts in by_stratum.values() for s in fractions
    )


def _independent_draws(subjects: dict[str, list[str]], val: float, test: float, seed: int) -> dict[str, str]:
    """The old assignment: each subject's own keyed-hash draw against cumulative fractions, label ignored."""
    out = {}
    for subject in subjects:
        u = unit_interval(KEY, f"split:{seed}", subject)
        out[subject] = "train" if u < 1 - val - test else "val" if u < 1 - test else "test"
    return out


def test_every_stratum_within_one_patient_of_its_targets():
    rng = random.Random(20240601)
    for _ in range(200):
        subjects, val, test, seed = _random_cohort(rng)
        splits, _ = assign_splits(subjects, KEY, val=val, test=test, seed=seed)
        assert set(splits) == set(subjects)
        assert _worst_deviation(subjects, splits, val, test) < 1 + 1e-9, (len(subjects), val, test, seed)


def test_independent_draws_broke_the_bound():
    """Regression: the old per-subject draw ignored labels; on the same cohorts it was up to ~15 patients off."""
    rng = random.Random(20240601)
    worst = 0.0
    for _ in range(200):
        subjects, val, test, seed = _random_cohort(rng)
        worst = max(worst, _worst_deviation(subjects, _independent_draws(subjects, val, test, seed), val, test))
    assert worst > 5


def test_counts_are_floor_or_ceil_of_the_targets():
    subjects = {f"sub-{i:016x}": ["1" if i < 20 else "0"] for i in range(100)}
    splits, warnings = assign_splits(subjects, KEY, val=0.15, test=0.15, seed=0)
    assert warnings == []
    positives = Counter(splits[s] for s, labels in subjects.items() if labels == ["1"])
    negatives = Counter(splits[s] for s, labels in subjects.items() if labels == ["0"])
    assert positives == {"train": 14, "val": 3, "test": 3}
    assert negatives == {"train": 56, "val": 12, "test": 12}


def test_deterministic_for_key_and_seed():
    subjects = _subjects(200)
    a, _ = assign_splits(subjects, KEY, val=0.15, test=0.15, seed=0)
    b, _ = assign_splits(dict(reversed(list(subjects.items()))), KEY, val=0.15, test=0.15, seed=0)
    c, _ = assign_splits(subjects, KEY, val=0.15, test=0.15, seed=1)
    d, _ = assign_splits(subjects, bytes(range(32)), val=0.15, test=0.15, seed=0)
    assert a == b
    assert a != c
    assert a != d
    assert Counter(a.values()) == Counter(c.values())  # same counts, other patients


def test_growth_moves_nobody_and_stays_within_one_patient():
    first, _ = assign_splits(_subjects(60), KEY, val=0.15, test=0.15, seed=7)
    grown = _subjects(100)
    second, warnings = assign_splits(grown, KEY, val=0.15, test=0.15, seed=7, previous=first)
    assert warnings == []
    assert moved_subjects(first, second) == 0
    assert all(second[s] == split for s, split in first.items())
    assert _worst_deviation(grown, second, 0.15, 0.15) < 1
    third, _ = assign_splits(_subjects(250), KEY, val=0.15, test=0.15, seed=7, previous=second)
    assert moved_subjects(second, third) == 0
    assert _worst_deviation(_subjects(250), third, 0.15, 0.15) < 1


def test_random_growth_moves_nobody():
    rng = random.Random(5)
    for _ in range(30):
        subjects, val, test, seed = _random_cohort(rng)
        names = sorted(subjects)
        rng.shuffle(names)
        old = {s: subjects[s] for s in names[: len(names) // 2]}
        before, _ = assign_splits(old, KEY, val=val, test=test, seed=seed)
        after, _ = assign_splits(subjects, KEY, val=val, test=test, seed=seed, previous=before)
        assert moved_subjects(before, after) == 0
        assert _worst_deviation(subjects, after, val, test) < 1 + 1e-9


def test_kept_subjects_off_target_are_warned_and_new_ones_fill_the_gap():
    subjects = _subjects(10)
    previous = dict.fromkeys(subjects, "test")
    splits, warnings = assign_splits(_subjects(30), KEY, val=0.15, test=0.15, seed=0, previous=previous)
    assert all(splits[s] == "test" for s in previous)
    assert Counter(splits[s] for s in _subjects(20, 10)) == {"train": 18, "val": 2}  # 9 + 1 per stratum of 15
    assert any("off target" in w and "test 5 (target 2.2)" in w for w in warnings)


def test_previous_subjects_absent_or_unlabeled_are_ignored():
    previous = {"sub-a": "val", "sub-b": "test", "sub-gone": "train"}
    splits, _ = assign_splits({"sub-a": ["1"], "sub-b": [""]}, KEY, val=0.1, test=0.1, seed=0, previous=previous)
    assert splits == {"sub-a": "val"}


def test_bad_previous_split_value():
    with pytest.raises(DataError, match=r"previous split value\(s\) \['training'\]"):
        assign_splits({"sub-a": ["1"]}, KEY, val=0.1, test=0.1, seed=0, previous={"sub-a": "training"})


def test_one_split_per_subject_and_unlabeled_left_out():
    subjects = {"sub-a": ["1", "0", ""], "sub-b": ["", ""], "sub-c": ["0"]}
    splits, _ = assign_splits(subjects, KEY, val=0.15, test=0.15, seed=0)
    assert set(splits) == {"sub-a", "sub-c"}
    assert stratum_of(subjects["sub-a"]) == ("0", "1")
    assert stratum_of(["", ""]) == ()


def test_multi_label_subjects_form_their_own_stratum():
    subjects = {f"sub-{i:04d}": ["1", "0"] if i % 3 == 0 else ["0"] for i in range(90)}
    splits, _ = assign_splits(subjects, KEY, val=0.2, test=0.2, seed=0)
    mixed = Counter(splits[s] for s, labels in subjects.items() if len(labels) == 2)
    assert mixed == {"train": 18, "val": 6, "test": 6}


def test_next_split_fills_the_largest_gap_ties_to_test_then_val():
    fractions = split_fractions(0.15, 0.15)
    assert next_split({}, fractions) == "train"
    assert next_split({"train": 2}, fractions) == "test"  # val and test both 0.45 below target
    assert next_split({"train": 2, "test": 1}, fractions) == "train"
    assert next_split({"train": 3, "test": 1}, fractions) == "val"
    assert split_fractions(0.2, 0.2)["train"] == split_fractions(0.3, 0.1)["train"]  # exact, no float drift


def test_empty_strata_are_warned():
    _, warnings = assign_splits({"sub-x": ["rare"]}, KEY, val=0.15, test=0.15, seed=0)
    assert any("label 'rare'" in w and "none in val or test" in w for w in warnings)


@pytest.mark.parametrize(
    ("val", "test", "fragment"),
    [(-0.1, 0.1, "val=-0.1"), (0.1, 1.0, "test=1.0"), (0.5, 0.5, "leave nothing for train")],
)
def test_bad_fractions(val, test, fragment):
    with pytest.raises(ConfigError, match=fragment):
        check_fractions(val, test)


def test_zero_val_and_test_is_all_train():
    splits, warnings = assign_splits(_subjects(50), KEY, val=0.0, test=0.0, seed=0)
    assert set(splits.values()) == {"train"}
    assert warnings == []


# ------------------------------------------------------------------------------- through ingest()


def _official(i: int) -> str:
    """A predefined split far from the default fractions: P000-P009 test, P010-P014 val, the rest train."""
    return "test" if i < 10 else "val" if i < 15 else "train"


def _cr_archive(root: Path, n: int, split: Callable[[int], str] | None = None) -> tuple[Path, Path]:
    """`n` single-radiograph patients P000.. (every 5th positive) under root/archive, and labels.csv.

    With `split`, labels.csv has a split column holding split(i) for patient i.
    """
    src = root / "archive"
    lines = ["patient_id,label,site" + (",split" if split else "")]
    for i in range(n):
        if not (src / f"p{i:03d}" / "cr.dcm").exists():
            cr_image(src / f"p{i:03d}" / "cr.dcm", patient_id=f"P{i:03d}", seed=i)
        lines.append(f"P{i:03d},{int(i % 5 == 0)},S{i % 3}" + (f",{split(i)}" if split else ""))
    labels = root / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    return src, labels


def _subject_splits(out: Path) -> dict[str, str]:
    frame = load_manifest(out)
    assert (frame.groupby("subject_id")["split"].nunique() == 1).all()  # nobody spans splits
    return dict(zip(frame["subject_id"], frame["split"], strict=True))


@pytest.fixture
def key_file(tmp_path) -> Path:
    return fixed_key(tmp_path / "keys" / "pseudonym.key")


def test_ingest_of_a_grown_archive_moves_nobody(tmp_path, key_file):
    out = tmp_path / "manifest"
    src, labels = _cr_archive(tmp_path, 60)
    ingest(src, labels, out, key_file=key_file, progress=False)
    before = _subject_splits(out)
    src, labels = _cr_archive(tmp_path, 100)
    report = ingest(src, labels, out, key_file=key_file, progress=False).report
    after = _subject_splits(out)
    assert len(before) == 60 and len(after) == 100
    assert moved_subjects(before, after) == 0
    assert not [w for w in report["warnings"] if "split" in w]
    frame = load_manifest(out)
    assert Counter(frame.loc[frame["label"] == "1", "split"]) == {"train": 14, "val": 3, "test": 3}
    assert Counter(frame.loc[frame["label"] == "0", "split"]) == {"train": 56, "val": 12, "test": 12}


def test_report_logs_split_source_and_prevalence_per_split(tmp_path, key_file):
    src, labels = _cr_archive(tmp_path, 100)
    report = ingest(src, labels, tmp_path / "manifest", key_file=key_file, progress=False).report
    assert report["split_source"] == "keyed-hash"
    assert report["splits"]["test"] == {
        "units": 15,
        "subjects": 15,
        "by_label": {"0": 12, "1": 3},
        "subjects_by_label": {"0": 12, "1": 3},
        "prevalence": {"0": 0.8, "1": 0.2},
    }
    assert report["splits"]["train"]["prevalence"] == {"0": 0.8, "1": 0.2}
    assert report["splits"]["unlabeled"] == {
        "units": 0,
        "subjects": 0,
        "by_label": {},
        "subjects_by_label": {},
        "prevalence": {},
    }


def test_changed_seed_starts_over_and_says_so(tmp_path, key_file):
    out = tmp_path / "manifest"
    src, labels = _cr_archive(tmp_path, 40)
    ingest(src, labels, out, key_file=key_file, progress=False)
    before = _subject_splits(out)
    report = ingest(src, labels, out, key_file=key_file, seed=1, progress=False).report
    fresh = ingest(src, labels, tmp_path / "fresh", key_file=key_file, seed=1, progress=False).report
    assert _subject_splits(out) == _subject_splits(tmp_path / "fresh")
    moved = moved_subjects(before, _subject_splits(out))
    assert moved > 0
    note = (
        f"previous splits not kept (data.split changed (seed 0 → 1)): every patient was assigned afresh; {moved} of 40"
    )
    assert any(w.startswith(note) for w in report["warnings"])
    assert not [w for w in fresh["warnings"] if "previous" in w]


def test_a_report_that_does_not_match_the_manifest_is_not_trusted(tmp_path, key_file):
    out = tmp_path / "manifest"
    src, labels = _cr_archive(tmp_path, 12)
    ingest(src, labels, out, key_file=key_file, progress=False)
    report = json.loads((out / "ingest_report.json").read_text())
    (out / "ingest_report.json").write_text(json.dumps({**report, "manifest_sha256": "0" * 64}))
    warnings = ingest(src, labels, out, key_file=key_file, progress=False).report["warnings"]
    assert any("does not describe the previous manifest.parquet" in w for w in warnings)


# ------------------------------------------------------------------------- a predefined split


def test_a_split_column_is_honoured_exactly_and_kept_on_reingest(tmp_path, key_file):
    out = tmp_path / "manifest"
    src, labels = _cr_archive(tmp_path, 30, split=_official)
    report = ingest(src, labels, out, key_file=key_file, val=0.3, test=0.3, progress=False).report
    expected = {pseudonym(load_or_create_key(key_file)[0], "subject", f"P{i:03d}"): _official(i) for i in range(30)}
    assert _subject_splits(out) == expected
    assert report["split_source"] == "labels.csv"
    assert "split" not in report["labels"]["carried"] and "split" not in report["labels"]["dropped"]
    assert list(load_manifest(out).columns) == [*MANIFEST_COLUMNS, "site"]
    assert {s: report["splits"][s]["subjects"] for s in ("train", "val", "test")} == {"train": 15, "val": 5, "test": 10}
    again = ingest(src, labels, out, key_file=key_file, seed=5, progress=False).report
    assert _subject_splits(out) == expected
    assert again["split_source"] == "labels.csv"
    assert not [w for w in again["warnings"] if "split" in w]


def test_switching_between_hash_and_split_column_says_how_many_moved(tmp_path, key_file):
    out = tmp_path / "manifest"
    src, labels = _cr_archive(tmp_path, 30)
    ingest(src, labels, out, key_file=key_file, progress=False)
    hashed = _subject_splits(out)
    src, labels = _cr_archive(tmp_path, 30, split=_official)
    warnings = ingest(src, labels, out, key_file=key_file, progress=False).report["warnings"]
    moved = moved_subjects(hashed, _subject_splits(out))
    assert f"{moved} of 30 patient(s) of the previous manifest changed split: labels.csv defines it" in warnings
    src, labels = _cr_archive(tmp_path, 30)
    warnings = ingest(src, labels, out, key_file=key_file, progress=False).report["warnings"]
    assert _subject_splits(out) == hashed  # a fresh keyed-hash split again
    assert any(w.startswith("previous splits not kept (the previous splits came from 'labels.csv'") for w in warnings)


def test_a_bad_split_column_stops_ingest_and_leaves_the_previous_manifest(tmp_path, key_file):
    out = tmp_path / "manifest"
    src, labels = _cr_archive(tmp_path, 8, split=_official)
    ingest(src, labels, out, key_file=key_file, progress=False)
    before = (out / "manifest.parquet").read_bytes()
    labels.write_text(labels.read_text().replace("P003,0,S0,test", "P003,0,S0,training"))
    with pytest.raises(DataError, match=r"line 5: 'training' is not a split value \(did you mean 'train'\?\)"):
        ingest(src, labels, out, key_file=key_file, progress=False)
    assert (out / "manifest.parquet").read_bytes() == before
