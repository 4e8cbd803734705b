"""DDP: `finetune` under torchrun (2 CPU processes, gloo) matches one-process training with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import disc_cohort

from pipeline.finetune import finetune

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

# The same toy task in both worlds. No BatchNorm: per-process batch statistics would differ from
# the one-process batch by design (DDP averages gradients, not activations).
TASK = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.config import EarlyStoppingConfig, FinetuneConfig

GROUPS = [("stem", ["features.0"]), ("stage1", ["features.2"]), ("head", ["head"])]


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.features(x))


def data(n=48):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y, torch.arange(n)), y.numpy()


def cfg():
    return FinetuneConfig(strategy="gradual", unfreeze_every=1, epochs=3, batch_size=8, lr=1e-2, device="cpu",
                          sampler="weighted", class_weights="balanced",
                          early_stopping=EarlyStoppingConfig("val_loss", 9))
"""

SCRIPT = """
import os, sys
import torch
torch.set_num_threads(1)
from task import Toy, GROUPS, data, cfg
from pipeline.finetune import finetune

out = sys.argv[1]
ds, y = data()
torch.manual_seed(0)
model = Toy()
rows = []
res = finetune(model, GROUPS, ds, ds, y, cfg(), 2, on_epoch=lambda e, row: rows.append(e),
               checkpoint=os.path.join(out, "state.pt"))
rank = int(os.environ["RANK"])
torch.save({"state": model.state_dict(), "history": res.history, "rows": rows,
            "world": int(os.environ["WORLD_SIZE"])}, os.path.join(out, f"rank{rank}.pt"))
"""


def test_two_process_gloo_training_matches_one_process(tmp_path):
    (tmp_path / "task.py").write_text(textwrap.dedent(TASK))
    (tmp_path / "train.py").write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(tmp_path / "train.py"),
            str(tmp_path),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world"] == 2 and (tmp_path / "state.pt").exists()

    sys.path.insert(0, str(tmp_path))
    try:
        import task  # the same definitions, in this one process
    finally:
        sys.path.remove(str(tmp_path))
    ds, y = task.data()
    torch.manual_seed(0)
    single = task.Toy()
    res = finetune(single, task.GROUPS, ds, ds, y, task.cfg(), 2)

    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key  # replicas stay in sync
        torch.testing.assert_close(ranks[0]["state"][key], value, atol=1e-5, rtol=1e-4)
    for key in ("train_loss", "val_loss", "val_auroc", "trainable_params"):
        torch.testing.assert_close(
            torch.tensor(ranks[1]["history"][key]), torch.tensor(res.history[key]), atol=1e-5, rtol=1e-4
        )  # every rank gets rank 0's validation row
    assert ranks[0]["rows"] == ranks[1]["rows"] == [0, 1, 2]
    assert res.history["train_loss"][-1] < res.history["train_loss"][0]


def test_medxfer_train_under_torchrun_logs_one_run(tmp_path):
    import yaml
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    finetune = {
        "strategy": "gradual",
        "epochs": 2,
        "batch_size": 4,
        "device": "cpu",
        "early_stopping": {"metric": "val_loss", "patience": 9},
    }
    raw = disc_cohort(tmp_path, "ddp", finetune, f"sqlite:///{tmp_path / 'mlflow.db'}")
    del raw["prepare"]["cache_dir"]  # the manifest's own cache, as before
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "pipeline",
            "-q",
            "train",
            "config.yaml",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = proc.stdout.strip()
    assert len(run_id) == 32 and "\n" not in run_id  # printed once, by rank 0
    tracking.connect(raw["tracking"]["uri"])
    runs = tracking.search_runs(tracking.get_run(run_id)["experiment_id"])
    assert [r["run_id"] for r in runs] == [run_id] and runs[0]["status"] == "FINISHED"
    steps = [m.step for m in MlflowClient().get_metric_history(run_id, "val_loss")]
    assert steps == [1, 2]  # epochs numbered from 1
    summary = json.loads(Path(tracking.download_artifacts(run_id, "training_summary.json", tmp_path)).read_text())
    assert summary["world_size"] == 2
    assert not list((tmp_path / "manifest" / "checkpoints").glob("*.pt"))
