"""Tests for pipeline.adapt.inflate: 2D → 3D conversion with I3D weight inflation, known answers."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers import BatchNormAct2d, Conv2dSame, SelectAdaptivePool2d, SEModule
from timm.layers.pool2d_same import MaxPool2dSame
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn

from pipeline.adapt import build_model, inflate_conv_weight, inflate_to_3d
from pipeline.adapt.layers3d import (
    AvgPool3dDepthSafe,
    BatchNormAct3d,
    GlobalPool,
    InflatedConv3d,
    SqueezeExcite3d,
)
from pipeline.errors import ConfigError

DEPTH = 9


def _volume(x2d: torch.Tensor, depth: int = DEPTH) -> torch.Tensor:
    """A depth-constant volume (B, C, D, H, W) whose every slice is `x2d`."""
    return x2d.unsqueeze(2).repeat(1, 1, depth, 1, 1)


def _left_pad(conv: nn.Conv2d, size: int) -> int:
    """Padding before the first row, computed independently of the code under test."""
    k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    if type(conv) is Conv2dSame:
        return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0) // 2
    if conv.padding == "same":
        return d * (k - 1) // 2
    return conv.padding[0]


def _out_len(conv: nn.Conv2d, size: int) -> int:
    """Output length along an axis of `size`, as the 2D conv computes it along its height."""
    k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    if type(conv) is Conv2dSame or conv.padding == "same":
        return math.ceil(size / s)
    return (size + 2 * conv.padding[0] - d * (k - 1) - 1) // s + 1


CONVS = {
    "plain": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "strided-7x7": lambda: nn.Conv2d(4, 6, 7, stride=2, padding=3, bias=False),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),
    "grouped": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "dilated": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2),
    "pointwise": lambda: nn.Conv2d(4, 6, 1),
    "rectangular": lambda: nn.Conv2d(4, 6, (3, 5), padding=(1, 2)),
    "torch-same": lambda: nn.Conv2d(4, 6, 5, padding="same"),
    "timm-Conv2dSame": lambda: Conv2dSame(4, 6, 3, stride=2),
    "timm-Conv2dSame-depthwise-5x5": lambda: Conv2dSame(4, 4, 5, stride=2, groups=4),
}


@pytest.mark.parametrize("kind", list(CONVS))
def test_i3d_mean_conv_with_zero_depth_padding_equals_2d_on_interior_slices(kind: str) -> None:
    torch.manual_seed(0)
    conv = CONVS[kind]()
    conv3 = inflate_to_3d(conv, "i3d-mean", depth_padding="zeros")
    assert isinstance(conv3, InflatedConv3d)
    x = torch.randn(2, 4, 13, 12)
    with torch.no_grad():
        ref, out = conv(x), conv3(_volume(x))
    k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    pad = _left_pad(conv, DEPTH)
    interior = [o for o in range(out.shape[2]) if o * s - pad >= 0 and o * s - pad + (k - 1) * d <= DEPTH - 1]
    assert interior, "the test volume must have interior slices"
    for o in interior:
        torch.testing.assert_close(out[:, :, o], ref, rtol=1e-5, atol=1e-5)
    if k > 1:  # the border slices see zero padding in depth: they differ
        assert not torch.allclose(out[:, :, 0], ref, atol=1e-4)


@pytest.mark.parametrize("depth", [1, 2, 5, DEPTH])
@pytest.mark.parametrize("kind", list(CONVS))
def test_i3d_mean_conv_with_replicate_depth_padding_equals_2d_on_every_slice(kind: str, depth: int) -> None:
    torch.manual_seed(4)
    conv = CONVS[kind]()
    conv3 = inflate_to_3d(conv, "i3d-mean")  # replicate is the default
    x = torch.randn(2, 4, 13, 12)
    with torch.no_grad():
        ref, out = conv(x), conv3(_volume(x, depth))
    assert out.shape[2] == _out_len(conv, depth)
    for o in range(out.shape[2]):  # border slices included, even when the volume is thinner than the kernel
        torch.testing.assert_close(out[:, :, o], ref, rtol=1e-5, atol=1e-5)


def test_replicate_depth_padding_does_not_leak_into_the_plane() -> None:
    """In-plane padding stays zero: the border pixels of each slice equal the 2D conv's."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    out = inflate_to_3d(conv)(torch.ones(1, 1, 3, 4, 4))
    # corner: 4 of the 9 in-plane taps are inside (zero padding in-plane); depth sums to 1 (i3d-mean)
    assert out[0, 0, 0, 0, 0].item() == pytest.approx(4.0)
    assert out[0, 0, 0, 1, 1].item() == pytest.approx(9.0)


def test_unknown_depth_padding_is_named() -> None:
    with pytest.raises(ConfigError, match="did you mean 'replicate'"):
        inflate_to_3d(nn.Conv2d(1, 1, 3), depth_padding="replicat")


@pytest.mark.parametrize("kind", list(CONVS))
def test_i3d_center_conv_equals_2d_on_every_slice(kind: str) -> None:
    torch.manual_seed(1)
    conv = CONVS[kind]()
    conv3 = inflate_to_3d(conv, "i3d-center")
    x = torch.randn(1, 4, 11, 14)
    with torch.no_grad():
        ref, out = conv(x), conv3(_volume(x))
    assert out.shape[2] == math.ceil(DEPTH / conv.stride[0]) or type(conv) is not Conv2dSame
    for o in range(out.shape[2]):
        torch.testing.assert_close(out[:, :, o], ref, rtol=1e-5, atol=1e-5)


def test_inflate_conv_weight_known_values() -> None:
    w = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).reshape(2, 1, 3, 2)
    mean = inflate_conv_weight(w, "i3d-mean")
    center = inflate_conv_weight(w, "i3d-center")
    assert mean.shape == center.shape == (2, 1, 3, 3, 2)
    torch.testing.assert_close(mean.sum(dim=2), w)
    torch.testing.assert_close(mean[:, :, 0], w / 3)
    assert torch.equal(center[:, :, 1], w)
    assert not center[:, :, [0, 2]].any()
    with pytest.raises(ConfigError, match="did you mean 'i3d-mean'"):
        inflate_conv_weight(w, "i3d-man")
    with pytest.raises(ConfigError, match=r"got shape \(2, 3\)"):
        inflate_conv_weight(torch.zeros(2, 3))


def _bn(cls) -> nn.Module:
    bn = cls(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn.eval()


LAYERS = {
    "BatchNorm2d": lambda: _bn(nn.BatchNorm2d),
    "timm-BatchNormAct2d": lambda: _bn(lambda c: BatchNormAct2d(c, act_layer=nn.ReLU6)),
    "MaxPool2d": lambda: nn.MaxPool2d(3, stride=2, padding=1),
    "AdaptiveAvgPool2d": lambda: nn.AdaptiveAvgPool2d((1, 1)),
    "SelectAdaptivePool2d-avg": lambda: SelectAdaptivePool2d(pool_type="avg", flatten=True),
    "SelectAdaptivePool2d-fastcatavgmax": lambda: SelectAdaptivePool2d(pool_type="fastcatavgmax", flatten=True),
    "timm-SqueezeExcite": lambda: SqueezeExcite(6, rd_ratio=0.5, act_layer=nn.SiLU),
    "timm-SEModule": lambda: SEModule(6, rd_channels=4),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_norm_pool_and_se_layers_equal_2d_on_depth_constant_input(kind: str) -> None:
    torch.manual_seed(2)
    layer = LAYERS[kind]().eval()
    layer3 = inflate_to_3d(layer, "i3d-mean")
    x = torch.randn(2, 6, 10, 7)
    with torch.no_grad():
        ref, out = layer(x), layer3(_volume(x))
    if ref.ndim == 2:  # global pooling with flatten: the whole volume pools to the slice's answer
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        return
    for o in range(out.shape[2]):
        torch.testing.assert_close(out[:, :, o].reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)


def test_layer_types_after_conversion() -> None:
    net = nn.Sequential(
        _bn(lambda c: BatchNormAct2d(c)),
        SqueezeExcite(6),
        nn.AvgPool2d(2),
        SelectAdaptivePool2d(pool_type="avg", flatten=True),
    )
    net3 = inflate_to_3d(net)
    assert [type(m) for m in net3] == [BatchNormAct3d, SqueezeExcite3d, AvgPool3dDepthSafe, GlobalPool]
    assert isinstance(net3[1].conv_reduce, nn.Conv3d)
    assert net3[0].act is not net[0].act
    assert isinstance(net3[0].act, nn.ReLU)


def test_pooling_a_volume_thinner_than_the_window() -> None:
    pool3 = inflate_to_3d(nn.AvgPool2d(2, stride=2))
    x = torch.randn(1, 3, 8, 6)
    out = pool3(_volume(x, depth=1))
    assert out.shape == (1, 3, 1, 4, 3)
    torch.testing.assert_close(out[:, :, 0], nn.AvgPool2d(2, stride=2)(x))


def _features2d(name: str) -> tuple[nn.Module, int]:
    model, _ = build_model(name, "imagenet" if name == "tf_efficientnet_lite0" else "none", in_channels=1)
    return model.features.eval(), model.num_features


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "efficientnet_b0", "resnet18", "densenet121"])
def test_whole_network_i3d_center_gives_2d_features_on_depth_constant_volume(name: str) -> None:
    torch.manual_seed(3)
    f2, num_features = _features2d(name)
    before = {k: v.clone() for k, v in f2.state_dict().items()}
    f3 = inflate_to_3d(f2, "i3d-center")
    assert f3.spatial_dims == 3
    assert f2.spatial_dims == 2
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        ref, out = f2(x), f3(_volume(x, depth=8))
    assert ref.shape == out.shape == (1, num_features)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)
    after = f2.state_dict()  # the 2D model is untouched
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, nn.Conv3d) for m in f2.modules())


@pytest.mark.parametrize("depth", [1, 3, 16, 32])
def test_whole_network_i3d_mean_gives_2d_features_on_depth_constant_volume(depth: int) -> None:
    """With replicate depth padding the inflated lite0 sees a depth-constant volume as its slice.

    With zero padding the same check fails badly at these depths (max error about 6 on features
    of size about 0.2): each strided stage shrinks depth and the border error compounds through
    the ImageNet BatchNorm statistics, so the features of a thin volume collapse to near-constant.
    """
    torch.manual_seed(5)
    f2, num_features = _features2d("tf_efficientnet_lite0")
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ref = f2(x)
        out = inflate_to_3d(f2, "i3d-mean")(_volume(x, depth))
        zeros = inflate_to_3d(f2, "i3d-mean", depth_padding="zeros")(_volume(x, depth))
    assert out.shape == (2, num_features)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)
    assert (zeros - ref).abs().max() > 1.0


def test_inflated_features_vary_across_thin_volumes() -> None:
    """Eval-mode features of different 16-slice volumes differ (they collapsed with zero padding)."""
    torch.manual_seed(6)
    f2, _ = _features2d("tf_efficientnet_lite0")
    x = torch.randn(6, 1, 16, 64, 64)
    with torch.no_grad():
        spread = inflate_to_3d(f2, "i3d-mean")(x).std(dim=0).mean().item()
        collapsed = inflate_to_3d(f2, "i3d-mean", depth_padding="zeros")(x).std(dim=0).mean().item()
    assert spread > 0.01
    assert collapsed < spread / 100


@pytest.mark.parametrize(
    ("name", "num_features"), [("tf_efficientnet_lite0", 1280), ("resnet18", 512), ("densenet121", 1024)]
)
@pytest.mark.parametrize("inflation", ["i3d-mean", "i3d-center"])
def test_converted_network_on_anisotropic_volume(name: str, num_features: int, inflation: str) -> None:
    weights = "imagenet" if name == "tf_efficientnet_lite0" else "none"
    model, summary = build_model(name, weights, dims="3d", inflation=inflation, num_classes=3)
    assert summary.inflation == inflation
    assert summary.dims == "3d"
    x = torch.randn(1, 1, 16, 64, 48)
    with torch.no_grad():
        feats = model.eval().features(x)
        logits = model(x)
    assert feats.shape == (1, num_features)
    assert logits.shape == (1, 3)
    assert torch.isfinite(logits).all()


def test_conversion_keeps_mode_and_frozen_parameters() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    net[0].weight.requires_grad_(False)
    net.eval()
    net3 = inflate_to_3d(net)
    assert not net3.training
    assert not net3[1].training
    assert not net3[0].weight.requires_grad
    assert net3[0].bias.requires_grad
    assert net[0].weight.shape == (4, 1, 3, 3)
    assert isinstance(net[0], nn.Conv2d)


def test_module_without_3d_counterpart_is_named() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), MaxPool2dSame(3, stride=2))
    with pytest.raises(ConfigError, match=r"no 3D counterpart.*1 \(MaxPool2dSame\)"):
        inflate_to_3d(net)


def test_inflate_does_not_share_tensors_with_the_2d_model() -> None:
    conv = nn.Conv2d(2, 2, 1)
    conv3 = inflate_to_3d(conv, "i3d-mean")
    with torch.no_grad():
        conv3.bias.add_(1.0)
    assert not torch.equal(conv3.bias, conv.bias)


@pytest.mark.parametrize(("name", "levels"), [("tf_efficientnet_lite0", 5), ("resnet18", 5), ("densenet121", 5)])
@pytest.mark.parametrize("keep", [0, 1, 3, 5])
def test_keep_depth_halves_depth_only_after_the_kept_levels(name: str, levels: int, keep: int) -> None:
    """Each kept level leaves depth alone, residual shortcuts included, and the input is untouched."""
    torch.manual_seed(7)
    f2, _ = _features2d(name)
    f3 = inflate_to_3d(f2, "i3d-mean", keep_depth=keep)
    body = nn.Sequential(*[m for m in f3 if not isinstance(m, GlobalPool | nn.Flatten | nn.AdaptiveAvgPool3d)])
    with torch.no_grad():
        fmap = body(torch.randn(1, 1, 32, 64, 64))
    assert fmap.shape[2:] == (32 // 2 ** (levels - keep), 2, 2)
    assert not any(isinstance(m, nn.Conv3d) for m in f2.modules())


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_keep_depth_still_gives_2d_features_on_depth_constant_volume(name: str) -> None:
    torch.manual_seed(8)
    f2, _ = _features2d(name)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ref = f2(x)
        out = inflate_to_3d(f2, "i3d-mean", keep_depth=3)(_volume(x, 12))
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)


def test_keep_depth_at_every_level_with_i3d_center_is_the_2d_network_on_each_slice() -> None:
    """No depth stride anywhere and kernels on the centre slice only: max pooling over the volume
    equals the max over slices of the 2D network's max-pooled features; i3d-mean mixes slices."""
    torch.manual_seed(9)
    f2, _ = _features2d("tf_efficientnet_lite0")
    f2.global_pool = GlobalPool("max")
    vol = torch.randn(2, 1, 5, 64, 64)
    with torch.no_grad():
        ref = torch.stack([f2(vol[:, :, d]) for d in range(5)]).amax(dim=0)
        center = inflate_to_3d(f2, "i3d-center", keep_depth=5)(vol)
        mean = inflate_to_3d(f2, "i3d-mean", keep_depth=5)(vol)
    torch.testing.assert_close(center, ref, rtol=1e-4, atol=1e-4)
    assert (mean - ref).abs().max() > 0.1


def test_keep_depth_keeps_mixed_train_and_eval_modes() -> None:
    """The probe pass that finds the levels must not leave a frozen (eval) BatchNorm in train mode or vice versa."""
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
    )
    net.train()
    net[1].eval()
    net3 = inflate_to_3d(net, keep_depth=1)
    assert [m.training for m in net3] == [True, False, True, True]
    assert net3[0].stride == (1, 2, 2)
    assert net3[2].stride == (2, 2, 2)
    torch.testing.assert_close(net3[3].running_mean, torch.zeros(4))  # the probe pass ran in eval mode


def test_keep_depth_must_be_a_whole_number() -> None:
    with pytest.raises(ConfigError, match="keep_depth"):
        inflate_to_3d(nn.Sequential(nn.Conv2d(1, 2, 3)), keep_depth=-1)
