"""Explicit weight files through `pipeline.run.train` (sha256 recorded); the CLI's exit 2 on bad backbones/weights."""

from __future__ import annotations

import hashlib
import json
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from conftest import fixed_key
from safetensors.torch import load_file

from pipeline import tracking
from pipeline.cli import main
from pipeline.config import from_dict
from pipeline.ingest import ingest
from pipeline.run import train
from pipeline.synthetic import make_cohort


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing in these tests may download: any network connection or hub download fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """A tiny ingested cxr2d cohort (24 patients, half positive; both classes in every split) shared here."""
    root = tmp_path_factory.mktemp("cxr")
    cohort = make_cohort(root / "cohort", kind="cxr2d", n=24, seed=3, positive_fraction=0.5)
    ingest(
        cohort.archive_dir,
        cohort.labels_csv,
        root / "manifest",
        key_file=fixed_key(root / "key"),
        val=0.25,
        test=0.25,
        seed=0,
        progress=False,
    )
    return root / "manifest"


def _raw(manifest: Path, tmp: Path, **model) -> dict:
    return {
        "experiment": "weights-test",
        "data": {"manifest": str(manifest)},
        "prepare": {"dims": "2d", "preset": "xray", "size": [32, 32], "cache_dir": str(tmp / "cache")},
        "model": {"backbone": "resnet18", "weights": "none", **model},
        "finetune": {"strategy": "linear-probe", "epochs": 1, "batch_size": 8, "device": "cpu"},
        "evaluate": {"bootstrap": 0, "subgroups": []},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
    }


def _write(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision-format resnet18 state dict (random init, seeded) saved as a .pth file."""
    torch.manual_seed(7)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "my-resnet18.pth"
    torch.save(state, path)
    return path, state


def test_explicit_weights_file_is_loaded_and_its_sha256_recorded(manifest, resnet18_file, tmp_path):
    path, state = resnet18_file
    cfg = from_dict(_raw(manifest, tmp_path, weights=str(path)))
    run_id = train(cfg, progress=False)
    run = tracking.get_run(run_id)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert run["params"]["weights_sha256"] == sha
    assert run["tags"]["weights_sha256"] == sha
    assert run["params"]["model.weights"] == str(path)
    # the logged checkpoint holds the file's tensors: a frozen backbone keeps them exactly
    folder = tracking.download_artifacts(run_id, "checkpoint", tmp_path / "dl")  # a package: JSON + safetensors
    body = load_file(folder / "weights.safetensors")
    ckpt = json.loads((folder / "model.json").read_text())["metadata"]
    assert torch.equal(body["features.layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
    assert torch.equal(body["features.bn1.running_var"], state["bn1.running_var"])
    # the RGB stem is folded to one channel by summing its kernels
    assert torch.allclose(body["features.conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    assert ckpt["adaptation"]["weights_file"] == str(path)
    assert ckpt["adaptation"]["weights_sha256"] == sha


def test_loading_a_logged_checkpoint_leaves_no_temporary_files(manifest, tmp_path, monkeypatch):
    """evaluate() downloads the 14 MB checkpoint; it once stayed in /tmp after every run."""
    from pipeline.run.evaluation import _load_checkpoint

    cfg = from_dict(_raw(manifest, tmp_path, weights="none"))
    run_id = train(cfg, progress=False)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    model, ckpt = _load_checkpoint(run_id)
    assert ckpt["classes"] and sum(p.numel() for p in model.parameters()) > 0
    assert list(scratch.iterdir()) == []


def test_weights_none_records_none(manifest, tmp_path):
    run_id = train(from_dict(_raw(manifest, tmp_path, weights="none")), progress=False)
    assert tracking.get_run(run_id)["params"]["weights_sha256"] == "none"


def test_unknown_backbone_exits_2_with_suggestion(manifest, tmp_path, capsys):
    path = _write(_raw(manifest, tmp_path, backbone="resnet19"), tmp_path / "bad.yaml")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.backbone: unknown backbone 'resnet19' (did you mean 'resnet18'?)" in err
    assert "Traceback" not in err


def test_absent_imagenet_weights_exit_2_naming_the_file(manifest, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    monkeypatch.delenv("MEDXFER_WEIGHTS_DIR", raising=False)
    path = _write(_raw(manifest, tmp_path, backbone="resnet50", weights="imagenet"), tmp_path / "r50.yaml")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no ImageNet weights for 'resnet50'" in err
    assert "Place 'resnet50-0676ba61.pth'" in err
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints") in err
    assert "never downloads" in err and "Traceback" not in err
    assert not (tmp_path / "torch-home").exists()  # nothing was fetched or created there


def test_missing_weights_path_exits_2_naming_it(manifest, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "resnet18.pth"
    path = _write(_raw(manifest, tmp_path, weights=str(missing)), tmp_path / "missing.yaml")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"model.weights: '{missing}' is not an existing file" in err


def test_weights_file_of_another_backbone_exits_2(manifest, resnet18_file, tmp_path, capsys):
    path = _write(
        _raw(manifest, tmp_path, backbone="densenet121", weights=str(resnet18_file[0])), tmp_path / "mismatch.yaml"
    )
    assert main(["train", str(path)]) == 2
    assert "does not fit backbone 'densenet121'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"backbone": "resnet19"}, "did you mean 'resnet18'"),
        ({"weights": "/nowhere/resnet18.pth"}, "'/nowhere/resnet18.pth' is not an existing file"),
    ],
)
def test_bad_model_fails_before_ingest(tmp_path, capsys, model, expected):
    """The model is checked first: the (absent) archive is never reached and no manifest is written."""
    raw = _raw(tmp_path / "new-manifest", tmp_path, **model)
    raw["data"].update(source=str(tmp_path / "archive-not-there"), labels=str(tmp_path / "labels.csv"))
    assert main(["train", str(_write(raw, tmp_path / "early.yaml"))]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "archive-not-there" not in err
    assert not (tmp_path / "new-manifest").exists()
