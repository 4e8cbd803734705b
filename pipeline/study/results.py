"""A study's results: the per-arm table, paired comparisons with each arm's reference, the recommendation, outputs.

ΔAUROC is `pipeline.compare.compare_runs([reference, arm])` (clustered DeLong, Obuchowski 1997,
plus the paired patient bootstrap), every difference the arm − its reference; negative transfer is
compare's flag (a pretrained arm, ImageNet or transfusion, whose ΔAUROC CI lies below 0 against a
from-scratch reference). The recommendation is the arm with the best validation AUROC, never the
best test AUROC; its test result is reported beside it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from pipeline import __version__, tracking
from pipeline.compare import compare_runs, format_p
from pipeline.errors import DataError
from pipeline.io import jsonable, write_text
from pipeline.report.fmt import DASH, count, duration, figures, note, num, para, section, table, with_ci
from pipeline.report.page import render_page
from pipeline.study.spec import Study

log = logging.getLogger("medxfer")

# (study.json key, logged metric) of each arm's row
METRICS = (
    ("test_auroc", "test_auroc"),
    ("test_auroc_ci_low", "test_auroc_ci_low"),
    ("test_auroc_ci_high", "test_auroc_ci_high"),
    ("test_ece", "test_ece"),
    ("test_brier", "test_brier"),
    ("test_sensitivity", "test_sensitivity"),
    ("test_specificity", "test_specificity"),
    ("threshold", "threshold"),
    ("train_seconds", "train_seconds"),
    ("epochs_run", "epochs_run"),
    ("best_epoch", "best_epoch"),
)


def finish(
    study: Study,
    arms: list[dict[str, Any]],
    fairness: dict[str, Any],
    parent: str,
    shash: str,
    out_dir: Path,
    uri: str,
    reused: int = 0,
    resumed: int = 0,
) -> dict[str, Any]:
    """Compare every arm with its reference, write study.json and study.html, log them to the parent run."""
    by_arm = {a["arm"]: a for a in arms}
    rows = [_row(a) for a in arms]
    n_boot, seed = max(study.base.evaluate.bootstrap, 0), study.base.finetune.seed
    notes: list[str] = []
    for row, a in zip(rows, arms, strict=True):
        ref = study.reference_of(a["arm"])
        if ref is None:
            continue
        row["reference_run_id"], row["reference_arm"] = by_arm[ref]["run_id"], ref.key
        try:
            comp = compare_runs([by_arm[ref]["run_id"], a["run_id"]], uri, n_boot=n_boot, seed=seed)
        except DataError as exc:
            notes.append(f"{a['arm'].key}: no paired comparison with its reference ({exc})")
            continue
        pair = comp.pairs[0]
        row["delta_auroc"] = {k: pair["auroc"][k] for k in ("diff", "ci_low", "ci_high", "p", "method")}
        row["negative_transfer"] = bool(pair["negative_transfer"])
        row["comparison"] = comp.to_dict()
    if not any("delta_auroc" in r for r in rows):
        notes.append(
            f"no arm has a reference arm in the study (reference {study.reference}); "
            "add the reference's value to its axis (e.g. weights: [imagenet, none]) for paired comparisons"
        )
    best = max(rows, key=lambda r: -math.inf if r["val_auroc"] is None else float(r["val_auroc"]))  # as runner
    result: dict[str, Any] = {
        "study": study.describe(),
        "study_hash": shash,
        "mlflow_parent_run_id": parent,
        "medxfer": __version__,
        "fairness": fairness,
        "arms": rows,
        "recommendation": {
            "arm": best["arm"],
            "run_id": best["run_id"],
            "lr": best["lr"],
            "val_auroc": best["val_auroc"],
            "test_auroc": best.get("test_auroc"),
            "test_auroc_ci_low": best.get("test_auroc_ci_low"),
            "test_auroc_ci_high": best.get("test_auroc_ci_high"),
            "line": recommendation_line(best),
            "registered_as": study.base.tracking.register_as,
        },
        "fixed": " ".join(f"{k}={v}" for k, v in _fixed(study).items()),
        "negative_transfer": [r["label"] for r in rows if r.get("negative_transfer")],
        "reused_trainings": reused,
        "resumed_trainings": resumed,
        "notes": notes,
    }
    files = write_outputs(result, out_dir)
    with tracking.start_run(study.base.experiment, run_id=parent):
        metrics = {
            "n_arms": len(rows),
            "n_trainings": len(study.arms) * len(study.lr_grid),
            "n_negative_transfer": len(result["negative_transfer"]),
            "recommended_val_auroc": best["val_auroc"],
            "recommended_test_auroc": best.get("test_auroc"),
        }
        tracking.log_metrics({k: v for k, v in metrics.items() if v is not None})
        for path in files.values():
            tracking.log_artifact(path)
        tracking.set_tags({"study_state": "complete", "recommended_run": best["run_id"]})
    result["files"] = {k: str(v) for k, v in files.items()}
    return result


def _fixed(study: Study) -> dict[str, Any]:
    """The axes with one value in this study (the same for every arm)."""
    return {a: study.axes[a][0] for a in study.axes if len(study.axes[a]) == 1}


def _row(a: dict[str, Any]) -> dict[str, Any]:
    run = a["run"]
    m = run["metrics"]
    history = run["history"].get("images_per_s") or []
    row: dict[str, Any] = {
        "arm": a["arm"].key,
        "label": a["label"],
        **a["arm"].values(),
        "run_id": a["run_id"],
        "lr": a["lr"],
        "val_auroc": a["val_auroc"],
        "val_auroc_by_lr": a["val_auroc_by_lr"],
        "trial_runs": a["trial_runs"],
        "report": a["report"].name,
        "images_per_s": sum(history) / len(history) if history else None,
        "epochs_budget": int(float(run["params"].get("finetune.epochs", "nan"))),
        # lp-ft: head-only probe epochs trained before the shared budget (Kumar et al.'s protocol)
        "probe_epochs": int(float(run["params"].get("finetune.lpft_probe_epochs", "0")))
        if run["params"].get("finetune.strategy") == "lp-ft"
        else 0,
        "n_train": int(float(run["params"].get("n_train", "nan"))),
        "n_train_patients": a.get("n_train_patients"),
        "test_evaluations": run["tags"].get("test_evaluations"),
        "delta_auroc": None,
        "negative_transfer": False,
        "reference_run_id": None,
        "reference_arm": None,
    }
    row.update({key: m.get(metric) for key, metric in METRICS})
    return row


def recommendation_line(best: dict[str, Any]) -> str:
    """'Recommended (chosen on validation AUROC 0.912): ARM at lr 0.001; its test AUROC 0.901 (0.85–0.95).'"""
    test_text = with_ci(best.get("test_auroc"), best.get("test_auroc_ci_low"), best.get("test_auroc_ci_high"))
    return (
        f"Recommended (best validation AUROC, {num(best['val_auroc'])}): {best['arm']} at lr {best['lr']:g}; "
        f"its test AUROC {test_text}"
        " (test was not used for the choice)"
    )


def write_outputs(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """study.json and study.html in `out_dir`, each written atomically."""
    paths = {"json": out_dir / "study.json", "html": out_dir / "study.html"}
    write_text(paths["json"], json.dumps(jsonable(result), indent=2, sort_keys=True) + "\n")
    write_text(paths["html"], study_page(result))
    return paths


def _delta(row: dict[str, Any]) -> tuple[str, str, str]:
    d = row.get("delta_auroc")
    if not isinstance(d, dict):
        return DASH, DASH, DASH
    return f"{d['diff']:+.3f}", f"{d['ci_low']:+.3f}\u00a0to\u00a0{d['ci_high']:+.3f}", format_p(d["p"])  # no wrap


HEAD = ["arm", "lr", "val AUROC", "test AUROC (95% CI)", "ECE", "Brier", "sens", "spec", "train",
        "ΔAUROC vs ref", "95% CI", "p"]  # fmt: skip


def _cells(row: dict[str, Any]) -> list[str]:
    return [
        row["label"] + ("  NEGATIVE TRANSFER" if row.get("negative_transfer") else ""),
        f"{row['lr']:g}",
        num(row.get("val_auroc")),
        with_ci(row.get("test_auroc"), row.get("test_auroc_ci_low"), row.get("test_auroc_ci_high")),
        num(row.get("test_ece")),
        num(row.get("test_brier")),
        num(row.get("test_sensitivity")),
        num(row.get("test_specificity")),
        duration(row.get("train_seconds")),
        *_delta(row),
    ]


def console_table(result: dict[str, Any]) -> str:
    """The study as plain text: one row per arm, the fairness facts and the recommendation."""
    rows = [HEAD] + [_cells(r) for r in result["arms"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    f = result["fairness"]
    lines = [
        f"study {result['study']['name']} (hash {result['study_hash']}): {len(result['arms'])} arms on the same "
        f"{f['n_test_units']} test units, epochs budget {', '.join(map(str, f['epochs_budget']))}, lr grid "
        f"{result['study']['lr_grid']} selected on validation AUROC",
        f"  the same in every arm: {result['fixed'] or 'no axis'}",
        *["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows],
        "  sens/spec at each arm's frozen operating point; ΔAUROC = arm − its reference (clustered DeLong)",
        result["recommendation"]["line"],
    ]
    lines += [
        f"NEGATIVE TRANSFER: {a} ranks worse than its from-scratch reference" for a in result["negative_transfer"]
    ]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def forest_rows(result: dict[str, Any]) -> list[tuple[str, tuple[float, float | None, float | None]]]:
    """(arm label, (ΔAUROC, CI low, CI high)) of every arm compared with its reference."""
    return [
        (r["label"], (r["delta_auroc"]["diff"], r["delta_auroc"]["ci_low"], r["delta_auroc"]["ci_high"]))
        for r in result["arms"]
        if isinstance(r.get("delta_auroc"), dict)
    ]


def learning_curves(result: dict[str, Any]) -> dict[str, list[tuple[float, tuple[float, float | None, float | None]]]]:
    """Series of (labelled training patients, (test AUROC, CI low, CI high)), one per arm label without its
    train fraction; empty when the study has a single train fraction."""
    if len({r["train_fraction"] for r in result["arms"]}) < 2:
        return {}
    series: dict[str, list[tuple[float, tuple[float, float | None, float | None]]]] = {}
    for r in result["arms"]:
        if r.get("test_auroc") is None or r.get("n_train_patients") is None:
            continue
        name = " ".join(p for p in r["label"].split() if not p.startswith("train_fraction=")) or "all arms"
        point = (r["test_auroc"], r.get("test_auroc_ci_low"), r.get("test_auroc_ci_high"))
        series.setdefault(name, []).append((float(r["n_train_patients"]), point))
    return series


def _png(fig: Any) -> str:
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def study_figures(result: dict[str, Any]) -> dict[str, str]:
    """The study's figures as base64 PNGs: forest.png (ΔAUROC per arm) and learning_curve.png, when they apply."""
    from pipeline.evaluate import forest_figure, learning_curve_figure

    out = {}
    rows = forest_rows(result)
    if rows:
        out["forest.png"] = _png(forest_figure(rows))
    curves = learning_curves(result)
    if curves:
        out["learning_curve.png"] = _png(learning_curve_figure(curves))
    return out


def study_page(result: dict[str, Any]) -> str:
    """The self-contained study report (the audit report's template and CSS)."""
    s, f = result["study"], result["fairness"]
    arms = result["arms"]
    figs = study_figures(result)
    shown: list[tuple[str, str | None]] = [
        (name, caption)
        for name, caption in (
            ("forest.png", "ΔAUROC of each arm − its reference, 95% CI (clustered DeLong); red: CI below 0"),
            ("learning_curve.png", "Test AUROC (95% CI) against labelled training patients (nested subsets)"),
        )
        if name in figs
    ]
    summary = [note(result["recommendation"]["line"])]
    summary += [
        note(f"Negative transfer: {a} ranks worse than its from-scratch reference (ΔAUROC CI below 0).", "warn")
        for a in result["negative_transfer"]
    ]
    summary.append(
        para(
            f"{len(arms)} arms, each trained at every learning rate of {s['lr_grid']} and kept at the one with the "
            f"best validation AUROC; the test split ({count(f['n_test_units'])} units, the same for every arm: "
            f"{'yes' if f['same_test_units'] else 'NO'}) was opened once per arm, after all training. "
            f"Epoch budget: {', '.join(map(str, f['epochs_budget']))} for every training. The same in every arm: "
            f"{result['fixed'] or 'no axis'}."
        )
    )
    table_rows = [_cells(r) for r in arms]
    arms_block = table(HEAD, table_rows, "One row per arm: the selected learning rate's run")
    lr_rows = [[r["label"], *(num(r["val_auroc_by_lr"].get(repr(float(lr)))) for lr in s["lr_grid"]), f"{r['lr']:g}"]
               for r in arms]  # fmt: skip
    lr_block = table(["arm", *(f"val AUROC at lr {lr:g}" for lr in s["lr_grid"]), "selected"], lr_rows)
    runs_rows = [[r["label"], r["run_id"], r.get("reference_run_id") or DASH, r["report"]] for r in arms]
    fair_rows = [
        ["manifest hash", f["manifest_hash"]],
        ["test split id", ", ".join(f["test_split_ids"]) or DASH],
        ["test units (sha256 of the ids, per arm)", ", ".join(f["test_units_sha256"])],
        ["same test units in every arm", "yes" if f["same_test_units"] else "no"],
        ["same epoch budget", "yes" if f["same_epochs_budget"] else "no"],
        ["test opened by a selected run", ", ".join(str(f["test_opened"].get(r["run_id"], 0)) for r in arms)],
        [
            "test opened by the other trainings",
            str(sum(v for k, v in f["test_opened"].items() if k not in {r["run_id"] for r in arms})),
        ],
    ]
    sections = [
        section("summary", "Summary", summary),
        section("arms", "Arms", [arms_block, para(READING), figures(shown, figs) if shown else None]),
        section("lr", "Learning-rate selection (validation only)", [lr_block]),
        section("fairness", "What was held equal", [table(["check", "value"], fair_rows)]),
        section("runs", "MLflow runs", [table(["arm", "run", "reference run", "audit report"], runs_rows)]),
        section("notes", "Notes", [note(n) for n in result["notes"]] or [note("No notes.")]),
    ]
    header = [
        ("study", s["name"]),
        ("hash", result["study_hash"]),
        ("arms", str(len(arms))),
        ("parent run", str(result["mlflow_parent_run_id"])),
    ]
    footer = (
        "Generated by medxfer study from its MLflow runs: counts, hashes and run ids, never file paths or identifiers."
    )
    return render_page({"title": f"Study: {s['name']}", "header": header, "sections": sections, "footer": footer})


READING = (
    "Test AUROC with its patient-bootstrap 95% CI; ECE and Brier of the calibrated probabilities; sensitivity and "
    "specificity at the operating point each arm froze on validation. ΔAUROC is the arm − its reference arm (by "
    "default the from-scratch arm with the same other axes) on the same test patients, DeLong clustered by "
    "patient (Obuchowski 1997); a CI that excludes 0 is a difference at the 5% level."
)
