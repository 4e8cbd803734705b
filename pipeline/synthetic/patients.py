"""The simulated patients of a synthetic cohort: site, name, demographics, label and a seed each."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np

# site -> (manufacturer, X-ray model, CT model, institution, CXR pixel spacing (mm),
#          CXR rows x columns, CT kernels (sharp, soft))
SITES: dict[str, tuple[str, str, str, str, str, tuple[int, int], tuple[str, str]]] = {
    "site-A": (
        "GE MEDICAL SYSTEMS",
        "Definium 6000",
        "Revolution CT",
        "NORTHGATE GENERAL HOSPITAL",
        "1.4",
        (256, 256),
        ("LUNG", "STANDARD"),
    ),
    "site-B": (
        "SIEMENS",
        "Ysio Max",
        "SOMATOM Definition AS",
        "ST. MARY UNIVERSITY CLINIC",
        "1.39",
        (256, 256),
        ("B70f", "B30f"),
    ),
    "site-C": ("Philips", "PCR Eleva S", "Ingenuity CT", "RIVERSIDE MEDICAL CENTRE", "1.43", (256, 240), ("YC", "B")),
}
_SITE_P = (0.4, 0.35, 0.25)
_SURNAMES = (
    "KOWALSKI NOWAK SMITH GARCIA MULLER ROSSI DUBOIS JANSSEN SILVA OKAFOR TANAKA NGUYEN "
    "PATEL COHEN HANSEN LINDQVIST MURPHY SCHMIDT FISCHER BERNARD KOVACS NOVAK IVANOV "
    "HASSAN OLSEN MORENO BROWN WILSON YILMAZ PETERS"
).split()
_GIVEN = {
    "F": "ANNA MARIA SOPHIE EMMA JULIA LAURA ELENA SARAH HANNA CLARA NADIA AMARA".split(),
    "M": "JAN PIOTR LUCAS DAVID MARCO THOMAS AHMED KENJI ERIK PAUL MATEO OMAR".split(),
}


@dataclass
class Patient:
    """One synthetic patient: identifiers and demographics (fake PHI that ingest must remove), label, own RNG."""

    index: int
    patient_id: str
    name: str
    sex: str
    age: int
    birth: date
    study_date: date
    site: str
    label: int
    accession: str
    rng: np.random.Generator


def make_patients(rng: np.random.Generator, n: int, fraction: float, seed: int) -> list[Patient]:
    """`n` patients, round(fraction·n) of them positive (at least one of each class), in random order."""
    n_pos = min(max(round(fraction * n), 1), n - 1)
    labels = rng.permutation(np.r_[np.ones(n_pos, int), np.zeros(n - n_pos, int)])
    mrns = rng.choice(9_000_000, size=n, replace=False) + 1_000_000
    children = np.random.SeedSequence([seed, 7919]).spawn(n)
    out = []
    for i in range(n):
        sex = "F" if rng.random() < 0.5 else "M"
        age = int(rng.integers(22, 91))
        study = date(2018, 1, 1) + timedelta(days=int(rng.integers(0, 6 * 365)))
        birth = study - timedelta(days=age * 365 + int(rng.integers(1, 360)))
        site = str(rng.choice(list(SITES), p=_SITE_P))
        name = f"{rng.choice(_SURNAMES)}^{rng.choice(_GIVEN[sex])}"
        acc = f"{site[-1]}{study.year}{int(rng.integers(0, 10**6)):06d}"
        out.append(
            Patient(
                i,
                f"MRN{int(mrns[i])}",
                name,
                sex,
                age,
                birth,
                study,
                site,
                int(labels[i]),
                acc,
                np.random.default_rng(children[i]),
            )
        )
    return out
