"""Turn a report context into the view the template renders: header, every section (each guarded), warnings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline import __version__
from pipeline.report.facts import facts
from pipeline.report.fmt import DASH, note, section
from pipeline.report.results import (
    calibration_section,
    performance_section,
    provenance_section,
    subgroups_section,
    transfer_section,
    warning_lines,
)
from pipeline.report.sections import (
    cohort_section,
    exclusions_section,
    model_section,
    preprocessing_section,
    training_section,
)
from pipeline.report.summary import summary_section


def build_view(context: dict[str, Any]) -> dict[str, Any]:
    """The template's variables: header, summary, sections (each a list of blocks) and warnings."""
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
