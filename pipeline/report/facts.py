"""The report context read defensively into Facts: params, metrics, artifacts, cohort, each part optional."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.report.fmt import as_list


@dataclass
class Facts:
    """The parts of a report context, each defaulting to empty when absent."""

    run_id: str = "unknown"
    experiment: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    adaptation: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)
    cohort: dict[str, Any] = field(default_factory=dict)
    ingest: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None
    context: dict[str, Any] = field(default_factory=dict)

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A config value by 'section.key': the logged config.json first, then the flat params.

        Args:
            dotted: The setting, e.g. ``"finetune.lr"``.
            default: What to return when neither holds it.
        """
        node: Any = self.config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
        return self.params.get(dotted, default)

    @property
    def classes(self) -> list[str]:
        """Class names: evaluation.json's, else the logged `classes` param, else the cohort's."""
        return [
            str(c)
            for c in (
                self.evaluation.get("classes")
                or as_list(self.params.get("classes"))
                or self.cohort.get("classes")
                or []
            )
        ]

    @property
    def calibration(self) -> dict[str, Any]:
        """Which calibration evaluation fitted and why (evaluation.json's `calibration`, a `CalibrationChoice`).

        Runs evaluated before the choice was recorded: the configured method (and the logged
        `calibration_method` tag), without a reason.
        """
        c = self.evaluation.get("calibration")
        if isinstance(c, dict) and c.get("method"):
            return c
        requested = self.setting("evaluate.calibration")
        method = self.tags.get("calibration_method") or requested
        return {"requested": requested, "method": method} if method else {}

    @property
    def evaluated(self) -> bool:
        """Whether the run has test results (evaluation.json or a logged test_auroc)."""
        return bool(self.evaluation) or "test_auroc" in self.metrics


def facts(context: dict[str, Any]) -> Facts:
    """Read a context defensively: every part may be missing or None.

    Args:
        context: A report context (what `collect_context` returns), possibly damaged.
    """

    def d(x: Any) -> dict[str, Any]:
        return x if isinstance(x, dict) else {}

    c = d(context)
    run = d(c.get("run"))

    return Facts(
        run_id=str(c.get("run_id") or run.get("run_id") or "unknown"),
        experiment=c.get("experiment"),
        params=d(run.get("params")),
        metrics=d(run.get("metrics")),
        tags=d(run.get("tags")),
        history=d(run.get("history")),
        run=d(run),
        config=d(c.get("config")),
        adaptation=d(c.get("adaptation")),
        training=d(c.get("training")),
        evaluation=d(c.get("evaluation")),
        figures=d(c.get("figures")),
        cohort=d(c.get("cohort")),
        ingest=d(c.get("ingest")),
        baseline=d(c.get("baseline")) or None,
        context=c,
    )
