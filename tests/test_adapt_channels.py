"""Tests for pipeline.adapt.channels: folding pretrained RGB first convolutions to k channels."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Conv2dSame
from torch import nn

from pipeline.adapt import adapt_first_conv, build_model, fold_rgb_weight
from pipeline.errors import ConfigError


def _rgb_conv(cls: type[nn.Conv2d] = nn.Conv2d, **kw) -> nn.Conv2d:
    torch.manual_seed(0)
    return cls(3, 8, kernel_size=3, stride=2, **kw)


def test_one_channel_fold_equals_rgb_on_replicated_gray() -> None:
    conv = _rgb_conv(padding=1)
    gray = torch.rand(2, 1, 17, 19)
    new, method = adapt_first_conv(conv, 1)
    assert method == "sum-fold RGB->1"
    torch.testing.assert_close(new(gray), conv(gray.repeat(1, 3, 1, 1)), rtol=1e-5, atol=1e-6)


def test_one_channel_fold_whole_pretrained_network_equals_rgb() -> None:
    m1, s1 = build_model("tf_efficientnet_lite0", in_channels=1)
    m3, s3 = build_model("tf_efficientnet_lite0", in_channels=3)
    assert (s1.channel_method, s3.channel_method) == ("sum-fold RGB->1", "none")
    gray = torch.rand(1, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        f1 = m1.eval().features(gray)
        f3 = m3.eval().features(gray.repeat(1, 3, 1, 1))
    torch.testing.assert_close(f1, f3, rtol=1e-4, atol=1e-4)
    assert f1.abs().sum() > 0


@pytest.mark.parametrize("k", [2, 4, 5, 7])
def test_k_channels_repeat_rgb_cyclically_and_rescale(k: int) -> None:
    w = torch.randn(4, 3, 3, 3)
    new, method = fold_rgb_weight(w, k)
    assert method == f"repeat-rescale RGB->{k}"
    assert new.shape == (4, k, 3, 3)
    for j in range(k):
        torch.testing.assert_close(new[:, j], w[:, j % 3] * 3 / k)


def test_six_channels_keep_activation_of_constant_input() -> None:
    conv = _rgb_conv(padding=1, bias=False)
    new, _ = adapt_first_conv(conv, 6)
    x = torch.full((1, 6, 9, 9), 0.7)
    torch.testing.assert_close(new(x), conv(x[:, :3]), rtol=1e-5, atol=1e-6)


def test_three_channels_is_an_unchanged_copy() -> None:
    conv = _rgb_conv()
    new, method = adapt_first_conv(conv, 3)
    assert method == "none"
    assert new is not conv
    assert torch.equal(new.weight, conv.weight)
    assert new.weight.data_ptr() != conv.weight.data_ptr()


def test_adaptation_keeps_layer_class_and_geometry_and_leaves_input_alone() -> None:
    conv = _rgb_conv(Conv2dSame, bias=True)
    before = conv.weight.detach().clone()
    new, _ = adapt_first_conv(conv, 1)
    assert type(new) is Conv2dSame
    assert (new.in_channels, new.stride, new.kernel_size) == (1, (2, 2), (3, 3))
    assert torch.equal(new.bias, conv.bias)
    assert torch.equal(conv.weight, before)
    assert conv.in_channels == 3
    x = torch.rand(1, 1, 15, 16)
    torch.testing.assert_close(new(x), conv(x.repeat(1, 3, 1, 1)), rtol=1e-5, atol=1e-6)


def test_from_scratch_gives_fresh_kernel_of_new_shape() -> None:
    conv = _rgb_conv()
    new, method = adapt_first_conv(conv, 2, pretrained=False)
    assert method == "random-init 2 channels (no pretrained weights)"
    assert new.weight.shape == (8, 2, 3, 3)
    assert new.in_channels == 2
    assert not torch.allclose(new.weight, conv.weight[:, :2])


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_channel_count_is_a_config_error(bad) -> None:
    with pytest.raises(ConfigError, match="in_channels: must be a whole number >= 1"):
        adapt_first_conv(_rgb_conv(), bad)


def test_grouped_first_conv_and_non_rgb_kernel_are_rejected() -> None:
    with pytest.raises(ConfigError, match="groups=3"):
        adapt_first_conv(nn.Conv2d(3, 6, 3, groups=3), 1)
    with pytest.raises(ConfigError, match=r"expected an RGB kernel \(out, 3, \.\.\.\), got shape \(8, 4, 3, 3\)"):
        fold_rgb_weight(torch.zeros(8, 4, 3, 3), 1)
