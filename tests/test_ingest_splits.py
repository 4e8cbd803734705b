"""Patient-level splits: deterministic, stable as patients are added, proportions per label."""

from __future__ import annotations

from collections import Counter

import pytest

from pipeline.errors import ConfigError
from pipeline.ingest.splits import assign_splits, check_fractions, split_of

KEY = bytes(32)


def _subjects(n: int, start: int = 0) -> dict[str, list[str]]:
    return {f"sub-{i:016x}": [str(i % 2)] for i in range(start, start + n)}


def test_deterministic_for_key_and_seed():
    subjects = _subjects(200)
    a, _ = assign_splits(subjects, KEY, val=0.15, test=0.15, seed=0)
    b, _ = assign_splits(dict(reversed(list(subjects.items()))), KEY, val=0.15, test=0.15, seed=0)
    c, _ = assign_splits(subjects, KEY, val=0.15, test=0.15, seed=1)
    assert a == b
    assert a != c


def test_adding_patients_moves_nobody():
    old, _ = assign_splits(_subjects(300), KEY, val=0.2, test=0.1, seed=3)
    new, _ = assign_splits(_subjects(600), KEY, val=0.2, test=0.1, seed=3)
    assert all(new[s] == split for s, split in old.items())


def test_proportions_hold_within_each_label():
    subjects = _subjects(4000)
    splits, warnings = assign_splits(subjects, KEY, val=0.15, test=0.25, seed=0)
    assert warnings == []
    for label in ("0", "1"):
        counts = Counter(splits[s] for s, labs in subjects.items() if labs == [label])
        total = sum(counts.values())
        assert counts["train"] / total == pytest.approx(0.60, abs=0.03)
        assert counts["val"] / total == pytest.approx(0.15, abs=0.03)
        assert counts["test"] / total == pytest.approx(0.25, abs=0.03)


def test_one_split_per_subject_and_unlabeled_left_out():
    subjects = {"sub-a": ["1", "0", ""], "sub-b": ["", ""], "sub-c": ["0"]}
    splits, _ = assign_splits(subjects, KEY, val=0.15, test=0.15, seed=0)
    assert set(splits) == {"sub-a", "sub-c"}
    assert splits["sub-a"] == split_of(KEY, "sub-a", 0, 0.15, 0.15)


def test_empty_strata_are_warned():
    _, warnings = assign_splits({"sub-x": ["rare"]}, KEY, val=0.15, test=0.15, seed=0)
    assert any("label 'rare'" in w for w in warnings)


@pytest.mark.parametrize(
    ("val", "test", "fragment"),
    [(-0.1, 0.1, "val=-0.1"), (0.1, 1.0, "test=1.0"), (0.5, 0.5, "leave nothing for train")],
)
def test_bad_fractions(val, test, fragment):
    with pytest.raises(ConfigError, match=fragment):
        check_fractions(val, test)


def test_zero_val_and_test_is_all_train():
    splits, _ = assign_splits(_subjects(50), KEY, val=0.0, test=0.0, seed=0)
    assert set(splits.values()) == {"train"}
