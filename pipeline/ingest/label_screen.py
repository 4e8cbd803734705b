"""Screening of labels.csv subgroup columns for identifier-like values (dates, names, IDs, free text, near-unique).

Subgroup columns are copied to the manifest, MLflow and the audit report, so a column whose values
look like identifiers is refused before anything is written. The error names the column, the kind
of value and the line numbers, never a value.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import DataError

_MONTH = r"(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
_DATE = re.compile(
    r"(\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|(19|20)\d{6}"
    rf"|\d{{1,2}}[ -]?{_MONTH}[ -]?\d{{2,4}}|{_MONTH} \d{{1,2}},? \d{{4}}"
    rf"|{_MONTH}[ -]?\d{{4}}|\d{{4}}[-/]\d{{1,2}}|\d{{1,2}}[-/]\d{{4}})"  # month and year: a date element too
    r"([ T]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?)?",
    re.IGNORECASE,
)
_NAME = re.compile(
    r"\b(Dr|Mr|Mrs|Ms|Miss|Mx|Prof|Sir|Dame|Nurse|Sister)\b\.?\s+[A-Z]"  # a title before a name
    r"|^[A-Za-z'-]+\^[A-Za-z'-]*"  # DICOM person name SURNAME^GIVEN
    r"|^[A-Z][a-z'-]+, ?[A-Z][a-z'-]+$"  # Surname, Given
)
_CONTACT = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+|\d{6,}|\+?\d[\d ()-]{8,}\d")  # e-mail, IDs, phone numbers
_FREE_TEXT_CHARS, _FREE_TEXT_WORDS = 80, 7  # longer than any category name (OMB race: 6 words)
_MIN_DISTINCT, _UNIQUE_SHARE = 10, 0.5
_KINDS = {
    "date": "dates",
    "name": "person names (a title such as Dr or Mr, SURNAME^GIVEN, 'Surname, Given')",
    "contact": "ID numbers, phone numbers or e-mail addresses",
    "free-text": f"free text (over {_FREE_TEXT_CHARS} characters or {_FREE_TEXT_WORDS} words)",
}


def _kind(value: str) -> str | None:
    """The kind of identifier `value` looks like, or None for an ordinary category value."""
    if _DATE.fullmatch(value):
        return "date"
    if _NAME.search(value):
        return "name"
    if _CONTACT.search(value):
        return "contact"
    if len(value) > _FREE_TEXT_CHARS or len(value.split()) > _FREE_TEXT_WORDS:
        return "free-text"
    return None


def _lines(lines: list[int], most: int = 10) -> str:
    shown = ", ".join(str(n) for n in lines[:most]) + (", ..." if len(lines) > most else "")
    return f"line {shown}" if len(lines) == 1 else f"lines {shown}"


def column_problems(records: list[dict[str, str]], column: str) -> list[str]:
    """What makes `column` identifier-like, one phrase per kind (with line numbers, never a value).

    Args:
        records: labels.csv rows as column → stripped text, in file order (line = index + 2).
        column: The column to screen.

    Returns:
        Phrases such as "dates on lines 2, 5"; also "N distinct values for M patients" when the
        column has at least 10 distinct values and more than half as many as the patients with a
        value (a category that nearly identifies a patient). Empty when the column looks categorical.
    """
    by_kind: dict[str, list[int]] = {}
    values: dict[str, set[str]] = {}
    for i, rec in enumerate(records):
        value = rec.get(column, "")
        if not value:
            continue
        values.setdefault(value, set()).add(rec.get("patient_id", ""))
        kind = _kind(value)
        if kind:
            by_kind.setdefault(kind, []).append(i + 2)
    out = [f"{_KINDS[kind]} on {_lines(lines)}" for kind, lines in by_kind.items()]
    patients = len(set().union(*values.values())) if values else 0
    if len(values) >= _MIN_DISTINCT and len(values) > _UNIQUE_SHARE * patients:
        out.append(f"{len(values)} distinct values for {patients} patients (nearly one per patient)")
    return out


def screen_subgroups(path: Path, records: list[dict[str, str]], columns: list[str], declared: Sequence[str]) -> None:
    """Refuse subgroup columns whose values look like identifiers.

    Args:
        path: The labels file (for the message).
        records: Its rows as column → stripped text, in file order.
        columns: The columns to be carried as subgroups.
        declared: The subgroups declared by the user (for the fix: those are left out of the
            config; the default ones, sex and site, are renamed or recoded in the file).

    Raises:
        DataError: Naming every refused column, the kinds of value found and their line numbers.
    """
    problems = {col: found for col in columns if (found := column_problems(records, col))}
    if not problems:
        return
    listed = "\n".join(f"  column {col!r}: {'; '.join(found)}" for col, found in problems.items())
    own = [c for c in problems if c in {str(d).strip().lower() for d in declared}]
    fixes = []
    if own:
        fixes.append(f"leave {own} out of the declared subgroups (evaluate.subgroups, or --subgroup of medxfer ingest)")
    if len(own) < len(problems):
        fixes.append("rename the column in labels.csv (sex, age and site are carried by default) or recode it")
    raise DataError(
        f"labels file {path}: subgroup column(s) {list(problems)} hold identifier-like values; subgroup columns "
        "are copied to the manifest, MLflow and the report, so they are refused (values not shown):\n"
        + listed
        + f"\nFix: {'; or '.join(fixes)}; a subgroup holds a few categories (e.g. site A, B, C)"
    )
