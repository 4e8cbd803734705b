"""Resume: an interrupted run continues bit-identically (loop API), and `train --resume` keeps one MLflow run."""

from __future__ import annotations

import tempfile

import pytest
import torch
import yaml
from conftest import disc_cohort
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from pipeline import tracking
from pipeline.cli import main
from pipeline.config import EarlyStoppingConfig, FinetuneConfig, load_config
from pipeline.errors import ConfigError, DataError
from pipeline.finetune import finetune
from pipeline.finetune.checkpoint import load_state
from pipeline.prepare import build_augment
from pipeline.run import checkpoint_path, train

TIMING = ("epoch_seconds", "images_per_s")


class DropToy(nn.Module):
    """Conv + BatchNorm + Dropout (the dropout mask draws from torch's global RNG)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.3),
        )
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.features(x))


GROUPS = [("stem", ["features.0", "features.1"]), ("stage1", ["features.3", "features.4"]), ("head", ["head"])]


class Augmented(Dataset):
    """(x, y, i) with a seeded MONAI augmentation whose random state lives in the dataset."""

    def __init__(self, n=24, seed=0, augment=True):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 2
        self.x = torch.randn(n, 1, 8, 8, generator=g) + self.y.view(-1, 1, 1, 1).float()
        self.augment = (
            build_augment("2d", flip=True, rotate_deg=10, scale=0.1, intensity=0.1, seed=seed) if augment else None
        )

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i] if self.augment is None else torch.as_tensor(self.augment(self.x[i])).float()
        return x, int(self.y[i]), i


def _cfg(**kw):
    base = dict(
        strategy="gradual",
        epochs=4,
        unfreeze_every=2,
        batch_size=8,
        lr=5e-3,
        device="cpu",
        sampler="weighted",
        early_stopping=EarlyStoppingConfig("val_loss", 9),
    )
    base.update(kw)
    return FinetuneConfig(**base)


def _run(cfg, checkpoint=None, resume=False, raise_at=None):
    torch.manual_seed(0)
    model, ds = DropToy(), Augmented()

    def hook(epoch, row):
        if epoch == raise_at:
            raise KeyboardInterrupt

    res = finetune(
        model,
        GROUPS,
        ds,
        Augmented(seed=1, augment=False),
        ds.y.numpy(),
        cfg,
        2,
        on_epoch=hook,
        checkpoint=checkpoint,
        resume=resume,
    )
    return model, res


@pytest.mark.parametrize(
    ("cfg_kw", "raise_at"),
    [
        ({}, 2),  # interrupted at a gradual phase boundary: the resumed run starts the next phase
        ({}, 3),  # mid-phase: optimizer moments and schedule position come from the checkpoint
        ({"strategy": "finetune", "sampler": "uniform", "loss": "focal"}, 1),
    ],
)
def test_resume_after_interrupt_equals_the_uninterrupted_run(tmp_path, cfg_kw, raise_at):
    full_model, full = _run(_cfg(**cfg_kw))
    ckpt = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(**cfg_kw), checkpoint=ckpt, raise_at=raise_at)
    assert load_state(ckpt)["next_epoch"] == raise_at  # the interrupted epoch was never checkpointed
    model, res = _run(_cfg(**cfg_kw), checkpoint=ckpt, resume=True)
    assert res.resumed_from == raise_at and res.epochs_run == full.epochs_run == 4
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    for key, values in full.history.items():
        if key not in TIMING:
            assert res.history[key] == values, key
    assert (res.best_epoch, res.trainable_by_phase) == (full.best_epoch, full.trainable_by_phase)
    assert load_state(ckpt)["next_epoch"] == 4


def test_resume_refuses_other_settings_and_missing_or_foreign_files(tmp_path):
    ckpt = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(), checkpoint=ckpt, raise_at=1)
    with pytest.raises(ConfigError, match=r"finetune.lr: 0.005 then, 0.001 now"):
        _run(_cfg(lr=1e-3), checkpoint=ckpt, resume=True)
    _run(_cfg(device="cpu", num_workers=0, resume="any"), checkpoint=ckpt, resume=True)  # may change
    with pytest.raises(ConfigError, match="no training checkpoint at"):
        _run(_cfg(), checkpoint=tmp_path / "missing.pt", resume=True)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="expected a 'medxfer-train-state/1' training checkpoint"):
        _run(_cfg(), checkpoint=tmp_path / "other.pt", resume=True)


def test_resuming_an_early_stopped_run_trains_no_more(tmp_path):
    ckpt = tmp_path / "state.pt"
    cfg = _cfg(strategy="linear-probe", lr=0.0, epochs=20, early_stopping=EarlyStoppingConfig("val_loss", 2))
    _, first = _run(cfg, checkpoint=ckpt)
    assert first.stopped_early and first.epochs_run == 3
    calls = []
    torch.manual_seed(0)
    again = finetune(
        DropToy(),
        GROUPS,
        Augmented(),
        Augmented(seed=1, augment=False),
        Augmented().y.numpy(),
        cfg,
        2,
        on_epoch=lambda e, row: calls.append(e),
        checkpoint=ckpt,
        resume=True,
    )
    assert calls == [] and again.stopped_early and again.epochs_run == 3 and again.best_epoch == first.best_epoch


# --- through `train` / `medxfer train --resume` with a real manifest and MLflow -------------------


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    finetune = {
        "strategy": "finetune",
        "epochs": 3,
        "batch_size": 4,
        "lr": 1e-3,
        "device": "cpu",
        "class_weights": "balanced",
        "early_stopping": {"metric": "val_loss", "patience": 9},
    }
    raw = disc_cohort(root, "resume-test", finetune, f"sqlite:///{root / 'mlflow.db'}")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    reference = train(load_config(path), progress=False)
    return root, path, reference


def _epoch_history(run_id):
    client = MlflowClient()
    out = {}
    for key in ("train_loss", "val_loss", "val_auroc", "lr", "trainable_params", "epoch_seconds"):
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        out[key] = ([m.step for m in points], [m.value for m in points])
    return out


def _state_dict(run_id):
    with tempfile.TemporaryDirectory() as tmp:
        folder = tracking.download_artifacts(run_id, "checkpoint", tmp)
        return load_file(folder / "weights.safetensors")


@pytest.mark.slow  # trains a small EfficientNet-Lite0 four times (~30-60 s on 2 shared cores)
def test_train_resume_continues_the_same_mlflow_run_without_repeated_steps(resume_setup, monkeypatch, capsys):
    root, path, reference = resume_setup
    logged = tracking.log_metrics

    def log_then_die(metrics, step=None):  # epoch 2 reaches MLflow, but its checkpoint is never written
        logged(metrics, step=step)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.run.tracking.log_metrics", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(path), progress=False)
    monkeypatch.setattr("pipeline.run.tracking.log_metrics", logged)
    run_id = next(
        r for r in tracking.search_runs(tracking.get_run(reference)["experiment_id"]) if r["run_id"] != reference
    )["run_id"]
    assert checkpoint_path(root / "manifest", run_id).exists()

    changed = root / "changed.yaml"
    changed.write_text(path.read_text().replace("lr: 0.001", "lr: 0.002"))
    assert main(["train", str(changed), "--resume", run_id]) == 2
    assert "finetune.lr: '0.001' then, '0.002' now" in capsys.readouterr().err

    assert main(["-q", "train", str(path), "--resume", run_id]) == 0
    assert capsys.readouterr().out.strip() == run_id
    run = tracking.get_run(run_id)
    assert run["status"] == "FINISHED" and run["tags"]["resumed_at_epoch"] == "2"
    assert not checkpoint_path(root / "manifest", run_id).exists()  # removed once training is logged
    history, expected = _epoch_history(run_id), _epoch_history(reference)
    for key, (steps, values) in history.items():
        assert steps == [1, 2, 3], key  # each epoch exactly once, numbered from 1
        if key != "epoch_seconds":
            assert values == expected[key][1], key
    for key, value in _state_dict(reference).items():
        assert torch.equal(value, _state_dict(run_id)[key]), key

    assert main(["train", str(path), "--resume", run_id]) == 2
    assert f"run {run_id} finished; there is nothing to resume" in capsys.readouterr().err
