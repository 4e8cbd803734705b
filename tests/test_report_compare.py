"""The Transfer gain section's paired test of this run against its from-scratch run (no MLflow store needed).

Two runs' test predictions, matched by image, go through `pipeline.evaluate.paired_comparison`
(ΔAUROC by the patient-clustered DeLong, ΔBrier and ΔNLL by the patient bootstrap); the section
shows the differences with their CIs, or says why there is no paired test. Only numbers reach it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit

import pipeline.evaluate as M
from pipeline.report.audit import render_report
from pipeline.report.compare import collect_comparison, compare_runs, comparison_blocks


def two_runs(n_patients: int = 60, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Test predictions of two runs on the same images: 1–3 images per patient, the first run better."""
    rng = np.random.default_rng(seed)
    k = rng.integers(1, 4, n_patients)
    pid = np.repeat(np.arange(n_patients), k)
    y = (rng.random(n_patients) < 0.4).astype(np.int64)[pid]
    patient = rng.normal(size=n_patients)[pid]
    frame = pd.DataFrame({"image_id": [f"img{i:04d}" for i in range(len(pid))], "subject_id": [f"S{i}" for i in pid]})
    this = frame.assign(y_true=y, prob=expit(2.0 * (y - 0.5) + patient + 0.3 * rng.normal(size=len(y))))
    base = frame.assign(y_true=y, prob=expit(0.5 * (y - 0.5) + patient + 0.3 * rng.normal(size=len(y))))
    return this, base.sample(frac=1.0, random_state=1)  # row order does not matter: matched by image_id


def test_compare_runs_is_the_patient_clustered_comparison_matched_by_image() -> None:
    this, base = two_runs()
    out = compare_runs(this, base, n_boot=200, seed=4)
    aligned = this.merge(base, on="image_id", suffixes=("", "_b"))
    y, groups = aligned["y_true"].to_numpy(), aligned["subject_id"].to_numpy()
    assert out["available"] is True
    assert (out["n_images"], out["n_patients"], out["n_this"], out["n_base"]) == (len(this), 60, len(this), len(base))
    assert out["auroc"] == M.delong_test(y, aligned["prob"], aligned["prob_b"], groups=groups)
    assert out["auroc"]["clustered"] is True
    assert out["brier"] == M.paired_bootstrap(y, aligned["prob"], aligned["prob_b"], groups, 200, 4, metric="brier")
    assert out["nll"]["metric"] == "nll"
    assert out["auroc"]["diff"] > 0 and out["brier"]["diff"] < 0


def test_compare_runs_says_why_there_is_no_paired_test() -> None:
    this, base = two_runs()
    cases = [
        ((None, base), "of this run are not available"),
        ((this, None), "of the from-scratch run are not available"),
        ((this.drop(columns="prob"), base), "lack prob"),
        ((pd.concat([this, this.iloc[:1]]), base), "more than once"),
        ((this, base.assign(image_id="x" + base["image_id"])), "share no test images"),
        ((this, base.assign(y_true=1 - base["y_true"])), "label the shared test images differently"),
        ((this[this["y_true"] == 0], base), "at least 2 positives"),
    ]
    for (a, b), reason in cases:
        out = compare_runs(a, b, n_boot=10)
        assert out["available"] is False
        assert reason in out["reason"]


def test_collect_comparison_fetches_both_runs_and_uses_the_configured_bootstrap(tmp_path: Path) -> None:
    this, base = two_runs()
    tables = {"run-a": this, "run-b": base}

    def fetch(run_id: str, path: str, folder: Path) -> Path | None:
        if run_id not in tables:
            return None
        out = folder / path
        out.parent.mkdir(parents=True, exist_ok=True)
        tables[run_id].to_parquet(out, index=False)
        return out

    cfg = {"evaluate": {"bootstrap": 150}, "finetune": {"seed": 2}}
    out = collect_comparison("run-a", {"run_id": "run-b"}, cfg, tmp_path, fetch)
    assert out == compare_runs(this, base, n_boot=150, seed=2)
    assert out is not None and out["brier"]["n_boot"] > 100
    assert collect_comparison("run-a", None, cfg, tmp_path, fetch) is None
    gone = collect_comparison("run-a", {"run_id": "run-x"}, "junk config", tmp_path, fetch)
    assert gone is not None and gone["available"] is False
    assert "from-scratch run are not available" in gone["reason"]


def test_transfer_section_shows_the_paired_test_and_no_pseudonyms() -> None:
    this, base = two_runs()
    ctx = {
        "run_id": "r1",
        "config": {"model": {"weights": "imagenet"}},
        "run": {"params": {}, "metrics": {"test_auroc": 0.8}, "tags": {}},
        "baseline": {"run_id": "scratch1", "metrics": {"test_auroc": 0.7}, "tags": {}},
        "comparison": compare_runs(this, base, n_boot=100),
    }
    html = render_report(ctx)
    transfer = html[html.index('<section id="transfer">') :]
    transfer = transfer[: transfer.index("</section>")]
    assert "DeLong clustered by patient (Obuchowski 1997)" in transfer
    assert "paired bootstrap of patients (100 resamples)" in transfer
    assert f"{ctx['comparison']['auroc']['diff']:+.3f}" in transfer
    assert "test images of 60 patients" in transfer
    assert not any(s in html for s in this["subject_id"])
    assert not any(s in html for s in this["image_id"])
    for junk in (None, "junk", [1, "x"], 7, {"x": {"y": [None]}}, {"available": True}):
        page = render_report({**ctx, "comparison": junk})
        assert "could not be rendered" not in page
        assert "is the proper comparison" in page
    assert "No paired test: the two runs share no test images." in render_report(
        {**ctx, "comparison": {"available": False, "reason": "the two runs share no test images"}}
    )


def test_transfer_section_warns_when_the_runs_scored_different_images() -> None:
    this, base = two_runs()
    blocks = comparison_blocks(compare_runs(this, base.iloc[:100], n_boot=0))
    assert [b["type"] for b in blocks] == ["table", "note", "para"]
    assert "test sets differ" in blocks[1]["text"]
    assert [row[0] for row in blocks[0]["rows"]] == ["AUROC"]  # n_boot = 0: DeLong only
