"""The summary section: task, model and data lines, headline metric cards and one-line verdicts."""

from __future__ import annotations

from typing import Any

from pipeline.report.compare import paired_auroc
from pipeline.report.facts import Facts
from pipeline.report.fmt import DASH, NA, as_float, calibration_name, count, kv, note, num, section, with_ci


def headline(f: Facts) -> str | None:
    """'AUROC 0.87 (95% CI 0.80–0.93) on 72 test images from 72 patients', or None before evaluation."""
    m = f.metrics
    if as_float(m.get("test_auroc")) is None:
        return None
    text = f"AUROC {num(m['test_auroc'], 2)}"
    if as_float(m.get("test_auroc_ci_low")) is not None and as_float(m.get("test_auroc_ci_high")) is not None:
        text += f" (95% CI {num(m['test_auroc_ci_low'], 2)}–{num(m['test_auroc_ci_high'], 2)})"
    n_img = as_float(m.get("test_n_images")) or as_float(f.params.get("n_test"))
    if n_img is not None:
        text += f" on {count(n_img)} test images"
        if as_float(m.get("test_n_patients")) is not None:
            text += f" from {count(m['test_n_patients'])} patients"
    return text


def _task(f: Facts) -> str:
    classes = f.classes
    kind = "binary" if len(classes) == 2 else f"{len(classes)}-class" if classes else "classification"
    modality = (
        "/".join(
            str(r[0])
            for a in f.cohort.get("attributes", [])
            if a.get("name") == "modality"
            for r in a.get("rows", [])
            if r[0] != "missing"
        )
        or None
    )
    dims = f.setting("prepare.dims")
    what = " ".join(x for x in (modality, f"{dims.upper()}" if dims else None, "images") if x)
    text = f"{kind.capitalize()} classification of {what}" if classes else f"Classification of {what}"
    if classes:
        text += f"; classes {', '.join(classes)} (the values of labels.csv's label column)" + (
            f"; class {classes[-1]} is the positive class, the one AUROC, sensitivity and prevalence refer to"
            if len(classes) == 2
            else ""
        )
    return text


def _model_line(f: Facts) -> str:
    weights = f.setting("model.weights", DASH)
    sha = f.adaptation.get("weights_sha256") or f.params.get("weights_sha256")
    parts = [
        str(f.setting("model.backbone", "unknown backbone")),
        f"{weights} weights" + (f" (sha256 {sha[:12]}…)" if sha and sha != "none" else ""),
        f"strategy {f.setting('finetune.strategy', DASH)}",
    ]
    reg = f.tags.get("registered_model")
    return " · ".join(parts) + (f" · registered as {reg}" if reg else "")


def _cards(f: Facts) -> list[dict[str, str]]:
    m = f.metrics
    calibrated = f.calibration.get("method") not in (None, "none")
    probs = "calibrated" if calibrated else "plain softmax"
    ece_sub = (
        f"calibrated; {num(m.get('test_ece_uncalibrated'), 3)} before"
        if calibrated
        else "plain softmax, not calibrated"
    )
    cards = [
        (
            "AUROC",
            num(m.get("test_auroc"), 3),
            f"95% CI {num(m.get('test_auroc_ci_low'), 3)}–{num(m.get('test_auroc_ci_high'), 3)}",
        ),
        ("AUPRC", num(m.get("test_auprc"), 3), "test, positive class"),
        ("Sensitivity", num(m.get("test_sensitivity"), 3), _op_sub(f)),
        ("Specificity", num(m.get("test_specificity"), 3), _op_sub(f)),
        ("ECE", num(m.get("test_ece"), 3), ece_sub),
        (
            "Brier",
            num(m.get("test_brier"), 3),
            f"{probs}; scaled Brier {num(m.get('test_brier_scaled'), 3)}"
            if as_float(m.get("test_brier_scaled")) is not None
            else f"{probs}; multi-class: summed over classes, 0–2",
        ),
    ]
    return [{"label": a, "value": b, "sub": c} for a, b, c in cards if b != DASH]


def _op_sub(f: Facts) -> str:
    ops = f.evaluation.get("operating_points") or []
    if ops and isinstance(ops[0], dict):
        return f"at {ops[0].get('rule')} threshold {num(ops[0].get('threshold'), 3)}"
    return "at the first operating point"


def verdicts(f: Facts) -> list[str]:
    """One-line findings for the summary (each a plain sentence)."""
    m, out = f.metrics, []
    line = headline(f)
    if line:
        out.append(line + ".")
    ops = [o for o in f.evaluation.get("operating_points") or [] if isinstance(o, dict)]
    for op in ops[:2]:
        t = op.get("test") or {}
        out.append(
            f"At the {op.get('rule')} operating point (threshold {num(op.get('threshold'), 3)}, fixed on "
            f"validation): sensitivity {num(t.get('sensitivity'), 2)}, specificity "
            f"{num(t.get('specificity'), 2)}, PPV {num(t.get('ppv'), 2)}, NPV {num(t.get('npv'), 2)} on test."
        )
    if as_float(m.get("test_ece")) is not None:
        method = f.calibration.get("method")
        bins = int(as_float(m.get("ece_n_bins")) or (f.evaluation.get("reliability") or {}).get("n_bins") or 15)
        ece_now = with_ci(m["test_ece"], m.get("test_ece_ci_low"), m.get("test_ece_ci_high"))
        ece_before = with_ci(
            m.get("test_ece_uncalibrated"),
            m.get("test_ece_uncalibrated_ci_low"),
            m.get("test_ece_uncalibrated_ci_high"),
        )
        if method == "none":
            out.append(
                f"Calibration: ECE {ece_now} with {calibration_name(method)}, none was fitted "
                f"({bins} equal-width confidence bins; see Calibration for why)."
            )
        else:
            out.append(
                f"Calibration: ECE {ece_now} after {calibration_name(method, m.get('temperature'))}, "
                f"{ece_before} before ({bins} equal-width confidence bins)."
            )
    if (
        f.baseline
        and as_float(f.baseline.get("metrics", {}).get("test_auroc")) is not None
        and as_float(m.get("test_auroc")) is not None
    ):
        base = float(f.baseline["metrics"]["test_auroc"])
        line = f"Transfer gain: AUROC {float(m['test_auroc']) - base:+.2f} over a from-scratch run ({num(base, 2)})"
        paired = paired_auroc(f.context.get("comparison"))
        out.append(f"{line}; {paired}." if paired else f"{line}.")
    rows = [r for r in f.evaluation.get("subgroups") or [] if isinstance(r, dict) and as_float(r.get("auroc"))]
    if rows:
        low = min(rows, key=lambda r: float(r["auroc"]))
        out.append(
            f"Lowest subgroup AUROC: {low.get('attribute')} = {low.get('value')}, {num(low['auroc'], 2)} "
            f"on {count(low.get('n'))} images."
        )
    return out


def summary_section(f: Facts, warnings: list[dict[str, str]]) -> dict[str, Any]:
    """The Summary section: task, model and data lines, metric cards (or how to evaluate), verdicts.

    Args:
        f: The run's facts.
        warnings: The report's warnings (`warning_lines`); the summary counts the 'warn' ones.
    """
    blocks: list[dict[str, Any]] = [kv([("Task", _task(f)), ("Model", _model_line(f)), ("Data", _data_line(f))])]
    if f.evaluated:
        blocks.append({"type": "cards", "items": _cards(f)})
    else:
        blocks.append(
            note(
                "Test performance not available: this run has not been evaluated yet. Run "
                f"`medxfer evaluate CONFIG --run {f.run_id}`, then re-render the report.",
                NA,
            )
        )
    lines = verdicts(f)
    n_warn = sum(1 for w in warnings if w["level"] == "warn")
    if n_warn:
        lines.append(f"{n_warn} warning{'s' if n_warn > 1 else ''}: see the Warnings section.")
    blocks.append({"type": "list", "items": lines})
    return section("summary", "Summary", blocks)


def _data_line(f: Facts) -> str:
    n = {s: f.params.get(f"n_{s}") for s in ("train", "val", "test")}
    text = ", ".join(f"{count(v)} {s}" for s, v in n.items() if v is not None)
    return (text + " images (patient-level split)") if text else DASH
