"""`medxfer compare`: paired, patient-clustered comparison of evaluated runs on the same test units.

Function level on synthetic predictions (known answers from `delong_test` and `paired_bootstrap`,
refusals, the negative-transfer flag in the report); then end to end on two real runs of one tiny
synthetic cohort (an ImageNet linear probe and a from-scratch one) in a real MLflow sqlite store.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import fixed_key
from scipy.special import expit

import pipeline.evaluate as M
from pipeline import tracking
from pipeline.cli import main
from pipeline.compare import RunTable, compare_tables, console_table, default_out
from pipeline.errors import DataError
from pipeline.report.audit import render_report
from pipeline.report.compare import comparison_page, negative_transfer

# --------------------------------------------------------------------------- synthetic predictions


def predictions(signal: float, n_patients: int = 60, seed: int = 0, shift: float = 0.0) -> pd.DataFrame:
    """Test predictions of one run: 1–3 images per patient, a shared patient effect, `signal` separation."""
    k = np.random.default_rng(42).integers(1, 4, n_patients)  # the same images and patients for every run
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(n_patients), k)
    y = (np.random.default_rng(99).random(n_patients) < 0.4).astype(np.int64)[pid]
    patient = np.random.default_rng(7).normal(size=n_patients)[pid]
    z = signal * (y - 0.5) + patient + 0.3 * rng.normal(size=len(y))
    return pd.DataFrame(
        {
            "image_id": [f"img{i:04d}" for i in range(len(pid))],
            "subject_id": [f"S{i}" for i in pid],
            "y_true": y,
            "prob": expit(0.8 * z + shift),  # calibrated: another monotone map of the same scores
            "prob_uncalibrated": expit(z),
        }
    )


def table(run_id: str, frame: pd.DataFrame, weights: str = "imagenet", **info) -> RunTable:
    base = {
        "run_id": run_id,
        "run_name": f"name-{run_id}",
        "experiment_id": "1",
        "weights": weights,
        "backbone": "tf_efficientnet_lite0",
        "strategy": "linear-probe",
        "manifest_hash": "abc",
        "test_split_id": "split",
        "logged_test_auroc": 0.0,
        "threshold_rule": "youden",
        "threshold": 0.4,
    }
    return RunTable({**base, **info}, frame)


def test_compare_tables_is_the_clustered_delong_and_the_paired_bootstrap_run_minus_reference() -> None:
    ref, run = predictions(0.5, seed=1), predictions(2.0, seed=2)
    comp = compare_tables(
        [table("scratch", ref, "none"), table("imnet", run.sample(frac=1.0, random_state=3))], n_boot=200, seed=4
    )
    y, g = ref["y_true"].to_numpy(), ref["subject_id"].to_numpy()
    d = M.delong_test(y, run["prob_uncalibrated"], ref["prob_uncalibrated"], groups=g)  # rows matched by image_id
    pair = comp.pairs[0]
    assert (pair["run_id"], pair["reference"], comp.reference) == ("imnet", "scratch", "scratch")
    for key in ("diff", "se", "ci_low", "ci_high", "p", "z"):
        assert pair["auroc"][key] == pytest.approx(d[key], abs=1e-12), key
    assert pair["auroc"]["diff"] > 0 and pair["auroc"]["ci_low"] > 0  # the better run is the compared one
    assert comp.runs[1]["auroc"] == pytest.approx(M.auroc(y, run["prob_uncalibrated"]), abs=1e-12)
    for key, metric, column in (("brier", "brier", "prob"), ("nll", "nll", "prob"), ("ece", "ece", "prob"),
                                ("auroc_bootstrap", "auroc", "prob_uncalibrated")):  # fmt: skip
        expected = M.paired_bootstrap(y, run[column], ref[column], g, 200, 4, metric=metric)
        for part in ("value_a", "value_b", "diff", "ci_low", "ci_high", "p", "n_boot"):
            assert pair[key][part] == pytest.approx(expected[part], abs=1e-12), (key, part)
    sens = M.at_threshold(y, run["prob"], 0.4)["sensitivity"]
    assert pair["sensitivity"]["value_a"] == pytest.approx(sens) and comp.runs[1]["sensitivity"] == pytest.approx(sens)
    assert (comp.n_images, comp.n_patients, comp.n_positive + comp.n_negative) == (len(ref), 60, len(ref))
    assert pair["negative_transfer"] is False and not comp.notes
    text = console_table(comp)
    assert f"{pair['auroc']['diff']:+.3f}" in text and "DeLong clustered by patient" in text


def test_negative_transfer_is_flagged_in_the_comparison_and_the_report() -> None:
    scratch, imnet = predictions(2.5, seed=1), predictions(0.3, seed=2)
    comp = compare_tables([table("scratch1", scratch, "none"), table("imnet1", imnet)], n_boot=100)
    pair = comp.pairs[0]
    assert pair["auroc"]["ci_high"] < 0 and pair["negative_transfer"] is True
    assert "NEGATIVE TRANSFER" in console_table(comp)
    ctx = {
        "run_id": "imnet1",
        "config": {"model": {"weights": "imagenet"}},
        "run": {"params": {}, "metrics": {"test_auroc": 0.6}, "tags": {}},
        "baseline": {"run_id": "scratch1", "metrics": {"test_auroc": 0.9}, "tags": {}},
        "comparison": {"available": True, **comp.to_dict()},
    }
    html = render_report(ctx)
    transfer = html[html.index('<section id="transfer">') :]
    transfer = transfer[: transfer.index("</section>")]
    assert (
        '<div class="note warn">Negative transfer: the pretrained run (model.weights = imagenet) ranks worse'
        in transfer
    )
    assert f"ΔAUROC {pair['auroc']['diff']:+.3f}, 95% CI {pair['auroc']['ci_low']:+.3f}" in transfer
    warnings = html[html.index('<section id="warnings">') :]
    assert "Negative transfer" in warnings
    assert "paired ΔAUROC" in html[html.index('<section id="summary">') :]
    # the same runs the other way round (the ImageNet run better), or a pretrained reference: no flag
    assert (
        compare_tables([table("s", imnet, "none"), table("i", scratch)], n_boot=0).pairs[0]["negative_transfer"]
        is False
    )
    both = compare_tables([table("a", scratch), table("b", imnet)], n_boot=0).pairs[0]
    assert both["auroc"]["ci_high"] < 0 and both["negative_transfer"] is False
    assert negative_transfer({"available": True, **comp.to_dict()}) is not None
    for junk in (None, "x", {"available": True}, {"available": True, "pairs": ["x"]}):
        assert negative_transfer(junk) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: RunTable({**t.info, "manifest_hash": "other"}, t.predictions), "trained on different manifests"),
        (lambda t: RunTable(t.info, t.predictions.iloc[1:]), "tested on other units than the reference run r0"),
        (lambda t: RunTable(t.info, t.predictions.assign(image_id="x" + t.predictions["image_id"])), "other units"),
        (lambda t: RunTable(t.info, t.predictions.assign(y_true=1 - t.predictions["y_true"])), "label the same test"),
        (lambda t: RunTable(t.info, t.predictions.assign(subject_id="P")), "to different patients"),
    ],
)
def test_runs_on_other_units_or_manifests_are_refused(change, message) -> None:
    ref = table("r0", predictions(1.0), "none")
    with pytest.raises(DataError, match=message):
        compare_tables([ref, change(table("r1", predictions(2.0, seed=5)))], n_boot=0)


def test_three_runs_are_each_compared_with_the_first_and_old_runs_are_noted(tmp_path) -> None:
    ref, a, b = predictions(1.0, seed=1), predictions(2.0, seed=2), predictions(0.5, seed=3)
    old = b.drop(columns="prob_uncalibrated")  # evaluated before prob_uncalibrated was logged
    comp = compare_tables([table("ref", ref, "none"), table("a", a), table("b", old, manifest_hash=None)], n_boot=0)
    assert [p["run_id"] for p in comp.pairs] == ["a", "b"] and {p["reference"] for p in comp.pairs} == {"ref"}
    assert comp.pairs[1]["auroc"]["diff"] == pytest.approx(
        M.auroc(ref["y_true"], b["prob"]) - M.auroc(ref["y_true"], ref["prob_uncalibrated"])
    )
    notes = " | ".join(comp.notes)
    assert notes.startswith("2 runs, each compared with the first (the reference, ref)")
    assert "run b predates prob_uncalibrated" in notes and "run b records no manifest_hash" in notes
    assert comp.pairs[0]["brier"] is None  # n_boot = 0: DeLong only
    page = comparison_page(comp.to_dict())
    assert page.count("vs the reference</h2>") == 2 and "each run compared with the reference" in page
    assert not any(s in page for s in ref["subject_id"]) and not any(s in page for s in ref["image_id"])
    assert default_out(["0123456789abcdef", "fedcba9876543210"]) == Path("medxfer-reports/compare-01234567-fedcba98")


def test_cli_usage_errors_exit_2_and_a_missing_store_exits_1_creating_nothing(tmp_path, capsys) -> None:
    assert main(["compare", "abc"]) == 2
    assert "compare needs at least 2 run ids, got 1" in capsys.readouterr().err
    assert main(["compare", "a", "b", "--bootstrap", "-1"]) == 2
    store = tmp_path / "none.db"
    assert main(["compare", "a", "b", "--tracking-uri", f"sqlite:///{store}", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "there is no MLflow store" in err and "nothing was created" in err and "Traceback" not in err
    assert not store.exists() and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- two real runs
@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> dict:
    """An ImageNet linear probe and a from-scratch one on one tiny synthetic cxr2d manifest, evaluated."""
    from pipeline.config import from_dict
    from pipeline.ingest import ingest
    from pipeline.run import evaluate, train
    from pipeline.synthetic import make_cohort

    root = tmp_path_factory.mktemp("compare")
    cohort = make_cohort(root / "cohort", kind="cxr2d", n=40, seed=3, positive_fraction=0.5)
    ingest(cohort.archive_dir, cohort.labels_csv, root / "manifest", key_file=fixed_key(root / "key"),
           val=0.25, test=0.35, seed=0, progress=False)  # fmt: skip
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ids = {}
    for weights in ("none", "imagenet"):
        cfg = from_dict(
            {
                "experiment": "compare-test",
                "data": {"manifest": str(root / "manifest")},
                "prepare": {"dims": "2d", "preset": "xray", "size": [32, 32], "cache_dir": str(root / "cache")},
                "model": {"backbone": "tf_efficientnet_lite0", "weights": weights, "in_channels": 1},
                "finetune": {"strategy": "linear-probe", "epochs": 2, "batch_size": 16, "device": "cpu"},
                "evaluate": {"bootstrap": 50, "subgroups": [], "calibration": "temperature"},
                "tracking": {"uri": uri, "register_as": f"compare-{weights}"},
            }
        )
        ids[weights] = train(cfg, progress=False)
        evaluate(cfg, ids[weights], progress=False)
    return {"root": root, "uri": uri, "scratch": ids["none"], "imagenet": ids["imagenet"]}


def test_compare_of_an_imagenet_and_a_scratch_run_gives_the_clustered_result(real_runs, tmp_path, capsys) -> None:
    r, out = real_runs, tmp_path / "cmp"
    argv = ["compare", r["scratch"], r["imagenet"], "--tracking-uri", r["uri"], "--out", str(out), "--bootstrap", "200"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    comp = json.loads((out / "comparison.json").read_text())
    pair = comp["pairs"][0]
    tracking.connect(r["uri"], existing=True)
    logged = {k: tracking.get_run(r[k])["metrics"] for k in ("scratch", "imagenet")}
    # ΔAUROC is the difference of the two logged test AUROCs (imagenet − scratch: the first run is the reference)
    assert pair["auroc"]["diff"] == pytest.approx(
        logged["imagenet"]["test_auroc"] - logged["scratch"]["test_auroc"], abs=1e-12
    )
    # its SE and CI are the clustered DeLong computed directly from the logged predictions
    frames = {}
    for k in ("scratch", "imagenet"):
        path = tracking.download_artifacts(r[k], "predictions/test.parquet", tmp_path / k)
        frames[k] = pd.read_parquet(path).set_index("image_id")
    a, b = frames["imagenet"], frames["scratch"].loc[frames["imagenet"].index]
    d = M.delong_test(a["y_true"], a["prob_uncalibrated"], b["prob_uncalibrated"], groups=a["subject_id"].to_numpy())
    assert d["clustered"] is True and d["n_clusters"] == comp["n_patients"]
    for key in ("se", "ci_low", "ci_high", "p"):
        assert pair["auroc"][key] == pytest.approx(d[key], abs=1e-9), key
    brier = M.paired_bootstrap(a["y_true"], a["prob"], b["prob"], a["subject_id"].to_numpy(), 200, 0, metric="brier")
    assert pair["brier"]["ci_low"] == pytest.approx(brier["ci_low"], abs=1e-12)
    assert comp["runs"][1]["sensitivity"] == pytest.approx(logged["imagenet"]["test_sensitivity"], abs=1e-12)
    assert comp["n_images"] == len(a) and comp["reference"] == r["scratch"]
    assert f"{pair['auroc']['diff']:+.3f}" in printed and str(out / "comparison.html") in printed
    # the MLflow comparison run: its own run, tagged with the compared ids, holding the numbers and files
    run = tracking.get_run(comp["mlflow_run_id"])
    assert (
        run["tags"]["medxfer.compare_of"] == f"{r['scratch']},{r['imagenet']}" and run["tags"]["kind"] == "comparison"
    )
    assert run["metrics"]["delta_auroc"] == pytest.approx(pair["auroc"]["diff"])
    assert run["metrics"]["delta_auroc_se"] == pytest.approx(d["se"])
    assert comp["mlflow_run_id"] not in (r["scratch"], r["imagenet"])
    assert (Path(tracking.download_artifacts(comp["mlflow_run_id"], "comparison.json", tmp_path / "art"))).is_file()
    # the page: self-contained, the clustered numbers, no pseudonyms
    page = (out / "comparison.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#|data:)""", page)
    assert f"{pair['auroc']['diff']:+.3f}" in page and "DeLong clustered by patient (Obuchowski 1997)" in page
    assert not any(str(s) in page for s in a["subject_id"]) and not any(str(i) in page for i in a.index)
    # the audit report of the ImageNet run shows the same clustered comparison in Transfer gain
    from pipeline.report import write_report

    html = write_report(r["imagenet"], tmp_path / "report.html", tracking_uri=r["uri"]).read_text()
    transfer = html[html.index('<section id="transfer">') :]
    transfer = transfer[: transfer.index("</section>")]
    assert "DeLong clustered by patient (Obuchowski 1997)" in transfer
    assert f"{pair['auroc']['diff']:+.3f}" in transfer
    assert f"{pair['auroc']['ci_low']:.3f}–{pair['auroc']['ci_high']:.3f}" in transfer
    assert "paired bootstrap of patients (50 resamples)" in transfer  # the run's own evaluate.bootstrap
    assert ("Negative transfer" in transfer) == (pair["auroc"]["ci_high"] < 0)


def test_compare_refuses_unevaluated_runs_and_other_test_units(real_runs, tmp_path, capsys) -> None:
    r = real_runs
    tracking.connect(r["uri"], existing=True)
    tags = tracking.get_run(r["scratch"])["tags"]
    with tracking.start_run("compare-test", tags={"manifest_hash": tags["manifest_hash"]}) as untested:
        tracking.log_params({"model.weights": "imagenet"})
    base = ["--tracking-uri", r["uri"], "--out", str(tmp_path / "o"), "--bootstrap", "0"]
    assert main(["compare", r["scratch"], untested, *base]) == 1
    assert f"run {untested} has not been evaluated" in capsys.readouterr().err
    preds = pd.read_parquet(tracking.download_artifacts(r["scratch"], "predictions/test.parquet", tmp_path / "p"))
    with tracking.start_run("compare-test", tags={"manifest_hash": tags["manifest_hash"]}) as fewer:
        tracking.log_metrics({"test_auroc": 0.7})
        part = tmp_path / "test.parquet"
        preds.iloc[2:].to_parquet(part, index=False)
        tracking.log_artifact(part, "predictions")
    assert main(["compare", r["scratch"], fewer, *base]) == 1
    err = capsys.readouterr().err
    assert f"run {fewer} was tested on other units than the reference run {r['scratch']}: 2 of" in err
    assert "Fix:" in err and "Traceback" not in err
    assert main(["compare", r["scratch"], r["scratch"], *base]) == 2
    assert not (tmp_path / "o").exists()
