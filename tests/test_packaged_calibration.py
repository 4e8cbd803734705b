"""The registered model is the evaluated model: for every calibration method, scoring the test split
through it (MLflow pyfunc and `medxfer score`) gives the logged test predictions and decisions."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import tracking
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.evaluate import CALIBRATORS
from pipeline.prepare import spec_from_dict
from pipeline.run import evaluate, load_cohort, train
from pipeline.run.cohort import make_datasets
from pipeline.score import load_packaged

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(demo_run, tmp_path_factory):
    """A fresh run on the session demo's manifest, in a store of its own (the demo's run stays untouched)."""
    root = demo_run["root"]
    cfg = load_config(root / "config.yaml")
    cfg.experiment = "packaged-calibration"
    cfg.tracking.uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    cfg.evaluate.bootstrap = 20
    cfg.finetune.epochs = 15
    cfg.prepare.size = [64, 64]  # 12x cheaper forward passes than the demo's 224²: four evaluations and scorings
    run_id = train(cfg, progress=False)
    return cfg, run_id


@pytest.mark.parametrize("method", sorted(CALIBRATORS))
def test_registered_model_reproduces_the_evaluated_predictions(trained, demo_run, method, tmp_path, capsys):
    cfg, run_id = trained
    cfg.evaluate.calibration, cfg.tracking.register_as = method, f"cal-{method}"
    evaluate(cfg, run_id, progress=False)
    logged = pd.read_parquet(tracking.download_artifacts(run_id, "predictions/test.parquet", tmp_path))
    model_uri = f"models:/cal-{method}/1"
    pkg = load_packaged(model_uri)  # verified against the registry's sha256 record, rebuilt from model.json
    meta = pkg.meta
    assert meta["calibration"]["method"] == method
    assert pkg.model.calibration == meta["calibration"]  # the fitted calibrator, as data (isotonic: breakpoints)
    threshold = meta["operating_point"]["threshold"]
    expected_decision = np.where(logged["prob"].to_numpy() >= threshold, "1", "0")

    # MLflow pyfunc on the prepared test tensors, in the logged order
    cohort = load_cohort(cfg.data.manifest)
    test = make_datasets(cfg, cohort, spec_from_dict(meta["prepare"]), augment=False)["test"]
    x = torch.stack([test[i][0] for i in range(len(test))]).numpy()
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    probs = np.asarray(pyfunc.predict(x))
    np.testing.assert_allclose(probs[:, 1], logged["prob"], atol=1e-6)

    # `medxfer score` over the whole archive, restricted to the test units
    out = tmp_path / "scores.parquet"
    root = demo_run["root"]
    argv = ["score", str(root / "cohort" / "archive"), "--model", model_uri, "--out", str(out)]
    argv += ["--tracking-uri", cfg.tracking.uri, "--key-file", str(root / "keys" / "pseudonym.key")]
    assert main(argv) == 0, capsys.readouterr().err
    scored = pd.read_parquet(out).set_index("image_id").loc[logged["image_id"]]
    assert (scored["status"] == "ok").all()
    np.testing.assert_allclose(scored["prob"].to_numpy(), logged["prob"].to_numpy(), atol=1e-6)
    assert (scored["decision"].to_numpy() == expected_decision).all()
