"""Hostile artifacts: a pickle payload in any file medxfer reads never runs; the command exits 1 naming the file.

The payload is harmless: unpickling it writes a marker file. Each test puts it into one artifact
(the run's checkpoint, a resume checkpoint, the registered model, a weights file, the feature and
tensor caches), runs the real CLI command that reads that artifact, and checks the exit code, the
message and that the marker was never written. `test_the_payload_is_live` shows that plain
unpickling does run it, so the other tests can fail.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from conftest import fixed_key
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.cli import main
from pipeline.ingest import ingest
from pipeline.run import checkpoint_path
from pipeline.synthetic import make_cohort


class Payload:
    """Unpickling this runs `exec`, which writes `marker`: the stand-in for an attacker's code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def _payload_bytes(marker: Path, torch_format: bool) -> bytes:
    if not torch_format:
        return pickle.dumps(Payload(marker))
    path = marker.with_suffix(".tmp.pt")
    torch.save({"state_dict": Payload(marker)}, path)  # what `torch.save` of an attacker's object writes
    data = path.read_bytes()
    path.unlink()
    return data


@contextmanager
def hostile(path: Path, marker: Path, torch_format: bool = True) -> Iterator[Path]:
    """Replace `path` by a payload for the block, then put the original back."""
    original = path.read_bytes()
    path.write_bytes(_payload_bytes(marker, torch_format))
    try:
        yield path
    finally:
        path.write_bytes(original)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny cohort trained (linear probe on cached features), evaluated and registered as `hostile`."""
    root = tmp_path_factory.mktemp("hostile")
    cohort = make_cohort(root / "cohort", kind="cxr2d", n=16, seed=3, positive_fraction=0.5)
    key = fixed_key(root / "key")
    ingest(cohort.archive_dir, cohort.labels_csv, root / "manifest", key_file=key, val=0.25, test=0.25, progress=False)
    raw = {
        "experiment": "hostile",
        "data": {"manifest": str(root / "manifest")},
        "prepare": {"dims": "2d", "preset": "xray", "size": [32, 32], "cache_dir": str(root / "cache")},
        "model": {"backbone": "tf_efficientnet_lite0", "weights": "none"},
        "finetune": {"strategy": "linear-probe", "epochs": 1, "batch_size": 8, "device": "cpu"},
        "evaluate": {"bootstrap": 0, "subgroups": [], "calibration": "isotonic"},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "register_as": "hostile"},
    }
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    tracking.connect(raw["tracking"]["uri"])
    assert main(["train", str(config)]) == 0
    run = MlflowClient().search_runs([mlflow.get_experiment_by_name("hostile").experiment_id])[0]
    assert main(["evaluate", str(config), "--run", run.info.run_id]) == 0
    return {
        "root": root,
        "config": config,
        "run_id": run.info.run_id,
        "uri": raw["tracking"]["uri"],
        "archive": cohort.archive_dir,
        "key": key,
        "marker": root / "PAYLOAD-RAN",
    }


def _one(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def _checkpoint_file(setup: dict, name: str) -> Path:
    return _one(setup["root"] / "mlartifacts", f"{setup['run_id']}/artifacts/checkpoint/{name}")


def _package_file(setup: dict, name: str) -> Path:
    return _one(setup["root"] / "mlartifacts", f"models/*/artifacts/artifacts/package/{name}")


def _score(setup: dict, tmp_path: Path) -> list[str]:
    return [
        "score",
        str(setup["archive"]),
        "--model",
        "models:/hostile/1",
        "--out",
        str(tmp_path / "scores.parquet"),
        "--tracking-uri",
        setup["uri"],
        "--key-file",
        str(setup["key"]),
    ]


def test_the_payload_is_live(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(_payload_bytes(marker, torch_format=False))
    assert marker.read_text() == "payload ran"
    marker.unlink()
    with zipfile.ZipFile(_write(tmp_path / "p.pt", _payload_bytes(marker, torch_format=True))) as zf:
        pickle.loads(zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl"))))  # what torch.load unpickles
    assert marker.exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["weights.safetensors", "model.json"])
def test_evaluate_refuses_a_tampered_checkpoint(setup, capsys, name):
    with hostile(_checkpoint_file(setup, name), setup["marker"]):
        assert main(["evaluate", str(setup["config"]), "--run", setup["run_id"]]) == 1
    err = capsys.readouterr().err
    assert f"{name} in artifact checkpoint/ of run {setup['run_id']}: sha256" in err
    assert f"recorded in tag checkpoint_sha256 of run {setup['run_id']}" in err
    assert "nothing in it was loaded or run" in err
    assert not setup["marker"].exists()


def test_evaluate_catches_a_consistent_swap_of_description_and_weights(setup, capsys):
    """New weights with a model.json that lists their sha256: the run's tag, kept in the store, still differs."""
    weights, description = _checkpoint_file(setup, "weights.safetensors"), _checkpoint_file(setup, "model.json")
    old_w, old_d = weights.read_bytes(), description.read_bytes()
    try:
        from safetensors.torch import load, save

        state = {k: torch.zeros_like(v) for k, v in load(old_w).items()}
        new_w = save(state)
        doc = json.loads(old_d)
        doc["files"]["weights.safetensors"] = hashlib.sha256(new_w).hexdigest()
        weights.write_bytes(new_w)
        description.write_text(json.dumps(doc))
        assert main(["evaluate", str(setup["config"]), "--run", setup["run_id"]]) == 1
    finally:
        weights.write_bytes(old_w)
        description.write_bytes(old_d)
    assert f"model.json in artifact checkpoint/ of run {setup['run_id']}: sha256" in capsys.readouterr().err


def test_evaluate_never_unpickles_an_old_style_checkpoint_pt(setup, capsys):
    """A run that holds only checkpoint/checkpoint.pt (an earlier medxfer, or forged) is refused unread."""
    pt = setup["root"] / "checkpoint.pt"
    pt.write_bytes(_payload_bytes(setup["marker"], torch_format=True))
    with tracking.start_run("hostile") as run_id:
        tracking.log_artifact(pt, "checkpoint")
    assert main(["evaluate", str(setup["config"]), "--run", run_id]) == 1
    err = capsys.readouterr().err
    assert f"run {run_id} has no checkpoint_sha256 tag" in err and "no longer loads" in err
    assert not setup["marker"].exists()


def test_train_resume_refuses_a_hostile_resume_checkpoint(setup, capsys):
    client = MlflowClient()
    run_id = client.create_run(mlflow.get_experiment_by_name("hostile").experiment_id).info.run_id  # interrupted
    state = checkpoint_path(setup["root"] / "manifest", run_id)
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_bytes(_payload_bytes(setup["marker"], torch_format=True))
    assert main(["train", str(setup["config"]), "--resume", run_id]) == 1
    err = capsys.readouterr().err
    assert f"{state}: not a training checkpoint: it holds Python objects other than tensors" in err
    assert not setup["marker"].exists()


@pytest.mark.parametrize(
    ("name", "torch_format"), [("weights.safetensors", False), ("weights.safetensors", True), ("model.json", False)]
)
def test_score_refuses_a_tampered_registered_model(setup, tmp_path, capsys, name, torch_format):
    with hostile(_package_file(setup, name), setup["marker"], torch_format):
        assert main(_score(setup, tmp_path)) == 1
    err = capsys.readouterr().err
    assert f"{name} in the package of models:/hostile/1: sha256" in err
    assert "recorded in tag medxfer_sha256 of registered model hostile version 1" in err
    assert not setup["marker"].exists()
    assert not (tmp_path / "scores.parquet").exists()


def test_score_never_runs_the_models_code_file(setup, tmp_path, capsys):
    """The pyfunc flavour's code file is for `mlflow.pyfunc.load_model`; `medxfer score` reads the package only."""
    code = _one(setup["root"] / "mlartifacts", "models/*/artifacts/pyfunc_model.py")
    original = code.read_text()
    code.write_text(f"open({str(setup['marker'])!r}, 'w').write('payload ran')\n")
    try:
        assert main(_score(setup, tmp_path)) == 0, capsys.readouterr().err
    finally:
        code.write_text(original)
    assert not setup["marker"].exists()
    assert (tmp_path / "scores.parquet").exists()


def test_score_refuses_a_pickled_model_without_a_package(setup, tmp_path, capsys):
    """A model logged the earlier way (mlflow.pytorch, pickle) whose pickle is a payload: refused unread."""
    tracking.connect(setup["uri"])
    with tracking.start_run("hostile"):
        info = mlflow.pytorch.log_model(torch.nn.Linear(2, 2), name="model", serialization_format="pickle")
    mlflow.register_model(info.model_uri, "legacy")
    pickles = list((setup["root"] / "mlartifacts").glob(f"models/{info.model_id}/artifacts/data/*.pth"))
    assert pickles  # the pickled nn.Module that mlflow.pytorch.load_model would unpickle
    for pth in pickles:
        pth.write_bytes(_payload_bytes(setup["marker"], torch_format=True))
    argv = _score(setup, tmp_path)
    argv[argv.index("models:/hostile/1")] = "models:/legacy/1"
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "models:/legacy/1 has no medxfer_sha256 record" in err and "not loaded" in err
    assert not setup["marker"].exists()


def test_train_refuses_a_hostile_weights_file(setup, capsys):
    weights = _write(setup["root"] / "my-weights.pth", _payload_bytes(setup["marker"], torch_format=True))
    assert main(["train", str(setup["config"]), "--set", f"model.weights={weights}"]) == 1
    err = capsys.readouterr().err
    assert f"{weights}: not a PyTorch state dict (model.weights): it holds Python objects other than tensors" in err
    assert not setup["marker"].exists()


def test_train_refuses_a_hostile_feature_cache(setup, capsys):
    cache = sorted((setup["root"] / "cache" / "features").glob("*.pt"))[0]  # train's or val's features
    with hostile(cache, setup["marker"]):
        assert main(["train", str(setup["config"])]) == 1
    err = capsys.readouterr().err
    assert f"{cache}: not a feature cache: it holds Python objects other than tensors" in err
    assert f"delete {cache}" in err
    assert not setup["marker"].exists()


def test_evaluate_refuses_a_hostile_tensor_cache(setup, capsys):
    entries = [p for p in (setup["root"] / "cache").rglob("*.pt") if "features" not in p.parts]
    assert entries
    saved = {p: p.read_bytes() for p in entries}
    try:
        for p in entries:
            p.write_bytes(_payload_bytes(setup["marker"], torch_format=True))
        assert main(["evaluate", str(setup["config"]), "--run", setup["run_id"]]) == 1
    finally:
        for p, data in saved.items():
            p.write_bytes(data)
    err = capsys.readouterr().err
    assert "not a prepared-tensor cache entry: it holds Python objects other than tensors" in err
    assert not setup["marker"].exists()


def test_a_corrupt_cache_entry_is_named_too(setup, capsys):
    entry = next(p for p in (setup["root"] / "cache").rglob("*.pt") if "features" not in p.parts)
    original = entry.read_bytes()
    entry.write_bytes(original[: len(original) // 2])  # truncated
    try:
        assert main(["evaluate", str(setup["config"]), "--run", setup["run_id"]]) == 1
    finally:
        entry.write_bytes(original)
    assert f"{entry}: not a readable prepared-tensor cache entry" in capsys.readouterr().err


def test_evaluate_names_a_checkpoint_removed_from_the_store(setup, capsys):
    folder = _checkpoint_file(setup, "model.json").parent
    moved = folder.with_name("checkpoint-moved")
    folder.rename(moved)
    try:
        assert main(["evaluate", str(setup["config"]), "--run", setup["run_id"]]) == 1
    finally:
        moved.rename(folder)
    assert f"cannot download artifact checkpoint of run {setup['run_id']}" in capsys.readouterr().err
