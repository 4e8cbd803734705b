"""Prepare stage: MONAI transform chains per preset and dims, and a cache of prepared tensors.

Every image unit on disk is a RAS NIfTI written by ingest (axes X, Y, Z). A prepared tensor is
float32 shaped (C, H, W) for ``2d`` and ``2.5d`` and (C, D, H, W) for ``3d``, with D running
inferior→superior, H anterior→posterior... in array terms: the RAS volume (X, Y, Z) is
transposed to (Z, Y, X), so H follows Y and W follows X. Intensities end in [0, 1] after the
preset's window and are then normalised with the backbone's own pretraining mean/std.

Presets (each a documented MONAI chain):

* ``xray``: percentile clip 0.5–99.5 % → [0, 1]. MONOCHROME1 was inverted at ingest.
* ``ct-lung``: HU window −1000..400 → [0, 1] (clipped).
* ``ct-soft-tissue``: HU window −160..240 (W 400, L 40) → [0, 1].
* ``ct-bone``: HU window −450..1050 (W 1500, L 300) → [0, 1].
* ``mr``: percentile clip 0.5–99.5 % on the volume, z-score on the foreground (non-zero voxels),
  then −3..3 σ → [0, 1].

``2.5d`` turns a volume into ``slices`` channels: the volume is resized to (slices·m, H, W) and
each of the ``slices`` contiguous slabs of m slices is reduced to one channel (maximum-intensity
projection for CT presets, mean otherwise). A 2D image given to a 2.5D model is replicated.

``2d`` takes single-slice images. A volume given to a 2D model is an error unless ``reduce``
collapses its slices first (after the intensity window): ``mip`` (maximum-intensity projection
along z, e.g. nodules in ``ct-lung``), ``mean`` (average projection) or ``center`` (the middle slice).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    NormalizeIntensity,
    Orientation,
    RandAffine,
    RandFlip,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Spacing,
)
from torch.utils.data import Dataset

from pipeline.errors import ConfigError, DataError, did_you_mean
from pipeline.io import atomic_path, load_tensors
from pipeline.records import PrepareSpec

# HU windows (a_min, a_max) = (level - width/2, level + width/2).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "ct-lung": (-1000.0, 400.0),
    "ct-soft-tissue": (-160.0, 240.0),
    "ct-bone": (-450.0, 1050.0),
}
PRESETS = ("xray", "mr", *CT_WINDOWS)
# Modalities each preset is meant for; a mismatch is a warning, not an error.
PRESET_MODALITIES = {"xray": {"DX", "CR", "RG", "MG", "XA"}, "mr": {"MR"}}
REDUCTIONS = ("none", "mip", "mean", "center")  # 2d on volumes: how slices become one image
DIMS = ("2d", "2.5d", "3d")
# A backbone's resize interpolation (registry / timm / torchvision name) → MONAI Resize mode (2d images).
INTERPOLATIONS: dict[str, str] = {"bilinear": "bilinear", "bicubic": "bicubic"}


def make_spec(
    dims: str,
    preset: str,
    size: list[int],
    preprocessing: dict[str, Any],
    *,
    spacing: list[float] | None = None,
    slices: int = 3,
    reduce: str = "none",
) -> PrepareSpec:
    """Build a PrepareSpec; normalisation statistics come from the backbone's metadata.

    A 1-channel input is folded into the first conv by summing its RGB kernels, so the gray
    image is normalised with the mean of the per-channel statistics. `reduce` (one of
    `REDUCTIONS`) lets a ``2d`` spec take volumes; other dims need ``"none"``.

    Args:
        dims: ``"2d"``, ``"2.5d"`` or ``"3d"``.
        preset: one of `PRESETS`.
        size: (H, W) or (D, H, W) voxels after resizing.
        preprocessing: the backbone's ``mean``, ``std`` and ``interpolation`` (a key of
            `INTERPOLATIONS`; ``"bicubic"`` when absent).
        spacing: resample to this spacing (mm) first, or None.
        slices: 2.5d channels.
        reduce: how a ``2d`` spec collapses a volume.

    Raises:
        ConfigError: an unknown preset, dims, reduce or interpolation.
    """
    if preset not in PRESETS:
        raise ConfigError(
            f"prepare.preset: unknown preset '{preset}'{did_you_mean(preset, PRESETS)}; choose one of {list(PRESETS)}"
        )
    if dims not in DIMS:
        raise ConfigError(f"prepare.dims: '{dims}' is not one of 2d, 2.5d, 3d{did_you_mean(dims, DIMS)}")
    if reduce not in REDUCTIONS or (reduce != "none" and dims != "2d"):
        raise ConfigError(
            f"prepare.reduce: '{reduce}' with dims {dims}{did_you_mean(reduce, REDUCTIONS)}; "
            f"reduce is one of {list(REDUCTIONS)} and only 2d takes a value other than 'none'"
        )
    interpolation = str(preprocessing.get("interpolation", "bicubic"))
    _resize_mode(interpolation)  # an interpolation prepare cannot do fails here, not silently as bilinear
    mean = float(np.mean(preprocessing.get("mean", (0.5,))))
    std = float(np.mean(preprocessing.get("std", (0.5,))))
    return PrepareSpec(
        dims=dims,
        preset=preset,
        size=tuple(int(s) for s in size),
        spacing=tuple(float(s) for s in spacing) if spacing else None,
        slices=int(slices),
        mean=(mean,),
        std=(std,),
        interpolation=interpolation,
        reduce=reduce,
    )


def spec_from_dict(d: dict[str, Any]) -> PrepareSpec:
    """Inverse of PrepareSpec.as_dict (lists back to tuples), validated.

    The dict comes from a model's prepare metadata (a training checkpoint or a packaged model),
    which is untrusted input: every problem is reported, none is repaired or defaulted away.
    Keys absent from older specs (``reduce``) take their defaults, so those specs load with
    their original hash.

    Args:
        d: ``PrepareSpec.as_dict()`` as stored with a model.

    Returns:
        The PrepareSpec.

    Raises:
        DataError: unknown or missing keys, or values prepare cannot use; one error lists them all.
    """
    if not isinstance(d, dict):
        raise DataError(
            f"the model's prepare metadata is not a mapping (got {type(d).__name__}); "
            "re-evaluate the training run to re-package the model (medxfer evaluate CONFIG --run RUN_ID)"
        )
    problems = _spec_problems(d)
    if problems:
        raise DataError(
            "the model's prepare metadata is invalid:\n  - "
            + "\n  - ".join(problems)
            + "\nit was not written by this medxfer's train/evaluate or was altered; re-evaluate the training "
            "run to re-package the model (medxfer evaluate CONFIG --run RUN_ID), or retrain it"
        )
    d = dict(d)
    for key in ("size", "spacing", "mean", "std"):
        if d.get(key) is not None:
            d[key] = tuple(d[key])
    return PrepareSpec(**d)


_SPEC_KEYS = tuple(f.name for f in fields(PrepareSpec))
_SPEC_REQUIRED = ("dims", "preset", "size")


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) and np.isfinite(v)


def _spec_problems(d: dict[str, Any]) -> list[str]:
    """Every reason `d` is not a PrepareSpec prepare can reproduce (empty when it is)."""
    problems = [f"unknown key '{k}'{did_you_mean(k, _SPEC_KEYS)}" for k in d if k not in _SPEC_KEYS]
    problems += [f"missing required key '{k}'" for k in _SPEC_REQUIRED if k not in d]
    dims, preset = d.get("dims"), d.get("preset")
    if "dims" in d and dims not in DIMS:
        problems.append(f"dims: '{dims}' is not one of {list(DIMS)}{did_you_mean(str(dims), DIMS)}")
    if "preset" in d and preset not in PRESETS:
        problems.append(f"preset: unknown '{preset}'{did_you_mean(str(preset), PRESETS)}; one of {list(PRESETS)}")
    reduce = d.get("reduce", "none")
    if reduce not in REDUCTIONS:
        problems.append(f"reduce: '{reduce}' is not one of {list(REDUCTIONS)}{did_you_mean(str(reduce), REDUCTIONS)}")
    elif reduce != "none" and dims in DIMS and dims != "2d":
        problems.append(f"reduce: '{reduce}' needs dims 2d, got {dims}")
    interpolation = d.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        problems.append(
            f"interpolation: '{interpolation}' is not one of {list(INTERPOLATIONS)}"
            f"{did_you_mean(str(interpolation), INTERPOLATIONS)}"
        )
    if "size" in d:
        size = d["size"]
        want = {"2d": 2, "2.5d": 2, "3d": 3}.get(str(dims))
        if not isinstance(size, list | tuple) or not all(_is_int(s) for s in size):
            problems.append(f"size: must be a list of integers, got {size!r}")
        else:
            if want is not None and len(size) != want:
                problems.append(f"size: dims {dims} needs {want} values, got {list(size)}")
            if any(s < 1 for s in size):
                problems.append(f"size: every value must be ≥ 1, got {list(size)}")
    slices = d.get("slices", 3)
    if not _is_int(slices) or slices < 1:
        problems.append(f"slices: must be an integer ≥ 1, got {slices!r}")
    spacing = d.get("spacing")
    if spacing is not None and (
        not isinstance(spacing, list | tuple) or not spacing or not all(_is_number(s) and s > 0 for s in spacing)
    ):
        problems.append(f"spacing: must be null or a list of positive numbers (mm), got {spacing!r}")
    for key in ("mean", "std"):
        v = d.get(key, (0.5,))
        if not isinstance(v, list | tuple) or not v or not all(_is_number(x) for x in v):
            problems.append(f"{key}: must be a non-empty list of numbers, got {v!r}")
        elif key == "std" and any(x <= 0 for x in v):
            problems.append(f"std: every value must be > 0, got {list(v)}")
    if d.get("version", 1) != 1:
        problems.append(f"version: this medxfer reads prepare spec version 1, got {d.get('version')!r}")
    if not isinstance(d.get("extra", {}), dict):
        problems.append(f"extra: must be a mapping, got {d.get('extra')!r}")
    return problems


def _intensity(preset: str) -> list:
    """The preset's intensity steps (see the module docstring); ConfigError for an unknown preset."""
    if preset in CT_WINDOWS:
        a_min, a_max = CT_WINDOWS[preset]
        return [ScaleIntensityRange(a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)]
    if preset == "mr":
        return [
            ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=None, b_max=None, clip=True),
            NormalizeIntensity(nonzero=True),
            ScaleIntensityRange(a_min=-3.0, a_max=3.0, b_min=0.0, b_max=1.0, clip=True),
        ]
    if preset == "xray":
        return [ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)]
    raise ConfigError(
        f"prepare.preset: unknown preset '{preset}'{did_you_mean(str(preset), PRESETS)}; "
        f"choose one of {list(PRESETS)} (no preset is assumed)"
    )


def _resize_mode(interpolation: str) -> str:
    """MONAI Resize mode of a backbone interpolation name; ConfigError for one prepare cannot do."""
    mode = INTERPOLATIONS.get(interpolation)
    if mode is None:
        raise ConfigError(
            f"prepare interpolation: unknown '{interpolation}'{did_you_mean(str(interpolation), INTERPOLATIONS)}; "
            f"prepare resizes with one of {list(INTERPOLATIONS)}"
        )
    return mode


def build_transform(spec: PrepareSpec) -> Compose:
    """Deterministic chain: NIfTI path → normalised tensor of the spec's shape."""
    steps: list = [
        _LoadNifti(),
        EnsureChannelFirst(channel_dim="no_channel"),
        Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if spec.spacing:
        steps.append(Spacing(pixdim=spec.spacing, mode="bilinear"))
    steps += _intensity(spec.preset)
    steps.append(_ToNetworkLayout(spec))
    steps.append(NormalizeIntensity(subtrahend=np.asarray(spec.mean[0]), divisor=np.asarray(spec.std[0])))
    return Compose(steps)


class _LoadNifti:
    """MONAI's NibabelReader alone (LoadImage would probe every reader, GPU codecs included)."""

    def __init__(self) -> None:
        self.reader = NibabelReader()

    def __call__(self, path: str) -> MetaTensor:
        data, meta = self.reader.get_data(self.reader.read(path))
        return MetaTensor(np.ascontiguousarray(data, dtype=np.float32), meta=meta)


class _ToNetworkLayout:
    """(C, X, Y, Z) RAS → (C, H, W) or (C, D, H, W) resized to the spec (see module docstring)."""

    def __init__(self, spec: PrepareSpec):
        self.spec = spec
        self.mode = _resize_mode(spec.interpolation)  # 2d images; fails at build time when unknown

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(img), dtype=torch.float32).permute(0, 3, 2, 1)  # C, Z, Y, X
        spec = self.spec
        if spec.dims == "2d":
            return _plain(Resize(spec.size, mode=self.mode)(self._one_slice(x))).clamp(0.0, 1.0)
        if spec.dims == "3d":
            return _plain(Resize(spec.size, mode="trilinear")(x))
        return self._slab_channels(x)

    def _one_slice(self, x: torch.Tensor) -> torch.Tensor:
        """(C, Z, H, W) → (C, H, W): the only slice, or the volume reduced along z by `spec.reduce`."""
        reduce = self.spec.reduce
        if x.shape[1] == 1:
            return x[:, 0]
        if reduce == "mip":
            return x.amax(dim=1)
        if reduce == "mean":
            return x.mean(dim=1)
        if reduce == "center":
            return x[:, x.shape[1] // 2]
        raise DataError(
            f"a 2D model needs single-slice images, got a volume of {x.shape[1]} slices; "
            "use prepare.dims: 3d or 2.5d for volumes, or prepare.reduce: mip|mean|center"
        )

    def _slab_channels(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        h, w = spec.size[-2:]
        if x.shape[1] == 1:  # a single image: replicate it into every channel
            return _plain(Resize((h, w), mode="bilinear")(x[:, 0])).repeat(spec.slices, 1, 1)
        per_slab = max(1, x.shape[1] // spec.slices)
        vol = _plain(Resize((spec.slices * per_slab, h, w), mode="trilinear")(x))[0]
        slabs = vol.reshape(spec.slices, per_slab, h, w)
        return slabs.amax(dim=1) if spec.preset in CT_WINDOWS else slabs.mean(dim=1)


def _plain(t: Any) -> torch.Tensor:
    """A plain float32 tensor (MONAI returns MetaTensors that carry metadata we do not need)."""
    t = t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)
    return t.to(torch.float32)


def build_augment(dims: str, *, flip: bool, rotate_deg: float, scale: float, intensity: float, seed: int) -> Compose:
    """Training-time augmentation on prepared tensors (never used in evaluation); seeded."""
    ndim = 3 if dims == "3d" else 2
    rot = float(np.deg2rad(rotate_deg))
    steps: list = [
        RandAffine(
            prob=0.8,
            rotate_range=(rot,) * (1 if ndim == 2 else 3),
            scale_range=(scale,) * ndim,
            translate_range=(4,) * ndim,
            padding_mode="border",
        )
    ]
    if flip:
        steps.append(RandFlip(prob=0.5, spatial_axis=ndim - 1))
    if intensity > 0:
        steps += [RandScaleIntensity(factors=intensity, prob=0.5), RandShiftIntensity(offsets=intensity, prob=0.5)]
    chain = Compose(steps)
    chain.set_random_state(seed=seed)
    return chain


def cache_path(cache_dir: str | Path, spec: PrepareSpec, content_sha256: str) -> Path:
    """Cache key = (image content sha256, prepare-spec hash)."""
    return Path(cache_dir) / spec.hash() / f"{content_sha256}.pt"


def prepare_image(path: str | Path, spec: PrepareSpec, transform: Compose | None = None) -> torch.Tensor:
    """Prepare one image unit; errors name the file (a bad spec fails as itself, before the file)."""
    transform = transform or build_transform(spec)
    try:
        out = transform(str(path))
    except Exception as exc:  # MONAI's Compose wraps every error in a RuntimeError
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if cause is not None:
            raise DataError(f"{path}: {cause}") from exc
        root = exc.__cause__ or exc
        raise DataError(
            f"{path}: could not be prepared ({type(root).__name__}: {root}); re-run ingest to rewrite the image"
        ) from exc
    return _plain(out).contiguous()


def _atomic_save(tensor: torch.Tensor, path: Path) -> None:
    with atomic_path(path, durable=False) as tmp:  # a cache: recomputed when lost
        torch.save(tensor, tmp)


def load_or_prepare(
    path: str | Path, sha: str, spec: PrepareSpec, cache_dir: str | Path | None, transform: Compose | None = None
) -> tuple[torch.Tensor, bool]:
    """Return (tensor, was_cached). Writes the cache entry atomically on a miss."""
    if cache_dir:
        cached = cache_path(cache_dir, spec, sha)
        if cached.exists():
            tensor = load_tensors(cached, "prepared-tensor cache entry", f"delete {cached} (a cache: it is recomputed)")
            if not isinstance(tensor, torch.Tensor):
                raise DataError(f"{cached}: holds a {type(tensor).__name__}, not a prepared tensor. Fix: delete it")
            return tensor, True
    tensor = prepare_image(path, spec, transform)
    if cache_dir:
        _atomic_save(tensor, cache_path(cache_dir, spec, sha))
    return tensor, False


class PreparedDataset(Dataset):
    """Prepared tensors for manifest rows (cached), optionally augmented; yields (x, y, index)."""

    def __init__(
        self,
        paths: list[str],
        shas: list[str],
        labels: list[int],
        spec: PrepareSpec,
        cache_dir: str | Path | None = None,
        augment: Compose | None = None,
    ):
        self.paths, self.shas, self.labels = list(paths), list(shas), list(labels)
        self.spec, self.cache_dir, self.augment = spec, cache_dir, augment
        self._transform: Compose | None = None
        self.hits = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        if self._transform is None:
            self._transform = build_transform(self.spec)
        x, hit = load_or_prepare(self.paths[i], self.shas[i], self.spec, self.cache_dir, self._transform)
        self.hits += int(hit)
        if self.augment is not None:
            x = _plain(self.augment(x))
        return x, int(self.labels[i]), i
