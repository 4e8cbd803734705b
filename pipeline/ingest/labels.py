"""labels.csv: read and validate (every problem at once, by line number), age bands, join to units and split."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from pipeline.errors import ConfigError, DataError, did_you_mean
from pipeline.ingest.label_screen import screen_subgroups
from pipeline.ingest.label_splits import SPLIT_COLUMN, check_split_column
from pipeline.ingest.pseudonym import pseudonym
from pipeline.ingest.splits import assign_splits, empty_split_warnings
from pipeline.records import MANIFEST_COLUMNS

REQUIRED = ("patient_id", "label")
SUBGROUPS_FIRST = ("sex", "age_band", "site")
DEFAULT_SUBGROUPS = ("sex", "age", "site")  # carried when present; any other column only when declared
_CONSUMED = {"patient_id", "label", "path", "age", "modality", SPLIT_COLUMN}
_IDENTIFYING = (
    "name",
    "birth",
    "dob",
    "accession",
    "mrn",
    "ssn",
    "address",
    "phone",
    "email",
    "institution",
    "patientid",
    "patient_id",
)
_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([YMWD]?)$", re.IGNORECASE)
_PER_YEAR = {"": 1.0, "Y": 1.0, "M": 12.0, "W": 52.0, "D": 365.0}


@dataclass
class LabelRow:
    """One usable labels.csv row, already pseudonymised."""

    line: int
    subject_id: str
    path: str  # relative to SOURCE (posix), "" when the row joins by patient_id
    label: str
    extras: dict[str, str]
    modality: str = ""
    split: str = ""  # the labels.csv split column ("" when absent or empty)


@dataclass
class LabelTable:
    """A validated labels file: rows to join on, and every problem found, by line number."""

    columns: list[str]
    carried: list[str]
    dropped: list[str]
    n_rows: int
    by_subject: dict[str, LabelRow] = field(default_factory=dict)
    by_path: dict[str, LabelRow] = field(default_factory=dict)
    problems: list[dict[str, object]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    n_conflicts: int = 0
    not_declared: list[str] = field(default_factory=list)  # columns left out: no subgroup declares them
    split_given: bool = False  # the split column gives every labelled patient's split


def age_band(value: str) -> str | None:
    """Decade band of an age: "64" or "064Y" → "60-69"; 90 and over → "90+"; "" → "".

    Returns:
        The band, "" for an empty value, or None when the value is not an age.
    """
    text = str(value).strip()
    if not text:
        return ""
    m = _AGE.match(text)
    if not m:
        return None
    years = float(m.group(1)) / _PER_YEAR[m.group(2).upper()]
    if years >= 90:
        return "90+"
    low = int(years // 10) * 10
    return f"{low}-{low + 9}"


def _is_identifying(column: str) -> bool:
    squashed = column.replace("_", "").replace(" ", "")
    return column.endswith("uid") or any(w in column or w in squashed for w in _IDENTIFYING)


def _subgroup_name(name: str) -> str:
    """A declared subgroup as a labels column name: lower case; "age" means the age_band made from age."""
    name = str(name).strip().lower()
    return "age_band" if name == "age" else name


def _columns(columns: list[str], subgroups: Sequence[str] = ()) -> tuple[list[str], list[str], list[str]]:
    """(subgroup columns carried to the manifest, in order; columns dropped as identifying or clashing;
    columns not carried because no subgroup declares them).

    Raises:
        ConfigError: A declared subgroup names an identifying column (names, birth dates, IDs, UIDs).
    """
    declared = {_subgroup_name(s) for s in (*DEFAULT_SUBGROUPS, *subgroups)}
    identifying = sorted(s for s in declared if _is_identifying(s))
    if identifying:
        raise ConfigError(
            f"subgroup column(s) {identifying} name identifiers (names, birth dates, IDs, UIDs, contact details); "
            "subgroups are copied to the manifest, MLflow and the report, so these are refused. Fix: remove them "
            "from evaluate.subgroups (or from --subgroup of medxfer ingest)"
        )
    carried, dropped, undeclared = [], [], []
    for col in columns:
        if col in _CONSUMED:
            continue
        if _is_identifying(col) or col in MANIFEST_COLUMNS or col == "age_band":
            dropped.append(col)
        elif col in declared:
            carried.append(col)
        else:
            undeclared.append(col)
    if "age" in columns and "age_band" in declared:
        carried.append("age_band")
    first = [c for c in SUBGROUPS_FIRST if c in carried]
    return first + [c for c in carried if c not in first], dropped, undeclared


def _read_frame(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(
            f"labels file {path} not found; pass a CSV with columns "
            "patient_id,label[,sex,age,site,...] or leave labels out to ingest unlabeled"
        )
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(
            f"labels file {path} is not a readable UTF-8 CSV ({type(exc).__name__}: "
            f"{str(exc).strip()[:200]}); expected a header line patient_id,label[,...]"
        ) from exc
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        hints = "".join(did_you_mean(c, frame.columns) for c in missing)
        raise DataError(
            f"labels file {path} lacks column(s) {', '.join(missing)}{hints}; found columns "
            f"{list(frame.columns)}, expected patient_id,label[,sex,age,site,...]. "
            "Fix: rename the header line"
        )
    return frame.fillna("").map(lambda v: str(v).strip())


def _norm_path(value: str) -> str:
    text = value.replace("\\", "/").strip()
    return str(PurePosixPath(text)) if text else ""


def read_labels(path: str | Path, key: bytes, subgroups: Sequence[str] = ()) -> LabelTable:
    """Read labels.csv, hash patient_id with the pseudonym key and list every problem by line.

    Line numbers count the header as line 1. Exact duplicate rows are reported and used once;
    conflicting duplicates (same patient_id, or same path, different values) are reported and
    the patient stays unlabeled. Only the label, the split and subgroup columns are carried:
    sex, age (as age_band) and site when present, plus the columns named in `subgroups`; every
    other column (free text such as comments) is left out, identifying ones (names, birth
    dates, UIDs, ...) always. Carried columns are screened by `screen_subgroups`.
    An optional ``split`` column (train, val or test per patient) is checked by
    `check_split_column`; when it gives every labelled patient a split, ``split_given`` is set and
    each row's ``split`` is the split to use; it is never carried to the manifest.

    Raises:
        DataError: If the file is missing, unreadable or lacks patient_id/label (the message
            names the file, the columns found and the columns expected), its split column is
            invalid (every problem by line number), or a carried column holds identifier-like
            values (see `screen_subgroups`).
        ConfigError: If `subgroups` names an identifying column.
    """
    frame = _read_frame(Path(path))
    columns = list(frame.columns)
    carried, dropped, undeclared = _columns(columns, subgroups)
    records = frame.to_dict("records")
    screen_subgroups(Path(path), records, [c for c in carried if c != "age_band"], subgroups)
    table = LabelTable(columns=columns, carried=carried, dropped=dropped, n_rows=len(frame), not_declared=undeclared)
    if SPLIT_COLUMN in columns:
        table.split_given = check_split_column(Path(path), records)
        if not table.split_given:
            table.warnings.append(
                f"labels column {SPLIT_COLUMN!r} gives no labelled patient a split; the keyed-hash split is used"
            )
    first: dict[tuple[str, str], tuple[int, tuple[str, ...]]] = {}
    rows: dict[tuple[str, str], LabelRow] = {}
    for i, rec in enumerate(records):
        line, pid, rel = i + 2, rec["patient_id"], _norm_path(rec.get("path", ""))
        if not pid:
            table.problems.append({"line": line, "problem": "empty-patient-id", "detail": "patient_id is empty"})
            continue
        values = tuple(rec[c] for c in columns)
        if (pid, rel) in first:
            _duplicate(table, rows, (pid, rel), line, first[(pid, rel)], values, columns)
            continue
        first[(pid, rel)] = (line, values)
        rows[(pid, rel)] = _row(table, rec, line, key, rel)
    for (_, rel), row in rows.items():
        (table.by_path if rel else table.by_subject)[rel or row.subject_id] = row
    table.warnings += label_warnings([r.label for r in rows.values()])
    if dropped:
        table.warnings.append(f"labels columns not carried to the manifest (identifying or reserved names): {dropped}")
    if undeclared:
        table.warnings.append(
            f"labels columns not carried to the manifest (not declared as subgroups): {undeclared}; declare a "
            "categorical one in evaluate.subgroups (medxfer ingest: --subgroup COLUMN) to carry it"
        )
    missing = sorted({_subgroup_name(s) for s in subgroups} - {*carried, *MANIFEST_COLUMNS})
    if missing:
        table.warnings.append(f"declared subgroup column(s) {missing} are not in the labels file")
    return table


def _row(table: LabelTable, rec: dict[str, str], line: int, key: bytes, rel: str) -> LabelRow:
    extras = {c: rec[c] for c in table.carried if c != "age_band"}
    if "age" in rec:
        band = age_band(rec["age"])
        if band is None:
            table.problems.append(
                {
                    "line": line,
                    "problem": "bad-age",
                    "detail": "age is not a number of years (e.g. 64 or 064Y); age_band left empty",
                }
            )
        extras["age_band"] = band or ""
    if not rec["label"]:
        table.problems.append(
            {"line": line, "problem": "empty-label", "detail": "label is empty: this patient's images stay unlabeled"}
        )
    subject = pseudonym(key, "subject", rec["patient_id"])
    return LabelRow(
        line, subject, rel, rec["label"], extras, rec.get("modality", "").upper(), rec.get(SPLIT_COLUMN, "")
    )


def _duplicate(
    table: LabelTable,
    rows: dict,
    k: tuple[str, str],
    line: int,
    first: tuple[int, tuple[str, ...]],
    values: tuple[str, ...],
    columns: list[str],
) -> None:
    first_line, first_values = first
    if values == first_values:
        table.problems.append({"line": line, "problem": "duplicate", "detail": f"same as line {first_line}; used once"})
        return
    differ = [c for c, a, b in zip(columns, first_values, values, strict=True) if a != b]
    what = "patient_id and path" if k[1] else "patient_id"
    table.problems.append(
        {
            "line": line,
            "first_line": first_line,
            "problem": "conflict",
            "detail": f"same {what} as line {first_line} but different {', '.join(differ)}; "
            "the images of this row stay unlabeled until one row is removed",
        }
    )
    table.n_conflicts += 1
    row = rows[k]
    row.label, row.extras = "", {c: "" for c in row.extras}


def unmatched_rows(table: LabelTable, subjects: set[str], paths: set[str]) -> None:
    """Add a "no-images" problem for every row whose patient (or path) matched no image unit."""
    for row in [*table.by_subject.values(), *table.by_path.values()]:
        if (row.path and row.path not in paths) or (not row.path and row.subject_id not in subjects):
            what = "path matches no NIfTI file under SOURCE" if row.path else "no images for this patient_id"
            table.problems.append({"line": row.line, "problem": "no-images", "detail": what})
    table.problems.sort(key=lambda p: (int(p["line"]), str(p["problem"])))  # type: ignore[call-overload]


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def label_warnings(labels: list[str]) -> list[str]:
    """Warnings for label sets that look wrong: numbers mixed with text, one number written two ways, case variants."""
    distinct = sorted({lab for lab in labels if lab})
    numeric = [lab for lab in distinct if _as_number(lab) is not None]
    out = []
    if numeric and len(numeric) < len(distinct):
        out.append(f"labels mix numbers and text: {distinct[:12]}; all are kept as strings (distinct classes)")
    groups: dict[object, list[str]] = defaultdict(list)
    for lab in distinct:
        num = _as_number(lab)
        groups[num if num is not None else lab.casefold()].append(lab)
    for same in groups.values():
        if len(same) > 1:
            out.append(f"labels {same} look like one value written differently; they count as different classes")
    if len(distinct) == 1:
        out.append(f"only one label value ({distinct[0]!r}) in the labels file; training needs at least two")
    return out


def join_labels(
    units: list[dict],
    table: LabelTable | None,
    key: bytes,
    *,
    val: float,
    test: float,
    seed: int,
    previous: Mapping[str, str] | None = None,
) -> list[str]:
    """Set label, subgroup columns and split on every unit row (in place).

    A NIfTI unit joins the labels row naming its path, else the row of its subject; DICOM units
    join by subject (the keyed hash of PatientID). Splits are per subject: the labels.csv split
    column when it is given (`table.split_given`; `val`, `test`, `seed` and `previous` are then
    ignored), else splits.py (subjects in `previous` keep their split, the others are placed
    stratified by label). Unlabeled units get split "". Rows that matched nothing are added to
    the table's problems.

    Returns:
        Warnings from the split assignment (e.g. a label with no val/test subjects).
    """
    for unit in units:
        row = None
        if table is not None:
            by_path = table.by_path.get(unit["_path"]) if unit["source_format"] == "nifti" else None
            row = by_path or table.by_subject.get(unit["subject_id"])
        unit["label"] = row.label if row is not None else ""
        unit["split"] = row.split if row is not None and table is not None and table.split_given else ""
        unit.update({c: (row.extras.get(c, "") if row is not None else "") for c in (table.carried if table else [])})
    subject_labels: dict[str, list[str]] = defaultdict(list)
    for unit in units:
        subject_labels[unit["subject_id"]].append(unit["label"])
    if table is not None and table.split_given:  # every labelled row has a split, one per patient
        splits = {u["subject_id"]: u["split"] for u in units if u["label"]}
        notes = empty_split_warnings(
            subject_labels, splits, ("val", "test"), "the labels.csv split column puts none there"
        )
    else:
        splits, notes = assign_splits(subject_labels, key, val=val, test=test, seed=seed, previous=previous)
    for unit in units:
        unit["split"] = splits.get(unit["subject_id"], "") if unit["label"] else ""
    if table is not None:
        unmatched_rows(
            table, {u["subject_id"] for u in units}, {u["_path"] for u in units if u["source_format"] == "nifti"}
        )
    return notes
