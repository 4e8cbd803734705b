"""Turn a report context into the view the template renders: header, every section (each guarded), warnings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline import __version__
from pipeline.report.compare import negative_transfer
from pipeline.report.facts import Facts, facts
from pipeline.report.fmt import DASH, as_float, note, section
from pipeline.report.results import (
    calibration_section,
    note_level,
    performance_section,
    provenance_section,
    subgroups_section,
    transfer_section,
)
from pipeline.report.sections import (
    cohort_section,
    exclusions_section,
    model_section,
    preprocessing_section,
    training_section,
)
from pipeline.report.summary import summary_section

_HEADS = ("head.", "classifier.", "fc.", "_fc.")  # replaced on purpose: new head in, ImageNet classifier out


def build_view(context: dict[str, Any]) -> dict[str, Any]:
    """The template's variables: header, summary, sections (each a list of blocks) and warnings.

    Args:
        context: A report context (what `collect_context` returns); any part may be missing or malformed.

    Returns:
        ``title``, ``header`` (label, value pairs), ``sections`` and ``version`` for template.html.
    """
    f = facts(context)
    try:
        warnings = warning_lines(f)
    except _SHAPE_ERRORS as exc:
        warnings = [{"level": "warn", "text": f"warnings could not be collected ({type(exc).__name__}: {exc})"}]
    builders: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
        ("summary", "Summary", lambda: summary_section(f, warnings)),
        ("cohort", "Cohort", lambda: cohort_section(f)),
        ("exclusions", "Exclusions", lambda: exclusions_section(f)),
        ("preprocessing", "Preprocessing", lambda: preprocessing_section(f)),
        ("model", "Model card", lambda: model_section(f)),
        ("training", "Training", lambda: training_section(f)),
        ("performance", "Test performance", lambda: performance_section(f)),
        ("calibration", "Calibration", lambda: calibration_section(f)),
        ("subgroups", "Subgroups", lambda: subgroups_section(f)),
        ("transfer", "Transfer gain", lambda: transfer_section(f)),
        ("provenance", "Provenance", lambda: provenance_section(f)),
    ]
    sections = [_guarded(sid, title, build) for sid, title, build in builders]
    sections.append(
        section(
            "warnings", "Warnings", [{"type": "warnings", "items": warnings}] if warnings else [note("No warnings.")]
        )
    )
    title = f"Audit report: {f.experiment or f.setting('experiment') or 'medxfer run'}"
    header = [
        ("run", f.run_id),
        ("experiment", f.experiment or f.setting("experiment") or DASH),
        ("trained", f.run.get("start_time") or DASH),
        ("generated", f.context.get("generated_at") or DASH),
        ("status", f.tags.get("stage") or f.run.get("status") or DASH),
    ]
    return {"title": title, "header": header, "sections": sections, "version": __version__}


# What malformed run data raises (a string where a list belongs, ...): a section says so, the report goes on.
_SHAPE_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError)


def _guarded(sid: str, title: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return build()
    except _SHAPE_ERRORS as exc:
        return section(
            sid,
            title,
            [
                note(
                    f"This section could not be rendered: the run's data for it is malformed "
                    f"({type(exc).__name__}: {exc}). The other sections are unaffected.",
                    "warn",
                )
            ],
        )


def warning_lines(f: Facts) -> list[dict[str, str]]:
    """Everything an auditor should look at, each {'level': 'warn'|'info', 'text': ...}."""
    out: list[dict[str, str]] = [{"level": "warn", "text": str(p)} for p in f.context.get("problems") or []]
    m, a = f.metrics, f.adaptation

    def add(text: str, level: str = "warn") -> None:
        out.append({"level": level, "text": text})

    if not f.evaluated:
        add("The run has not been evaluated: no test metrics, calibration or subgroup results.")
    if f.run.get("status") not in (None, "FINISHED"):
        add(f"MLflow run status is {f.run.get('status')}: the run may be incomplete.")
    hash_now, mhash = f.cohort.get("manifest_hash"), f.tags.get("manifest_hash")
    if hash_now and mhash and hash_now != mhash:
        add(
            f"The manifest changed since training (hash {mhash} at training, {hash_now} now): cohort and exclusion "
            "tables describe the current manifest."
        )
    q = (f.ingest.get("quarantine") or {}) if f.ingest else {}
    if q:
        add(f"{sum(q.values())} file(s) were quarantined at ingest ({', '.join(q)}); see Exclusions.", "info")
    if f.cohort.get("n_flagged"):
        add(f"{f.cohort['n_flagged']} image unit(s) carry ingest warnings; see Exclusions.", "info")
    odd = [str(k) for k in a.get("missing_keys") or [] if not str(k).startswith(_HEADS)] + [
        str(k) for k in a.get("unexpected_keys") or [] if not str(k).startswith(_HEADS)
    ]
    if odd:
        add(
            f"Loading the pretrained weights left {len(odd)} tensor(s) outside the classifier head unmatched "
            f"({', '.join(odd[:4])}{', …' if len(odd) > 4 else ''}): those layers are not pretrained."
        )
    lo, hi = as_float(m.get("test_auroc_ci_low")), as_float(m.get("test_auroc_ci_high"))
    if lo is not None and hi is not None and hi - lo > 0.2:
        add(f"The test AUROC CI is wide ({hi - lo:.2f}): the test set is small for firm conclusions.")
    few = [r for r in f.evaluation.get("subgroups") or [] if isinstance(r, dict) and r.get("too_few")]
    if few:
        add(
            f"{len(few)} subgroup(s) too small for an AUROC: "
            + ", ".join(f"{str(r.get('attribute')).replace('_', ' ')} = {r.get('value')}" for r in few[:8])
            + ("…" if len(few) > 8 else ""),
            "info",
        )
    times = as_float(f.tags.get("test_evaluations"))
    if times is not None and times > 1:
        add(
            f"This test split has been evaluated {int(times)} times (this evaluation included; the log is "
            "test_evaluations.json beside the manifest): settings chosen after seeing earlier test results make "
            "its numbers optimistic."
        )
    elif times == 1:
        add("This is the test split's first evaluation.", "info")
    for text in f.evaluation.get("notes") or []:
        add(str(text), note_level(str(text)))
    transfer = negative_transfer(f.context.get("comparison"))
    if transfer:
        add(f"{transfer} See Transfer gain.")
    if str(f.setting("model.weights")) != "none" and not f.baseline:
        add("No from-scratch baseline: the transfer gain is not measured (see Transfer gain).", "info")
    return out
