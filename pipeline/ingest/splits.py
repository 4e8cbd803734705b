"""Patient-level train/val/test splits: keyed-hash assignment, per label, stable as patients are added."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

from pipeline.errors import ConfigError
from pipeline.ingest.pseudonym import unit_interval


def check_fractions(val: float, test: float) -> None:
    """Validate the split fractions.

    Raises:
        ConfigError: Unless 0 <= val, 0 <= test and val + test < 1.
    """
    for name, value in (("val", val), ("test", test)):
        if not isinstance(value, int | float) or not 0.0 <= float(value) < 1.0:
            raise ConfigError(f"split fraction {name}={value!r} must be a number in [0, 1); e.g. {name}=0.15")
    if val + test >= 1.0:
        raise ConfigError(
            f"split fractions val={val} + test={test} leave nothing for train; "
            "their sum must be below 1 (e.g. val=0.15, test=0.15)"
        )


def split_of(key: bytes, subject_id: str, seed: int, val: float, test: float) -> str:
    """The split of one subject: u = HMAC(key, seed, subject) in [0, 1) against cumulative fractions.

    u < 1 - val - test → train; u < 1 - test → val; else test. The answer depends only on the
    key, the seed and the subject pseudonym, so it never changes when other patients are added.
    """
    u = unit_interval(key, f"split:{int(seed)}", subject_id)
    if u < 1.0 - val - test:
        return "train"
    return "val" if u < 1.0 - test else "test"


def assign_splits(
    subject_labels: Mapping[str, Iterable[str]], key: bytes, *, val: float, test: float, seed: int
) -> tuple[dict[str, str], list[str]]:
    """Assign every labelled subject to one split, stratified by label.

    Within each label stratum every subject is placed by its own keyed-hash draw, so each
    stratum receives the target fractions in expectation and the assignment is stable: adding
    patients never moves an existing one. A subject is placed once, so it never spans splits.

    Args:
        subject_labels: subject pseudonym → the labels of its images ("" entries are ignored).
        key: The pseudonym HMAC key.
        val: Fraction of subjects for validation.
        test: Fraction of subjects for test.
        seed: Changes the draw (a different seed gives an independent split).

    Returns:
        (subject → split for subjects with at least one label, warnings about strata whose
        val/test share came out empty).
    """
    check_fractions(val, test)
    splits: dict[str, str] = {}
    strata: dict[str, Counter[str]] = defaultdict(Counter)
    for subject in sorted(subject_labels):
        labels = sorted({lab for lab in subject_labels[subject] if lab != ""})
        if not labels:
            continue
        splits[subject] = split_of(key, subject, seed, val, test)
        for lab in labels:
            strata[lab][splits[subject]] += 1
    warnings = []
    for lab, counts in sorted(strata.items()):
        empty = [s for s, frac in (("val", val), ("test", test)) if frac > 0 and counts[s] == 0]
        if empty:
            warnings.append(
                f"label {lab!r}: {sum(counts.values())} subject(s), none in {' or '.join(empty)}; "
                "add patients or change the split seed"
            )
    return splits, warnings
