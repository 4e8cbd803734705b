"""Patient-level train/val/test splits: stratified by label, exact per stratum, stable as patients are added.

A subject's stratum is the sorted tuple of the distinct labels of its images (one label for almost
every subject; a subject with images of labels "0" and "1" is in stratum ("0", "1")). Within a
stratum, subjects not placed before are taken in keyed-hash order (HMAC of key, seed and subject)
and each goes to the split whose count is furthest below its target, the split's fraction times
the stratum's size once this subject has joined (ties: test, then val, then train). Starting from
an empty stratum this keeps every split within one patient of its target at every step, so:

* a fresh assignment depends only on the set of subjects, their labels, the key, the seed and the
  fractions, and in every stratum each split's count is floor or ceil of fraction × stratum size;
* subjects given in ``previous`` (a previous manifest's splits) keep their split; new ones fill the
  splits that are below target, so a stratum grown from a balanced one stays within one patient.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from fractions import Fraction

from pipeline.errors import ConfigError, DataError
from pipeline.ingest.pseudonym import unit_interval
from pipeline.records import SPLITS

KEYED_HASH = "keyed-hash"  # split_source of splits assigned here
LABELS_CSV = "labels.csv"  # split_source of splits given by the labels.csv split column
TIE_ORDER = ("test", "val", "train")  # the split that wins when two are equally far below target


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


def split_fractions(val: float, test: float) -> dict[str, Fraction]:
    """The target fraction of each split, as exact decimals (0.15 → 3/20), so ties are exact."""
    v, t = Fraction(str(float(val))), Fraction(str(float(test)))
    return {"train": 1 - v - t, "val": v, "test": t}


def stratum_of(labels: Iterable[str]) -> tuple[str, ...]:
    """The stratum of a subject: its distinct non-empty labels, sorted; () when it has none."""
    return tuple(sorted({lab for lab in labels if lab != ""}))


def draw_key(key: bytes, seed: int, subject_id: str) -> tuple[float, str]:
    """The order in which new subjects of a stratum are placed: HMAC(key, seed, subject) in [0, 1)."""
    return unit_interval(key, f"split:{int(seed)}", subject_id), subject_id


def next_split(counts: Mapping[str, int], fractions: Mapping[str, Fraction]) -> str:
    """The split whose count is furthest below its target once one more subject joins the stratum."""
    size = sum(counts.get(s, 0) for s in SPLITS) + 1
    return max(TIE_ORDER, key=lambda s: fractions[s] * size - counts.get(s, 0))  # max keeps the first of equals


def assign_splits(
    subject_labels: Mapping[str, Iterable[str]],
    key: bytes,
    *,
    val: float,
    test: float,
    seed: int,
    previous: Mapping[str, str] | None = None,
) -> tuple[dict[str, str], list[str]]:
    """Assign every labelled subject to one split, stratified by label (see the module docstring).

    Guarantees: a subject is placed once, so it never spans splits; every subject in `previous`
    keeps its split. Without `previous`, every stratum's count of each split differs from
    fraction × stratum size by less than one patient (so it is the floor or the ceiling), the
    counts depend only on the stratum's size and the fractions (the key and seed choose which
    subjects), and the result depends only on the subjects, their labels, the key, the seed and
    the fractions (not on the order of `subject_labels`). With `previous`, the same bound holds
    for every stratum whose kept subjects were within it (as they are when this function placed
    them in the same stratum); other strata are warned about and new subjects fill their gaps.

    Args:
        subject_labels: subject pseudonym → the labels of its images ("" entries are ignored).
        key: The pseudonym HMAC key.
        val: Fraction of subjects for validation.
        test: Fraction of subjects for test.
        seed: Changes the order in which subjects are placed (a different seed, a different split).
        previous: subject → split of subjects placed before (e.g. in the previous manifest of the
            same folder, made with the same key, seed and fractions); they are kept as they are.
            Subjects that are not in `subject_labels` or have no label are ignored.

    Returns:
        (subject → split for subjects with at least one label, warnings about labels whose
        val/test share came out empty and strata that kept subjects hold off target).

    Raises:
        ConfigError: Bad fractions.
        DataError: A `previous` split that is not train, val or test.
    """
    check_fractions(val, test)
    kept = dict(previous or {})
    bad = sorted({v for v in kept.values() if v not in SPLITS})
    if bad:
        raise DataError(f"previous split value(s) {bad} are not one of {list(SPLITS)}; re-run ingest into a new folder")
    fractions = split_fractions(val, test)
    splits: dict[str, str] = {}
    warnings = []
    for stratum, members in sorted(strata(subject_labels).items()):
        counts = Counter(kept[s] for s in members if s in kept)
        splits.update((s, kept[s]) for s in members if s in kept)
        for subject in sorted((s for s in members if s not in kept), key=lambda s: draw_key(key, seed, s)):
            splits[subject] = next_split(counts, fractions)
            counts[splits[subject]] += 1
        warnings += off_target(stratum, counts, fractions)
    required = tuple(s for s, frac in (("val", val), ("test", test)) if frac > 0)
    return splits, empty_split_warnings(subject_labels, splits, required) + warnings


def strata(subject_labels: Mapping[str, Iterable[str]]) -> dict[tuple[str, ...], list[str]]:
    """Labelled subjects grouped by stratum (see `stratum_of`), each group sorted."""
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for subject in sorted(subject_labels):
        stratum = stratum_of(subject_labels[subject])
        if stratum:
            groups[stratum].append(subject)
    return dict(groups)


def off_target(stratum: tuple[str, ...], counts: Mapping[str, int], fractions: Mapping[str, Fraction]) -> list[str]:
    """A warning when a split of the stratum is one patient or more off its target (only kept subjects cause it)."""
    size = sum(counts.get(s, 0) for s in SPLITS)
    off = [s for s in SPLITS if abs(counts.get(s, 0) - fractions[s] * size) >= 1]
    if not off:
        return []
    detail = ", ".join(f"{s} {counts.get(s, 0)} (target {float(fractions[s] * size):.1f})" for s in off)
    return [
        f"label stratum {'+'.join(stratum)!r}: {size} subject(s), {detail}: subjects kept from the previous "
        "manifest hold it off target; new patients are placed to bring it back"
    ]


def empty_split_warnings(
    subject_labels: Mapping[str, Iterable[str]],
    splits: Mapping[str, str],
    required: Iterable[str],
    fix: str = "add patients with this label or raise the data.split fractions",
) -> list[str]:
    """Warnings for labels that have no subject in one of the `required` splits (e.g. val, test), ending in `fix`."""
    required = tuple(required)
    per_label: dict[str, Counter[str]] = defaultdict(Counter)
    for subject, split in splits.items():
        for lab in stratum_of(subject_labels[subject]):
            per_label[lab][split] += 1
    warnings = []
    for lab, counts in sorted(per_label.items()):
        empty = [s for s in required if counts[s] == 0]
        if empty:
            warnings.append(f"label {lab!r}: {sum(counts.values())} subject(s), none in {' or '.join(empty)}; {fix}")
    return warnings


def moved_subjects(previous: Mapping[str, str], current: Mapping[str, str]) -> int:
    """How many subjects of `previous` now have another split ("" = unlabeled now, not counted)."""
    return sum(1 for s, split in previous.items() if current.get(s, "") not in ("", split))


def history_warnings(previous: Mapping[str, str], why_not: str, current: Mapping[str, str], source: str) -> list[str]:
    """Warnings on how the new splits relate to the previous manifest's (none when it was kept or absent).

    Args:
        previous: subject → split of the previous manifest ({} when absent or unreadable).
        why_not: Why the previous splits could not be kept ("" when they could).
        current: subject → split of the new manifest.
        source: Where the new splits come from: "keyed-hash" or "labels.csv".
    """
    moved = moved_subjects(previous, current)
    if source != KEYED_HASH:
        if not moved:
            return []
        return [f"{moved} of {len(previous)} patient(s) of the previous manifest changed split: {source} defines it"]
    if not why_not:
        return []
    what = f"; {moved} of {len(previous)} patient(s) of the previous manifest changed split" if previous else ""
    return [f"previous splits not kept ({why_not}): every patient was assigned afresh{what}"]


def nested_subset(subject_labels: Mapping[str, Iterable[str]], fraction: float, seed: int) -> set[str]:
    """The subjects of a nested, label-stratified subset holding `fraction` of each stratum.

    Within each stratum (a subject's distinct labels, `stratum_of`) subjects are ordered by
    sha256(seed, subject pseudonym) and the first ceil(fraction × stratum size) are kept (at least
    one). The order does not depend on `fraction`, so for one seed the subset of a smaller fraction
    lies inside that of a larger one (0.25 ⊂ 0.5 ⊂ 1.0), and the same inputs give the same subset.

    Args:
        subject_labels: subject pseudonym → the labels of its images.
        fraction: in (0, 1]; 1 keeps every subject.
        seed: another seed, another (equally nested) order.

    Raises:
        ConfigError: `fraction` outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"data.train_fraction: must be in (0, 1], got {fraction}")

    def order(subject: str) -> str:
        return hashlib.sha256(f"train-fraction:{int(seed)}:{subject}".encode()).hexdigest()

    kept: set[str] = set()
    for members in strata(subject_labels).values():
        n = max(1, math.ceil(fraction * len(members) - 1e-9))
        kept.update(sorted(members, key=order)[:n])
    return kept
