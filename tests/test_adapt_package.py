"""Model packages (`pipeline.adapt.package`): a round trip rebuilds the same network; every damaged file is named."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from pipeline.adapt import CalibratedNet, build_model, read_package, write_package
from pipeline.errors import ConfigError, DataError

CALIBRATIONS = [
    {"method": "none"},
    {"method": "temperature", "temperature": 1.7},
    {"method": "vector", "scale": [0.5, 2.0], "bias": [0.1, -0.3]},
    {"method": "isotonic", "x": [[0.0, 0.4, 0.6, 1.0]], "y": [[0.0, 0.1, 0.9, 1.0]]},
]


@pytest.mark.parametrize(
    ("arch", "shape"),
    [
        ({"backbone": "resnet18", "dims": "2d", "pool": "catavgmax"}, (2, 1, 32, 32)),
        (
            {"backbone": "tf_efficientnet_lite0", "dims": "3d", "inflation": "i3d-center", "keep_depth": 1},
            (2, 1, 8, 32, 32),
        ),
        ({"backbone": "resnet18", "dims": "3d", "slicewise": True, "in_channels": 1}, (2, 1, 3, 32, 32)),
        ({"backbone": "resnet18", "dims": "2d", "in_channels": 3, "num_classes": 3}, (2, 3, 32, 32)),
    ],
)
def test_round_trip_rebuilds_the_same_network(tmp_path, arch, shape):
    torch.manual_seed(0)
    net, _ = build_model(weights="none", **arch)
    net.eval()
    sha = write_package(tmp_path, net, {"classes": ["a", "b"]})
    assert sha == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in tmp_path.iterdir()}
    loaded, description = read_package(tmp_path, sha)
    assert description["architecture"]["backbone"] == arch["backbone"] and description["calibration"] is None
    assert description["metadata"] == {"classes": ["a", "b"]}
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


@pytest.mark.parametrize("calibration", CALIBRATIONS, ids=lambda c: c["method"])
def test_the_fitted_calibration_travels_as_data(tmp_path, calibration):
    torch.manual_seed(0)
    net, _ = build_model("resnet18", "none", num_classes=2)
    model = CalibratedNet(net, calibration).eval()
    write_package(tmp_path, model, {})
    loaded, description = read_package(tmp_path)
    assert isinstance(loaded, CalibratedNet) and loaded.calibration == calibration
    assert description["calibration"] == calibration
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-7)


@pytest.fixture
def package(tmp_path) -> tuple[Path, dict[str, str]]:
    torch.manual_seed(0)
    net, _ = build_model("resnet18", "none", num_classes=2)
    return tmp_path, write_package(tmp_path, CalibratedNet(net, 2.0), {"classes": ["0", "1"]})


def test_changed_weights_are_caught_without_a_record(package):
    folder, _ = package
    state = load((folder / "weights.safetensors").read_bytes())
    state["head.bias"] += 1
    (folder / "weights.safetensors").write_bytes(save(state))
    with pytest.raises(DataError, match=r"weights.safetensors: sha256 .* recorded in .*model.json.*nothing in it"):
        read_package(folder)


def test_a_consistent_swap_is_caught_by_the_record(package):
    folder, record = package
    state = {k: torch.zeros_like(v) for k, v in load((folder / "weights.safetensors").read_bytes()).items()}
    weights = save(state)
    doc = json.loads((folder / "model.json").read_text())
    doc["files"]["weights.safetensors"] = hashlib.sha256(weights).hexdigest()
    (folder / "weights.safetensors").write_bytes(weights)
    (folder / "model.json").write_text(json.dumps(doc))
    read_package(folder)  # consistent in itself ...
    with pytest.raises(DataError, match=r"model.json in the package of X: sha256 .* recorded in tag T of run R"):
        read_package(folder, record, "tag T of run R", "the package of X")  # ... but not what training wrote


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(format="other/9"), "expected a 'medxfer-model/1' model description, got 'other/9'"),
        (
            lambda d: d["architecture"].update(backbone="resnet19"),
            "cannot rebuild the network.*did you mean 'resnet18'",
        ),
        (lambda d: d["architecture"].update(num_classes=3), "not the weights of the network"),
        (lambda d: d["architecture"].update(shell="rm -rf /"), r"unknown architecture keys \['shell'\]"),
        (lambda d: d.update(calibration={"method": "magic"}), "calibration method 'magic' is unknown"),
        (lambda d: d["files"].update(extra="0" * 64), "'files' must list weights.safetensors"),
    ],
)
def test_a_damaged_description_is_named(package, edit, match):
    folder, _ = package
    doc = json.loads((folder / "model.json").read_text())
    edit(doc)
    (folder / "model.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=match):
        read_package(folder)


def test_missing_and_unreadable_files_are_named(package):
    folder, _ = package
    (folder / "model.json").write_text("{not json")
    with pytest.raises(DataError, match=r"model.json: not a JSON model description"):
        read_package(folder)
    (folder / "model.json").unlink()
    with pytest.raises(DataError, match=r"model.json: missing from the model package"):
        read_package(folder)


def test_only_networks_built_by_build_model_are_packaged(tmp_path):
    with pytest.raises(ConfigError, match="cannot package a Linear"):
        write_package(tmp_path, CalibratedNet(torch.nn.Linear(2, 2)), {})
    assert not list(tmp_path.iterdir())
