"""The 3D layers an inflated network is made of: depth-aware convolution, BatchNorm, squeeze-excite, pools."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    pad = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return pad // 2, pad - pad // 2


class InflatedConv3d(nn.Conv3d):
    """Conv3d inflated from a Conv2d: zero padding in-plane, as the 2D conv had, and replicate or
    zero padding along depth; TF-'same' padding (timm's Conv2dSame, torch's "same") when `same`.

    Replicate (edge) padding along depth means a volume that is constant along depth gives the
    2D response on every output slice, border slices included, at any depth and depth stride.
    With zero padding a thin volume's border slices see a fraction of the kernel, and through
    the ImageNet BatchNorm statistics of a deep network that error compounds until the features
    of a 16-32-slice volume barely vary (the eval-mode collapse this padding avoids).
    """

    def __init__(
        self,
        *args,
        pad: tuple[int, int, int] = (0, 0, 0),
        same: bool = False,
        depth_padding: str = "replicate",
        spatial_mode: str = "constant",
        **kwargs,
    ):
        super().__init__(*args, padding=0, **kwargs)  # type: ignore[misc]
        self.pad, self.same, self.depth_padding, self.spatial_mode = tuple(pad), same, depth_padding, spatial_mode

    def extra_repr(self) -> str:
        pad = "same" if self.same else self.pad
        return f"{super().extra_repr()}, pad={pad}, depth_padding={self.depth_padding}"

    def _pads(self, x: torch.Tensor) -> list[tuple[int, int]]:
        if self.same:
            return [
                _same_pad(int(n), k, s, d)
                for n, k, s, d in zip(x.shape[-3:], self.kernel_size, self.stride, self.dilation, strict=True)
            ]
        return [(p, p) for p in self.pad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (d0, d1), (h0, h1), (w0, w1) = self._pads(x)
        if d0 or d1:
            mode = "replicate" if self.depth_padding == "replicate" else "constant"
            x = F.pad(x, (0, 0, 0, 0, d0, d1), mode=mode)
        inplane = (0, 0)
        if h0 == h1 and w0 == w1 and self.spatial_mode == "constant":
            inplane = (h0, w0)  # symmetric zero padding: let the convolution do it
        elif h0 or h1 or w0 or w1:
            x = F.pad(x, (w0, w1, h0, h1), mode=self.spatial_mode)
        return F.conv3d(x, self.weight, self.bias, self.stride, (0, *inplane), self.dilation, self.groups)


class BatchNormAct3d(nn.BatchNorm3d):
    """BatchNorm3d followed by timm's `drop` and `act` (same state-dict keys as BatchNormAct2d)."""

    def __init__(
        self,
        num_features: int,
        eps: float,
        momentum: float | None,
        affine: bool,
        track_running_stats: bool,
        drop: nn.Module,
        act: nn.Module,
    ):
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats
        )
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class SqueezeExcite3d(nn.Module):
    """Squeeze-and-excitation over all spatial axes; keeps the 2D block's submodule names."""

    def __init__(self, path: dict[str, nn.Module], gate: nn.Module, add_maxpool: bool = False):
        super().__init__()
        for name, module in path.items():
            self.add_module(name, module)
        self.gate = gate
        self.path = tuple(path)
        self.add_maxpool = add_maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, x.ndim))
        s = x.mean(dims, keepdim=True)
        if self.add_maxpool:
            s = 0.5 * s + 0.5 * x.amax(dims, keepdim=True)
        for name in self.path:
            s = self._modules[name](s)  # type: ignore[misc]
        return x * self.gate(s)


class GlobalPool(nn.Module):
    """Global pooling over all spatial axes, 2D or 3D (timm pool types avg, max, avgmax, catavgmax)."""

    def __init__(self, pool_type: str = "avg", flatten: bool = True):
        super().__init__()
        kind = (pool_type or "").lower().removeprefix("fast") or ("avg" if pool_type else "")
        if kind not in ("", "avg", "max", "avgmax", "catavgmax"):
            raise ConfigError(
                f"inflate: global pool type '{pool_type}' is not supported; use avg, max, avgmax or catavgmax"
            )
        self.pool_type = kind
        self.flatten = flatten

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}, flatten={self.flatten}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_type:
            dims = tuple(range(2, x.ndim))
            avg, mx = x.mean(dims, keepdim=True), x.amax(dims, keepdim=True)
            x = {"avg": avg, "max": mx, "avgmax": 0.5 * (avg + mx)}.get(self.pool_type)  # type: ignore[assignment]
            if x is None:
                x = torch.cat([avg, mx], dim=1)
        return x.flatten(1) if self.flatten else x


def _pad_depth(x: torch.Tensor, kernel: int, padding: int, dilation: int = 1) -> torch.Tensor:
    """Edge-pad the depth axis when a volume is thinner than the pooling window."""
    need = dilation * (kernel - 1) + 1 - (x.shape[2] + 2 * padding)
    if need <= 0:
        return x
    return torch.cat([x, x[:, :, -1:].expand(-1, -1, need, -1, -1)], dim=2)


class MaxPool3dDepthSafe(nn.MaxPool3d):
    """MaxPool3d that edge-pads depth when the volume is thinner than the window (few slices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, p, d = (self.kernel_size, self.padding, self.dilation)
        x = _pad_depth(x, k[0], p[0], d[0])  # type: ignore[index]
        return super().forward(x)


class AvgPool3dDepthSafe(nn.AvgPool3d):
    """AvgPool3d that edge-pads depth when the volume is thinner than the window (few slices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_depth(x, self.kernel_size[0], self.padding[0])  # type: ignore[index]
        return super().forward(x)
