"""Evaluate stage: calibration on validation, test metrics with patient-level CIs, subgroups, figures.

Modules: `calibrate` (calibrators), `metrics` (pure metric functions), `uncertainty` (patient-level
bootstrap, paired comparisons, subgroups), `delong` (DeLong test of two AUROCs, image-level or
clustered by patient), `summary` (the evaluation summary), `plots` (figures).
"""

from pipeline.evaluate.calibrate import (
    CALIBRATORS,
    CHOICES,
    Calibrator,
    IsotonicCalibrator,
    TemperatureScaler,
    VectorScaler,
    choose_calibration,
    make_calibrator,
    softmax,
)
from pipeline.evaluate.delong import delong_test
from pipeline.evaluate.domain import SMD_WARN, DomainStats, Embedder, compare_domain, reference_stats
from pipeline.evaluate.metrics import (
    N_BINS,
    at_threshold,
    brier,
    brier_sum_over_classes,
    calibration_slope_intercept,
    choose_operating_point,
    classwise_ece,
    discrimination,
    ece,
    mce,
    nll,
    parse_rule,
    reliability_bins,
    scaled_brier,
)
from pipeline.evaluate.plots import (
    confusion_figure,
    forest_figure,
    learning_curve_figure,
    pr_figure,
    reliability_figure,
    roc_figure,
    save_png,
    training_curves_figure,
)
from pipeline.evaluate.summary import CONFOUNDED, MISSED_TARGET, WARNING_PHRASES, evaluation_summary, metric_key
from pipeline.evaluate.uncertainty import (
    bootstrap_ci,
    calibration_cis,
    paired_bootstrap,
    paired_comparison,
    subgroup_metrics,
    threshold_cis,
)
from pipeline.stats import auroc

__all__ = [
    "CALIBRATORS",
    "CHOICES",
    "CONFOUNDED",
    "MISSED_TARGET",
    "N_BINS",
    "SMD_WARN",
    "WARNING_PHRASES",
    "Calibrator",
    "DomainStats",
    "Embedder",
    "IsotonicCalibrator",
    "TemperatureScaler",
    "VectorScaler",
    "at_threshold",
    "auroc",
    "bootstrap_ci",
    "brier",
    "brier_sum_over_classes",
    "calibration_cis",
    "calibration_slope_intercept",
    "choose_calibration",
    "choose_operating_point",
    "classwise_ece",
    "compare_domain",
    "confusion_figure",
    "delong_test",
    "discrimination",
    "ece",
    "evaluation_summary",
    "forest_figure",
    "learning_curve_figure",
    "make_calibrator",
    "mce",
    "metric_key",
    "nll",
    "paired_bootstrap",
    "paired_comparison",
    "parse_rule",
    "pr_figure",
    "reference_stats",
    "reliability_bins",
    "reliability_figure",
    "roc_figure",
    "save_png",
    "scaled_brier",
    "softmax",
    "subgroup_metrics",
    "threshold_cis",
    "training_curves_figure",
]
