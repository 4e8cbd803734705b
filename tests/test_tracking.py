"""Tracking against real MLflow stores: sqlite and a live `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import free_port, start_mlflow_server, stop_mlflow_server
from torch import nn

from pipeline import tracking
from pipeline.errors import TrackingError


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, local artifacts) on a free loopback port."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    yield f"http://127.0.0.1:{port}"
    stop_mlflow_server(proc)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x))


def _log_everything(uri: str) -> tuple[str, dict]:
    tracking.connect(uri)
    with tracking.start_run("tracking-test", tags={"config_hash": "abc"}) as run_id:
        tracking.log_params({"finetune.strategy": "linear-probe", "long": "x" * 900})
        for step in range(3):
            tracking.log_metrics({"val_auroc": 0.5 + 0.1 * step}, step=step)
        tracking.log_metrics({"test_auroc": 0.9, "test_auroc__sex.F": 0.8, "nan_is_skipped": float("nan")})
        model = tracking.CalibratedNet(Tiny(), 2.0)
        info = tracking.log_model(
            model, np.zeros((1, 1, 4, 4), np.float32), {"classes": ["0", "1"]}, register_as="tracking-test-model"
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
    assert info["registered_name"] == "tracking-test-model" and info["version"] is not None
    model, meta = tracking.load_model(f"models:/tracking-test-model/{info['version']}")
    x = torch.randn(3, 1, 4, 4)
    probs = model(x)
    assert meta["classes"] == ["0", "1"]
    assert torch.allclose(probs, torch.softmax(model.net(x) / 2.0, dim=1))
    pyfunc = mlflow.pyfunc.load_model(f"models:/tracking-test-model/{info['version']}")
    out = np.asarray(pyfunc.predict(x.numpy()))
    assert np.allclose(out, probs.detach().numpy(), atol=1e-6)


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
        tracking.load_model("models:/absent/1")


def test_model_packaged_with_only_a_temperature_still_loads():
    """Models registered before the calibrator was packaged hold a `temperature` buffer only."""
    import pickle

    old = tracking.CalibratedNet(Tiny())
    del old.__dict__["calibration"]
    old.register_buffer("temperature", torch.tensor(2.0))
    loaded = pickle.loads(pickle.dumps(old))
    x = torch.randn(3, 1, 4, 4)
    assert loaded.calibration == {"method": "temperature", "temperature": 2.0}
    assert torch.allclose(loaded(x), torch.softmax(loaded.net(x) / 2.0, dim=1))
