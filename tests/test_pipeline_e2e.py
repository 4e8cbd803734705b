"""The whole pipeline on a small generated cohort (the session's `demo_run`): what issue 2 and 6 promise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from pipeline import tracking
from pipeline.ingest import load_manifest
from pipeline.score import load_packaged

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(demo_run):
    tracking.connect(demo_run["uri"])
    return tracking.get_run(demo_run["run_id"])


def test_demo_run_has_metrics_weights_hash_and_registered_model(demo_run, run):
    metrics, params, tags = run["metrics"], run["params"], run["tags"]
    for key in (
        "test_auroc",
        "test_auroc_ci_low",
        "test_auroc_ci_high",
        "test_auprc",
        "test_sensitivity",
        "test_specificity",
        "test_ece",
        "test_ece_uncalibrated",
        "test_brier",
        "test_ece_change",
        "test_calibration_slope_uncalibrated",
        "calibration_undersized",
    ):
        assert key in metrics, key
    assert tags["calibration_method"] in ("none", "temperature", "vector")  # calibration: auto in the demo config
    assert ("temperature" in metrics) == (tags["calibration_method"] == "temperature")
    frame = load_manifest(demo_run["root"] / "manifest")
    for split in ("train", "val", "test"):  # the realised prevalence per split, by patient
        part = frame[frame["split"] == split]
        expected = part.loc[part["label"] == "1", "subject_id"].nunique() / part["subject_id"].nunique()
        assert metrics[f"prevalence_{split}"] == pytest.approx(expected, abs=1e-12), split
    assert metrics["test_auroc_ci_low"] <= metrics["test_auroc"] <= metrics["test_auroc_ci_high"]
    assert metrics["test_auroc"] > 0.6  # small cohort here; the full demo reaches ≥ 0.8
    sha = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"  # the bundled lite0 file
    assert params["weights_sha256"] == sha and tags["weights_sha256"] == sha
    assert params["finetune.strategy"] == "linear-probe" and tags["config_hash"] and tags["manifest_hash"]
    assert tags["registered_model"] == "cxr-demo/1"
    assert tags["test_evaluations"] == "1" and len(tags["test_split_id"]) == 16  # the test split was opened once
    assert Path(demo_run["report"]).stat().st_size > 10_000
    assert len(run["history"]["val_auroc"]) == int(metrics["epochs_run"])


def test_logged_test_auroc_equals_sklearn_on_logged_predictions(demo_run, run, tmp_path):
    path = tracking.download_artifacts(demo_run["run_id"], "predictions/test.parquet", tmp_path)
    pred = pd.read_parquet(path)
    assert list(pred.columns) == ["image_id", "subject_id", "y_true", "prob", "prob_uncalibrated"]
    auroc = run["metrics"]["test_auroc"]  # ranked on the uncalibrated softmax (README, Evaluation statistics)
    assert roc_auc_score(pred["y_true"], pred["prob_uncalibrated"]) == pytest.approx(auroc, abs=1e-9)


def test_registered_model_loads_with_pyfunc_and_matches_predictions(demo_run):
    tracking.connect(demo_run["uri"])
    meta = load_packaged("models:/cxr-demo/latest").meta
    assert meta["classes"] == ["0", "1"] and meta["prepare"]["dims"] == "2d"
    assert meta["temperature"] > 0 and meta["operating_point"]["rule"] == "youden"
    pyfunc = mlflow.pyfunc.load_model("models:/cxr-demo/latest")
    x = np.random.default_rng(0).standard_normal((2, 1, 224, 224)).astype(np.float32)
    probs = np.asarray(pyfunc.predict(x))
    assert probs.shape == (2, 2) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_no_phi_in_manifest_mlflow_or_report(demo_run):
    root = demo_run["root"]
    labels = pd.read_csv(root / "cohort" / "labels.csv", dtype=str)
    secrets = set(labels["patient_id"])
    frame = load_manifest(root / "manifest")
    report = re.sub(r"data:image/[a-z+]+;base64,[A-Za-z0-9+/=]+", "", Path(demo_run["report"]).read_text())
    blob = frame.to_csv(index=False) + report  # (embedded figures removed: base64 can spell anything)
    blob += (root / "manifest" / "ingest_report.json").read_text()
    tracking.connect(demo_run["uri"])
    run = tracking.get_run(demo_run["run_id"])
    blob += json.dumps({k: run[k] for k in ("params", "tags", "metrics")})
    leaked = [s for s in secrets if s in blob]
    assert not leaked, leaked[:3]
    assert "MRN" not in blob and "^" not in frame.to_csv(index=False)


def test_patients_never_span_two_splits(demo_run):
    frame = load_manifest(demo_run["root"] / "manifest")
    assert (frame.groupby("subject_id")["split"].nunique() == 1).all()


def test_one_epoch_numbering_everywhere(demo_run, run):
    """Epochs are numbered from 1 on the console, in MLflow (best_epoch and steps) and in the report."""
    client = mlflow.tracking.MlflowClient()
    steps = [m.step for m in client.get_metric_history(demo_run["run_id"], "val_auroc")]
    n = int(run["metrics"]["epochs_run"])
    assert sorted(steps) == list(range(1, n + 1))
    best = int(run["metrics"]["best_epoch"])
    assert 1 <= best <= n
    history = run["history"]["val_auroc"]
    assert history[best - 1] == max(history)  # the early-stopping metric's best epoch, as numbered
    assert run["metrics"]["val_auroc_evaluated_model"] == pytest.approx(max(history), abs=1e-4)
    html = Path(demo_run["report"]).read_text()
    assert f'<th scope="row">Best epoch (of the evaluated model, numbered from 1)</th><td>{best}</td>' in html
    assert "layer decay" not in html  # a linear probe trains the head only: the setting did not apply
