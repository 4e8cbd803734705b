"""Tracking against real MLflow stores: sqlite and a live `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import free_port, start_mlflow_server, stop_mlflow_server

from pipeline import tracking
from pipeline.adapt import CalibratedNet, build_model, parse_record, read_package
from pipeline.errors import TrackingError
from pipeline.run import log_packaged


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, local artifacts) on a free loopback port."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    yield f"http://127.0.0.1:{port}"
    stop_mlflow_server(proc)


def _log_everything(uri: str) -> tuple[str, dict]:
    tracking.connect(uri)
    with tracking.start_run("tracking-test", tags={"config_hash": "abc"}) as run_id:
        tracking.log_params({"finetune.strategy": "linear-probe", "long": "x" * 900})
        for step in range(3):
            tracking.log_metrics({"val_auroc": 0.5 + 0.1 * step}, step=step)
        tracking.log_metrics({"test_auroc": 0.9, "test_auroc__sex.F": 0.8, "nan_is_skipped": float("nan")})
        torch.manual_seed(0)
        net, _ = build_model("tf_efficientnet_lite0", "none", num_classes=2, in_channels=1, dims="2d")
        info = log_packaged(
            CalibratedNet(net, 2.0), np.zeros((1, 1, 32, 32), np.float32), {"classes": ["0", "1"]}, "tracking-test"
        )
    return run_id, info


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_run_metrics_model_and_registry(store, tmp_path, request):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if store == "sqlite" else request.getfixturevalue("mlflow_server")
    run_id, info = _log_everything(uri)
    run = tracking.get_run(run_id)
    assert run["history"]["val_auroc"] == pytest.approx([0.5, 0.6, 0.7])
    assert run["metrics"]["test_auroc__sex.F"] == 0.8 and "nan_is_skipped" not in run["metrics"]
    assert len(run["params"]["long"]) == 500 and run["tags"]["config_hash"] == "abc"
    assert info["registered_name"] == "tracking-test" and info["version"] is not None
    uri = f"models:/tracking-test/{info['version']}"
    folder, record, source = tracking.download_model(uri, tmp_path / "download")
    assert "registered model tracking-test version 1" in source
    assert json.loads(record or "") == {f.name: _sha256(f) for f in folder.iterdir()}  # the tag, from the store
    model, description = read_package(folder, parse_record(record, source), source)
    x = torch.randn(3, 1, 32, 32)
    probs = model(x)
    assert description["metadata"]["classes"] == ["0", "1"]
    assert torch.allclose(probs, torch.softmax(model.net(x) / 2.0, dim=1))
    pyfunc = mlflow.pyfunc.load_model(uri)  # models from code: the package, no pickle
    out = np.asarray(pyfunc.predict(x.numpy()))
    assert np.allclose(out, probs.detach().numpy(), atol=1e-6)
    # the same record through the logged model's own URIs (models:/m-ID, runs:/RUN/model)
    for other in (info["model_uri"], f"runs:/{run_id}/model"):
        _, again, where = tracking.download_model(other, tmp_path / other.replace(":", "").replace("/", "_"))
        assert again == record and "tag medxfer_sha256 of logged model m-" in where


def test_unreachable_server_fails_fast():
    port = free_port()
    start = time.time()
    with pytest.raises(TrackingError, match=rf"127.0.0.1:{port} is unreachable.*mlflow server"):
        tracking.connect(f"http://127.0.0.1:{port}")
    assert time.time() - start < 10


def test_missing_sqlite_folder_is_named(tmp_path: Path):
    with pytest.raises(TrackingError, match="does not exist"):
        tracking.connect(f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}")


def test_load_model_bad_uri_names_it(tmp_path):
    tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(TrackingError, match="models:/absent/1"):
        tracking.download_model("models:/absent/1", tmp_path / "download")
