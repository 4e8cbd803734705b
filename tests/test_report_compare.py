"""The Transfer gain section's paired test of this run against its from-scratch run (no MLflow store needed).

The numbers come from `pipeline.compare.compare_tables` (tested in test_compare.py); here, how the
section shows them: the differences with their CIs, p and method, or why there is no paired test.
Only numbers reach it.
"""

from __future__ import annotations

from test_compare import predictions, table

from pipeline.compare import compare_tables
from pipeline.report.audit import render_report
from pipeline.report.compare import comparison_blocks


def _context(comparison) -> dict:
    return {
        "run_id": "r1",
        "config": {"model": {"weights": "imagenet"}},
        "run": {"params": {}, "metrics": {"test_auroc": 0.8}, "tags": {}},
        "baseline": {"run_id": "scratch1", "metrics": {"test_auroc": 0.7}, "tags": {}},
        "comparison": comparison,
    }


def _transfer(html: str) -> str:
    part = html[html.index('<section id="transfer">') :]
    return part[: part.index("</section>")]


def test_transfer_section_shows_the_paired_test_and_no_pseudonyms() -> None:
    base, this = predictions(0.5, seed=1), predictions(2.0, seed=2)
    comp = compare_tables([table("scratch1", base, "none"), table("r1", this)], n_boot=100)
    ctx = _context({"available": True, **comp.to_dict()})
    html = render_report(ctx)
    transfer = _transfer(html)
    assert "DeLong clustered by patient (Obuchowski 1997)" in transfer
    assert "paired bootstrap of patients (100 resamples)" in transfer
    assert f"{comp.pairs[0]['auroc']['diff']:+.3f}" in transfer
    assert "this run − from scratch, on the" in transfer and "test images of 60 patients" in transfer
    for label in ("Brier", "ECE", "NLL", "sensitivity", "specificity"):
        assert f'<td data-label="quantity">{label}</td>' in transfer, label
    assert "at the threshold it froze on validation (this run youden 0.400; from scratch youden 0.400)" in transfer
    assert "Negative transfer" not in html
    assert not any(s in html for s in this["subject_id"])
    assert not any(s in html for s in this["image_id"])
    for junk in (
        None,
        "junk",
        [1, "x"],
        7,
        {"x": {"y": [None]}},
        {"available": True},
        {"available": True, "pairs": [3]},
    ):
        page = render_report({**ctx, "comparison": junk})
        assert "could not be rendered" not in page
        assert "is the proper comparison" in page
    reason = "run x was tested on other units than the reference run y: 2 of its 30 test images"
    assert f"No paired test: {reason}." in render_report({**ctx, "comparison": {"available": False, "reason": reason}})


def test_without_bootstrap_the_section_shows_the_clustered_delong_only() -> None:
    comp = compare_tables([table("s", predictions(0.5), "none"), table("r", predictions(2.0, seed=3))], n_boot=0)
    blocks = comparison_blocks({"available": True, **comp.to_dict()})
    assert [b["type"] for b in blocks] == ["table", "para"]
    assert [row[0] for row in blocks[0]["rows"]] == ["AUROC"]
