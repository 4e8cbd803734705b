"""The optional labels.csv `split` column: a predefined (official) split, checked per patient, all problems at once."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from pipeline.errors import DataError, did_you_mean
from pipeline.records import SPLITS

SPLIT_COLUMN = "split"
_ALIASES = {"training": "train", "validation": "val", "valid": "val", "dev": "val", "testing": "test"}
_SHOWN = 20  # problems listed in the error; the rest are counted


def check_split_column(path: Path, records: list[dict[str, str]]) -> bool:
    """Validate the split column of labels.csv rows and say whether it defines the split.

    Rules: a value is train, val or test (exactly) or empty; all rows of one patient_id carry the
    same value; either every labelled patient (one with a non-empty label on some row) has a value
    or none does. Rows without a patient_id are skipped (read_labels reports them).

    Args:
        path: The labels file (for the message).
        records: Its rows as column → stripped text, in file order (line = index + 2).

    Returns:
        True when every labelled patient has a split (the column defines the split), False when
        none has one (the keyed-hash split is used).

    Raises:
        DataError: Listing, by line number, every bad value (with the allowed values and a
            did-you-mean hint), every patient whose rows disagree, and how many labelled patients
            lack a split when others have one.
    """
    rows: dict[str, list[tuple[int, str]]] = defaultdict(list)  # patient_id → (line, value) of each row
    labelled: set[str] = set()
    for i, rec in enumerate(records):
        if rec["patient_id"]:
            rows[rec["patient_id"]].append((i + 2, rec[SPLIT_COLUMN]))
            if rec["label"]:
                labelled.add(rec["patient_id"])
    problems, fixes = [], []
    bad = [(line, v) for entries in rows.values() for line, v in entries if v and v not in SPLITS]
    if bad:
        problems += [f"line {line}: {v[:40]!r} is not a split value{_suggest(v)}" for line, v in sorted(bad)]
        fixes.append("write train, val or test, in lower case")
    differ = [entries for entries in rows.values() if len({v for _, v in entries}) > 1]
    if differ:
        problems += [_differ_problem(entries) for entries in sorted(differ)]
        fixes.append("give every row of a patient the same split")
    having = [p for p in labelled if any(v for _, v in rows[p])]
    lacking = sorted(rows[p][0][0] for p in labelled if not any(v for _, v in rows[p]))
    if having and lacking:
        problems.append(_mix_problem(lacking, len(labelled)))
        fixes.append(
            f"give the {len(lacking)} labelled patient(s) without one a split, or leave the split column "
            "empty on every row (or remove it) to use the keyed-hash split of data.split"
        )
    if problems:
        raise DataError(_message(path, problems, fixes))
    return bool(having)


def _suggest(value: str) -> str:
    alias = _ALIASES.get(value.casefold())
    return f" (did you mean '{alias}'?)" if alias else did_you_mean(value.casefold(), SPLITS)


def _lines(lines: list[int], most: int = 10) -> str:
    """Line numbers as text: "line 5", "lines 3, 5", or the first `most` of them and "..."."""
    shown = ", ".join(str(line) for line in lines[:most]) + (", ..." if len(lines) > most else "")
    return f"line {shown}" if len(lines) == 1 else f"lines {shown}"


def _differ_problem(entries: list[tuple[int, str]]) -> str:
    values = ", ".join(repr(v[:40]) for v in sorted({v for _, v in entries}))
    return f"{_lines([line for line, _ in entries], 50)} (one patient): different split values {values}"


def _mix_problem(lacking: list[int], n_labelled: int) -> str:
    return (
        f"{len(lacking)} of {n_labelled} labelled patients have no split value ({_lines(lacking)}) while the "
        "others have one; either every labelled patient has a split value or none does"
    )


def _message(path: Path, problems: list[str], fixes: list[str]) -> str:
    listed = [f"  {p}" for p in problems[:_SHOWN]]
    if len(problems) > _SHOWN:
        listed.append(f"  ... and {len(problems) - _SHOWN} more")
    return (
        f"labels file {path}: column {SPLIT_COLUMN!r} has {len(problems)} problem(s) "
        f"(allowed values: {', '.join(SPLITS)}):\n" + "\n".join(listed) + f"\nFix: {'; '.join(fixes)}"
    )
