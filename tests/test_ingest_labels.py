"""labels.csv validation: every problem at once by line number, age bands, dropped identifying columns."""

from __future__ import annotations

import pytest

from pipeline.errors import DataError
from pipeline.ingest.labels import age_band, label_warnings, read_labels, unmatched_rows
from pipeline.ingest.pseudonym import pseudonym

KEY = bytes(range(32))


def _write(tmp_path, text: str):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("value", "band"),
    [
        ("64", "60-69"),
        ("60", "60-69"),
        ("059Y", "50-59"),
        ("9.5", "0-9"),
        ("18M", "0-9"),
        ("90", "90+"),
        ("104", "90+"),
        ("", ""),
        ("old", None),
        ("-3", None),
    ],
)
def test_age_band(value, band):
    assert age_band(value) == band


def test_missing_columns_name_file_found_and_expected(tmp_path):
    path = _write(tmp_path, "patient,diagnosis\nP1,1\n")
    with pytest.raises(
        DataError,
        match=(
            r"labels\.csv lacks column\(s\) patient_id, label"
            r".*found columns \['patient', 'diagnosis'\], expected patient_id,label"
        ),
    ):
        read_labels(path, KEY)


def test_misspelled_column_gets_a_hint(tmp_path):
    with pytest.raises(DataError, match="did you mean 'lable'"):
        read_labels(_write(tmp_path, "patient_id,lable\nP1,1\n"), KEY)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_labels(tmp_path / "nope.csv", KEY)


def test_every_problem_reported_by_line(tmp_path):
    path = _write(
        tmp_path,
        "patient_id,label,sex,age,site\n"  # line 1
        "P1,1,F,64,A\n"  # 2
        "P2,0,M,71,B\n"  # 3
        "P1,1,F,64,A\n"  # 4 exact duplicate of 2
        "P2,1,M,71,B\n"  # 5 conflicts with 3
        ",1,F,50,A\n"  # 6 empty patient_id
        "P3,,F,50,A\n"  # 7 empty label
        "P4,0,F,old,A\n",
    )  # 8 bad age
    table = read_labels(path, KEY)
    unmatched_rows(table, {pseudonym(KEY, "subject", p) for p in ("P1", "P2", "P3")}, set())
    problems = {(p["line"], p["problem"]) for p in table.problems}
    assert problems == {
        (4, "duplicate"),
        (5, "conflict"),
        (6, "empty-patient-id"),
        (7, "empty-label"),
        (8, "bad-age"),
        (8, "no-images"),
    }
    conflict = next(p for p in table.problems if p["problem"] == "conflict")
    assert "line 3" in conflict["detail"]
    assert "label" in conflict["detail"]
    assert table.n_conflicts == 1
    p1 = table.by_subject[pseudonym(KEY, "subject", "P1")]
    assert (p1.label, p1.extras) == ("1", {"sex": "F", "site": "A", "age_band": "60-69"})
    assert table.by_subject[pseudonym(KEY, "subject", "P2")].label == ""  # conflicting: unlabeled


def test_identifying_and_reserved_columns_are_dropped(tmp_path):
    path = _write(
        tmp_path,
        "patient_id,label,Patient_Name,birth_date,site,accession,study_uid,split,scanner,age\n"
        "P1,1,Doe^J,19500101,A,ACC1,1.2.3,train,X1,64\n",
    )
    table = read_labels(path, KEY, subgroups=["scanner"])
    assert table.carried == ["age_band", "site", "scanner"]
    assert set(table.dropped) == {"patient_name", "birth_date", "accession", "study_uid"}  # split is consumed
    assert any("not carried" in w for w in table.warnings)
    assert table.split_given
    undeclared = read_labels(path, KEY)  # only sex, age and site are carried unless declared
    assert undeclared.carried == ["age_band", "site"]
    assert undeclared.not_declared == ["scanner"]


def test_patient_ids_are_stored_only_as_pseudonyms(tmp_path):
    table = read_labels(_write(tmp_path, "patient_id,label\nMRN-424242,1\nMRN-777,0\n"), KEY)
    assert "MRN-424242" not in repr(table)
    assert set(table.by_subject) == {pseudonym(KEY, "subject", "MRN-424242"), pseudonym(KEY, "subject", "MRN-777")}


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        (["0", "1", "abnormal"], "mix numbers and text"),
        (["1", "1.0", "0"], "look like one value written differently"),
        (["Normal", "normal", "tumour"], "look like one value written differently"),
        (["1", "1"], "only one label value"),
    ],
)
def test_label_warnings(labels, fragment):
    assert any(fragment in w for w in label_warnings(labels))


def test_clean_labels_have_no_warnings():
    assert label_warnings(["0", "1", "1", "0"]) == []


# ------------------------------------------------------------------------------ the split column


def test_split_column_is_read_per_row_and_not_carried(tmp_path):
    table = read_labels(_write(tmp_path, "patient_id,label,split,site\nP1,1,test,A\nP2,0,train,B\nP3,,,B\n"), KEY)
    assert table.split_given
    assert table.carried == ["site"]
    assert "split" not in table.dropped
    assert table.by_subject[pseudonym(KEY, "subject", "P1")].split == "test"
    assert table.by_subject[pseudonym(KEY, "subject", "P3")].split == ""  # unlabeled: needs none


def test_an_empty_split_column_means_the_keyed_hash_split(tmp_path):
    table = read_labels(_write(tmp_path, "patient_id,label,split\nP1,1,\nP2,0,\n"), KEY)
    assert not table.split_given
    assert any("gives no labelled patient a split; the keyed-hash split is used" in w for w in table.warnings)


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("training", "did you mean 'train'"),
        ("Train", "did you mean 'train'"),
        ("validation", "did you mean 'val'"),
        ("TEST", "did you mean 'test'"),
        ("holdout", ""),
    ],
)
def test_bad_split_values_are_listed_with_lines_allowed_values_and_a_hint(tmp_path, value, hint):
    path = _write(tmp_path, f"patient_id,label,split\nP1,1,train\nP2,0,{value}\nP3,0,{value}\n")
    message = rf"line 3: '{value}' is not a split value(?s:.*)line 4: '{value}'"
    with pytest.raises(DataError, match=message) as info:
        read_labels(path, KEY)
    text = str(info.value)
    assert "allowed values: train, val, test" in text
    assert hint in text if hint else "did you mean" not in text
    assert "Fix: write train, val or test, in lower case" in text


def test_rows_of_one_patient_must_agree_on_the_split(tmp_path):
    path = _write(
        tmp_path,
        "patient_id,label,path,split\nP1,1,P1/a.nii,train\nP2,0,,val\nP1,1,P1/b.nii,test\nP3,1,,test\nP3,1,,test\n",
    )
    with pytest.raises(
        DataError, match=r"lines 2, 4 \(one patient\): different split values 'test', 'train'(?s:.*)Fix: give every row"
    ):
        read_labels(path, KEY)


def test_a_mix_of_patients_with_and_without_a_split_is_an_error(tmp_path):
    path = _write(tmp_path, "patient_id,label,split\nP1,1,train\nP2,0,\nP3,0,test\nP4,1,\nP5,,\n")
    with pytest.raises(DataError) as info:
        read_labels(path, KEY)
    text = str(info.value)
    assert (
        "2 of 4 labelled patients have no split value (lines 3, 5) while the others have one; "
        "either every labelled patient has a split value or none does"
    ) in text
    assert (
        "Fix: give the 2 labelled patient(s) without one a split, or leave the split column empty on every row "
        "(or remove it) to use the keyed-hash split of data.split"
    ) in text


def test_every_split_problem_at_once_and_no_patient_ids(tmp_path):
    path = _write(
        tmp_path,
        "patient_id,label,path,split\nMRN-1,1,,training\nMRN-2,0,x.nii,val\nMRN-2,0,y.nii,test\nMRN-3,1,,\n",
    )
    with pytest.raises(DataError, match=r"column 'split' has 3 problem\(s\)") as info:
        read_labels(path, KEY)
    text = str(info.value)
    assert "line 2: 'training'" in text
    assert "lines 3, 4 (one patient)" in text
    assert "1 of 3 labelled patients have no split value (line 5)" in text
    assert "MRN" not in text.replace(str(path), "")
