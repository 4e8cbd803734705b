"""Report stage: the self-contained HTML audit report of one MLflow run."""

from pipeline.report.audit import collect_context, render_report, write_report

__all__ = ["collect_context", "render_report", "write_report"]
