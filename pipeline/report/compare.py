"""Paired comparisons in HTML: the audit report's Transfer gain test and `medxfer compare`'s page.

The numbers come from `pipeline.compare` (a `records.Comparison`, as its JSON dict): ΔAUROC by the
DeLong test clustered by patient (Obuchowski 1997) and by a paired patient bootstrap, ΔBrier, ΔECE,
ΔNLL and the sensitivity and specificity at each run's frozen threshold by the same bootstrap. Only
numbers and run ids reach a page (no pseudonyms).
"""

from __future__ import annotations

from typing import Any

from pipeline.compare import QUANTITIES, compare_runs, format_p
from pipeline.errors import MedxferError
from pipeline.report.fmt import DASH, NA, as_float, ci, count, note, num, para, section, table
from pipeline.report.page import render_page

FALLBACK = (
    "Overlapping CIs do not rule out a difference; a paired test on the same patients "
    "(medxfer compare) is the proper comparison."
)
READING = (
    "Both models scored the same test patients, and the CIs count each patient's images as one "
    "correlated cluster, not as independent cases. A CI that excludes 0 is a difference at the 5% "
    "level (two-sided); higher AUROC, sensitivity and specificity and lower Brier, ECE and NLL are better."
)
NEGATIVE = "Negative transfer"


def collect_comparison(
    run_id: str, baseline: dict[str, Any] | None, config: Any, tracking_uri: str | None
) -> dict[str, Any] | None:
    """`pipeline.compare.compare_runs([baseline, run])` as report data; None without a baseline.

    Args:
        run_id: this run. baseline: the from-scratch run's record (with "run_id"), or None.
        config: this run's config.json (evaluate.bootstrap resamples, finetune.seed as the seed).
        tracking_uri: the store both runs are in.

    Returns:
        {"available": True, **Comparison.to_dict()} (the reference is the from-scratch run, so every
        difference is this run − from scratch), or {"available": False, "reason"} saying why not.
    """
    if not baseline or not baseline.get("run_id"):
        return None
    cfg = config if isinstance(config, dict) else {}
    n_boot = max(_setting(cfg, "evaluate", "bootstrap", 1000), 0)
    try:
        comp = compare_runs(
            [str(baseline["run_id"]), run_id], tracking_uri, n_boot=n_boot, seed=_setting(cfg, "finetune", "seed", 0)
        )
    except MedxferError as exc:
        return {"available": False, "reason": str(exc).rstrip(".")}
    return {"available": True, **comp.to_dict()}


def comparison_blocks(comparison: Any) -> list[dict[str, Any]]:
    """The Transfer gain section's paired test (this run − from scratch), or why there is none."""
    c = comparison if isinstance(comparison, dict) else {}
    pair = _first_pair(c)
    if not pair:
        reason = c.get("reason")
        return ([note(f"No paired test: {reason}.", NA)] if isinstance(reason, str) else []) + [para(FALLBACK)]
    caption = (
        f"Paired test, this run − from scratch, on the {count(c.get('n_images'))} test images of "
        f"{count(c.get('n_patients'))} patients both runs scored (medxfer compare)"
    )
    blocks = pair_blocks(c, pair, "this run", "from scratch", caption)
    if not blocks:
        return [para(FALLBACK)]
    return [*blocks, para(READING)]


def _first_pair(comparison: Any) -> dict[str, Any]:
    """The first pair of an available comparison (this run − from scratch in the report), else {}."""
    c = comparison if isinstance(comparison, dict) else {}
    pairs = c.get("pairs") if c.get("available") is True else None
    first = pairs[0] if isinstance(pairs, list) and pairs else None
    return first if isinstance(first, dict) else {}


def negative_transfer(comparison: Any) -> str | None:
    """The negative-transfer sentence when the pretrained run's ΔAUROC CI lies below 0, else None."""
    pair = _first_pair(comparison)
    found = pair.get("auroc")
    r: dict[str, Any] = found if isinstance(found, dict) else {}
    if pair.get("negative_transfer") is not True or as_float(r.get("diff")) is None:
        return None
    runs = comparison.get("runs") if isinstance(comparison.get("runs"), list) else []
    weights = next(
        (x.get("weights") for x in runs if isinstance(x, dict) and x.get("run_id") == pair.get("run_id")), None
    )
    return (
        f"{NEGATIVE}: the pretrained run (model.weights = {weights or 'not recorded'}) ranks worse than the "
        "from-scratch run on the same test "
        f"patients (ΔAUROC {_signed(r.get('diff'))}, 95% CI {_signed(r.get('ci_low'))} to "
        f"{_signed(r.get('ci_high'))}, {p_text(r.get('p'))}, DeLong clustered by patient): "
        "pretraining hurt here; check preprocessing, channel folding and the fine-tuning strategy."
    )


def paired_auroc(comparison: Any) -> str | None:
    """'paired ΔAUROC +0.05 (95% CI …, p …)' of this run − from scratch, or None without a paired test."""
    pair = _first_pair(comparison)
    found = pair.get("auroc")
    r: dict[str, Any] = found if isinstance(found, dict) else {}
    if as_float(r.get("diff")) is None:
        return None
    return (
        f"paired ΔAUROC {_signed(r.get('diff'))} (95% CI {ci(r.get('ci_low'), r.get('ci_high'), 3)}, "
        f"{p_text(r.get('p'))}, DeLong clustered by patient)"
    )


def pair_blocks(c: dict[str, Any], pair: dict[str, Any], this: str, ref: str, caption: str) -> list[dict[str, Any]]:
    """One pair's table (every quantity: values, difference, 95% CI, p, method) and its notes."""
    rows = []
    for key, label, _ in QUANTITIES:
        r = pair.get(key)
        if not isinstance(r, dict):
            continue
        rows.append(
            [
                label,
                num(r.get("value_a")),
                num(r.get("value_b")),
                _signed(r.get("diff")),
                ci(r.get("ci_low"), r.get("ci_high"), 3),
                format_p(as_float(r.get("p"))),
                str(r.get("method") or DASH),
            ]
        )
    if not rows:
        return []
    blocks = [table(["quantity", this, ref, "difference", "95% CI", "p", "method"], rows, caption)]
    thresholds = _thresholds(c, pair, this, ref)
    if thresholds:
        blocks.append(para(thresholds))
    sentence = negative_transfer({**c, "pairs": [pair]})
    if sentence:
        blocks.insert(1, note(sentence, "warn"))
    return blocks


def _thresholds(c: dict[str, Any], pair: dict[str, Any], this: str, ref: str) -> str | None:
    runs = {str(r.get("run_id")): r for r in c.get("runs") or [] if isinstance(r, dict)}
    a, b = runs.get(str(pair.get("run_id"))), runs.get(str(pair.get("reference")))
    if not a or not b or not isinstance(pair.get("sensitivity"), dict):
        return None
    parts = [
        f"{name} {r.get('threshold_rule') or 'threshold'} {num(r.get('threshold'))}"
        for name, r in ((this, a), (ref, b))
    ]
    return (
        "Sensitivity and specificity are each run's own decisions, at the threshold it froze on validation ("
        + "; ".join(parts)
        + ")."
    )


# --------------------------------------------------------------------------- the compare page
def comparison_page(comp: dict[str, Any]) -> str:
    """`medxfer compare`'s self-contained HTML page (the audit report's template and CSS)."""
    runs = [r for r in comp.get("runs") or [] if isinstance(r, dict)]
    ids = [str(r.get("run_id")) for r in runs]
    sections = [_runs_section(comp, runs)]
    for i, pair in enumerate(p for p in comp.get("pairs") or [] if isinstance(p, dict)):
        rid = str(pair.get("run_id"))
        caption = (
            f"{rid} − reference {comp.get('reference')}, on the {count(comp.get('n_images'))} shared test images "
            f"of {count(comp.get('n_patients'))} patients"
        )
        blocks = pair_blocks(comp, pair, f"run {rid[:8]}", f"reference {str(comp.get('reference'))[:8]}", caption)
        sections.append(section(f"pair-{i + 1}", f"{rid[:8]} vs the reference", [*blocks, para(READING)]))
    sections.append(section("method", "What the numbers are", [para(t) for t in METHOD]))
    notes = [note(str(n)) for n in comp.get("notes") or []]
    sections.append(section("notes", "Notes", notes or [note("No notes.")]))
    header = [
        ("reference", str(comp.get("reference"))),
        ("runs", str(len(runs))),
        ("test images", count(comp.get("n_images"))),
        ("patients", count(comp.get("n_patients"))),
        ("bootstrap", f"{count(comp.get('n_boot'))} resamples, seed {comp.get('seed')}"),
    ]
    if comp.get("mlflow_run_id"):
        header.append(("MLflow run", str(comp["mlflow_run_id"])))
    title = "Paired comparison: " + " vs ".join(i[:8] for i in ids)
    footer = (
        "Generated by medxfer compare from the runs' logged test predictions: counts and run ids, never file "
        "paths or identifiers."
    )
    return render_page({"title": title, "header": header, "sections": sections, "footer": footer})


def _runs_section(comp: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [
        [
            "reference" if r.get("run_id") == comp.get("reference") else "compared",
            str(r.get("run_id")),
            str(r.get("run_name") or DASH),
            str(r.get("weights") or DASH),
            str(r.get("backbone") or DASH),
            str(r.get("strategy") or DASH),
            num(r.get("auroc")),
            num(r.get("brier")),
            num(r.get("ece")),
            num(r.get("nll")),
            f"{r.get('threshold_rule') or 'threshold'} {num(r.get('threshold'))}",
            num(r.get("sensitivity")),
            num(r.get("specificity")),
        ]
        for r in runs
    ]
    head = [
        "role",
        "run",
        "name",
        "weights",
        "backbone",
        "strategy",
        "AUROC",
        "Brier",
        "ECE",
        "NLL",
        "frozen threshold",
        "sensitivity",
        "specificity",
    ]
    lead = (
        f"{len(runs)} runs on the same {count(comp.get('n_images'))} test images of {count(comp.get('n_patients'))} "
        f"patients ({count(comp.get('n_positive'))} positive, {count(comp.get('n_negative'))} negative), from one "
        "manifest. Every difference is a run − the reference (the first run named)"
        + (", each run compared with the reference." if len(runs) > 2 else ".")
    )
    return section("runs", "Runs", [table(head, rows, "Each run on the shared test images")], lead)


METHOD = (
    "AUROC: area under the ROC curve of each run's uncalibrated softmax, the scores its logged test AUROC "
    "ranks. ΔAUROC is tested with DeLong's nonparametric method generalised to clustered data (Obuchowski "
    "1997): each patient's images are summed into per-patient structural components, and the variance of "
    "the difference, with the covariance between the two runs, is estimated over patients. The 95% CI is "
    "ΔAUROC ± 1.96·SE with a two-sided p (normal approximation; it needs tens of patients of each class). "
    "The second AUROC row is the same difference by the paired bootstrap, as a check.",
    "Brier (mean squared error of the calibrated P(class 1)), ECE (top-label expected calibration error, 15 "
    "equal-width bins) and NLL (mean negative log-likelihood, natural log) use the calibrated probabilities "
    "each run's registered model outputs; lower is better. Sensitivity and specificity are the decisions each "
    "model makes at the threshold it froze on validation (its first operating point).",
    "Their 95% CIs are percentile intervals of a paired bootstrap that resamples patients with replacement "
    "(all of a patient's images together) and scores both runs on the same resamples; p is twice the smaller "
    "share of resampled differences on either side of 0. Every quantity uses the same resamples and seed. "
    "ECE is biased upwards on small samples (every bin's gap is an absolute value), for both runs alike; "
    "read ΔECE with its CI.",
)


def _setting(cfg: dict[str, Any], part: str, key: str, default: int) -> int:
    node = cfg.get(part)
    value = node.get(key, default) if isinstance(node, dict) else default
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def p_text(x: Any) -> str:
    """'p = 0.032', 'p < 0.001' or 'p —'."""
    text = format_p(as_float(x))
    return f"p {text[0]} {text[1:]}" if text.startswith("<") else f"p = {text}" if text != DASH else f"p {DASH}"


def _signed(x: Any) -> str:
    f = as_float(x)
    return DASH if f is None else f"{f:+.3f}"
