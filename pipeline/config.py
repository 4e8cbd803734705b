"""Typed experiment config: defaults, validation on load (all problems at once), flat dict for MLflow."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError, did_you_mean
from pipeline.io import write_text
from pipeline.records import MAX_VOXELS


@dataclass
class SplitConfig:
    """`data.split`: patient-level fractions for val and test, and the seed of the keyed-hash split."""

    val: float = 0.15
    test: float = 0.15
    seed: int = 0


@dataclass
class DataConfig:
    """`data`: the archive and labels to ingest, the manifest folder, the pseudonym key, ingest workers, strictness."""

    source: str = ""
    labels: str = ""
    manifest: str = ""
    split: SplitConfig = field(default_factory=SplitConfig)
    key_file: str | None = None
    workers: int = 1
    max_voxels: int = MAX_VOXELS  # a file or image unit declaring more voxels is quarantined (too-large), unread
    strict: bool = True  # train/run: a quarantined file or conflicting label stops before training; false goes on
    # share of the train split's patients used for training: a nested, label-stratified subset keyed by the
    # pseudonymised subject id and finetune.seed (the 0.25 subset lies inside the 0.5 one); val and test stay whole
    train_fraction: float = 1.0


@dataclass
class AugmentConfig:
    """`prepare.augment`: training-time augmentation (off by default)."""

    enabled: bool = False
    flip: bool = False  # left-right flip; off by default: anatomy is not symmetric (heart, situs)
    rotate_deg: float = 5.0
    scale: float = 0.05
    intensity: float = 0.05


@dataclass
class PrepareConfig:
    """`prepare`: dims, intensity preset, size, spacing, 2.5D slices, z projection, cache: for the prepare stage."""

    dims: Literal["2d", "2.5d", "3d"] = "2d"
    preset: Literal["xray", "ct-lung", "ct-soft-tissue", "ct-bone", "mr"] = "xray"
    size: list[int] = field(default_factory=lambda: [224, 224])
    spacing: list[float] | None = None
    slices: int = 3  # 2.5d: adjacent slices stacked as channels
    reduce: Literal["none", "mip", "mean", "center"] = "none"  # 2d on volumes: z projection (none = error)
    cache_dir: str | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    """`model`: backbone, weights, channels and the 2D → 3D adaptation: given to the adapt stage."""

    backbone: str = "tf_efficientnet_lite0"
    weights: str = "imagenet"
    in_channels: int = 1
    inflation: Literal["i3d-mean", "i3d-center"] = "i3d-mean"
    depth_padding: Literal["replicate", "zeros"] = "replicate"  # 3d: how inflated convs pad along depth
    weights_dir: str | None = None
    slicewise: bool = False
    pool: Literal["avg", "max", "catavgmax"] = "avg"  # global pooling of the last feature map
    keep_depth: int = 0  # 3d: downsampling levels that halve height and width but keep every slice


@dataclass
class EarlyStoppingConfig:
    """`finetune.early_stopping`: the validation metric watched and the patience in epochs."""

    metric: str = "val_auroc"
    patience: int = 3


@dataclass
class FinetuneConfig:
    """`finetune`: strategy, optimisation, imbalance handling, device and resume: given to the finetune stage."""

    strategy: Literal["linear-probe", "finetune", "partial", "gradual", "lp-ft"] = "linear-probe"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3.0e-4
    head_lr: float | None = None
    weight_decay: float = 1.0e-4
    layer_lr_decay: float = 0.7
    class_weights: Any = "balanced"  # none | balanced | effective-number | [w0, w1, ...]
    # weighted: classes drawn in balance (∝ 1/n_class), independent of class_weights; with class_weights
    # balanced that corrects the imbalance twice (check_options warns): usually pick one of the two
    sampler: Literal["uniform", "weighted"] = "uniform"
    bn: Literal["frozen", "train"] = "frozen"
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    loss: Literal["ce", "focal"] = "ce"
    focal_gamma: float = 2.0  # focal loss: (1 - p)^gamma down-weights easy examples; 0 = cross-entropy
    head: Literal["linear", "logistic"] = "linear"  # logistic: scikit-learn fit on cached features (linear-probe)
    logistic_c: float = 1.0  # head logistic: inverse L2 strength on standardised features
    unfreeze_every: int = 1  # gradual: epochs per phase (one more layer group unfreezes each phase)
    partial_freeze: int = 2  # partial: layer groups frozen from the stem (the stem counts as one)
    # lp-ft (Kumar et al. 2022): a linear probe of lpft_probe_epochs epochs (the head alone, as strategy
    # linear-probe trains it, at lpft_probe_lr; None: head_lr, else lr), then `epochs` epochs of full
    # fine-tuning at `lr` (usually smaller) starting from the probed head
    lpft_probe_epochs: int = 5
    lpft_probe_lr: float | None = None
    compile: bool = False  # torch.compile the training model (PyTorch 2; first epoch pays the compile)
    resume: str | None = None  # MLflow run id of an interrupted run to continue (CLI: train --resume RUN_ID)


@dataclass
class EvaluateConfig:
    """`evaluate`: calibration method, operating-point rules, bootstrap resamples and subgroup columns."""

    # auto: fit temperature or vector scaling only when validation is large enough and it lowers the
    # cross-validated validation NLL (pipeline.evaluate.choose_calibration); else plain softmax
    calibration: Literal["auto", "temperature", "vector", "isotonic", "none"] = "auto"
    operating_points: list[str] = field(default_factory=lambda: ["youden", "sensitivity@0.90"])
    bootstrap: int = 1000
    subgroups: list[str] = field(default_factory=lambda: ["sex", "site", "manufacturer"])


@dataclass
class TrackingConfig:
    """`tracking`: the MLflow store and the registered model name."""

    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    register_as: str | None = None


@dataclass
class Config:
    """One experiment: every section, validated on load (`load_config`), logged flat to MLflow."""

    experiment: str = "medxfer"
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    source_file: str | None = field(default=None, metadata={"internal": True})

    def as_dict(self) -> dict[str, Any]:
        """Plain nested dict of the user-facing settings (no internal fields)."""
        d = dataclasses.asdict(self)
        d.pop("source_file", None)
        return d

    def flat(self) -> dict[str, str]:
        """Flat `section.key` → string form for MLflow params (each ≤ 500 characters)."""
        return {k: _short(v) for k, v in _flatten(self.as_dict()).items()}

    def hash(self) -> str:
        """Stable sha256 of the settings (first 16 hex characters)."""
        blob = json.dumps(self.as_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= 500 else text[:497] + "..."


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _check_value(path: str, value: Any, hint: Any, problems: list[str]) -> Any:
    """Validate `value` against a type hint; return the coerced value (or the input on error)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            problems.append(f"{path}: '{value}' is not one of {list(allowed)}{did_you_mean(value, allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(path, value, inner[0], problems)
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {value!r}")
            return value
        return [_check_value(f"{path}[{i}]", v, item_hint, problems) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, problems)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        problems.append(f"{path}: expected a finite number, got {value!r}")
        return value
    if hint in (int, str, bool) and not (isinstance(value, hint) and (hint is bool or not isinstance(value, bool))):
        problems.append(f"{path}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: Any, raw: Any, path: str, problems: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{path or 'config'}: expected a mapping of keys, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            problems.append(f"{where}: unknown key{did_you_mean(key, fields)}; valid keys: {sorted(fields)}")
            continue
        kwargs[key] = _check_value(where, value, hints[key], problems)
    return cls(**kwargs)


def _semantic_checks(cfg: Config, problems: list[str]) -> None:
    split = cfg.data.split
    if not (0 <= split.val < 1 and 0 <= split.test < 1 and split.val + split.test < 1):
        problems.append(f"data.split: val={split.val}, test={split.test}; each in [0, 1) with val + test < 1")
    if cfg.data.max_voxels < 1:
        problems.append(f"data.max_voxels: must be ≥ 1, got {cfg.data.max_voxels}")
    if not 0 < cfg.data.train_fraction <= 1:
        problems.append(f"data.train_fraction: must be in (0, 1], got {cfg.data.train_fraction}")
    if cfg.prepare.dims == "2d" and len(cfg.prepare.size) != 2:
        problems.append(f"prepare.size: 2d needs [H, W], got {cfg.prepare.size}")
    if cfg.prepare.reduce != "none" and cfg.prepare.dims != "2d":
        problems.append(
            f"prepare.reduce: '{cfg.prepare.reduce}' applies to dims 2d only, got dims "
            f"{cfg.prepare.dims}; set reduce: none"
        )
    if cfg.prepare.dims == "3d" and len(cfg.prepare.size) != 3:
        problems.append(f"prepare.size: 3d needs [D, H, W], got {cfg.prepare.size}")
    if cfg.prepare.dims == "2.5d" and len(cfg.prepare.size) not in (2, 3):
        problems.append(f"prepare.size: 2.5d needs [H, W] (or [D, H, W] with slicewise), got {cfg.prepare.size}")
    for name in ("epochs", "batch_size"):
        if getattr(cfg.finetune, name) < 1:
            problems.append(f"finetune.{name}: must be ≥ 1, got {getattr(cfg.finetune, name)}")
    if cfg.finetune.lr <= 0:
        problems.append(f"finetune.lr: must be > 0, got {cfg.finetune.lr}")
    if cfg.evaluate.bootstrap < 0:
        problems.append(f"evaluate.bootstrap: must be ≥ 0, got {cfg.evaluate.bootstrap}")


def from_dict(raw: dict[str, Any], source_file: str | None = None) -> Config:
    """Build and validate a Config; raise ConfigError listing every problem at once."""
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    if not problems:
        _semantic_checks(cfg, problems)
    if problems:
        where = f" in {source_file}" if source_file else ""
        raise ConfigError(f"invalid config{where}:\n  - " + "\n  - ".join(problems))
    cfg.source_file = source_file
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML config. Relative paths in `data` are resolved against the config's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (give the path to a YAML file, e.g. configs/cxr-demo.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys (experiment:, data:, prepare:, ...), "
            f"got a {type(raw).__name__}; see configs/cxr-demo.yaml for the shape"
        )
    raw = _merge(raw, overrides or {})
    cfg = from_dict(raw, str(path))
    base = path.resolve().parent
    for name in ("source", "labels", "manifest", "key_file"):
        value = getattr(cfg.data, name)
        if value and not Path(value).is_absolute() and "://" not in value:
            setattr(cfg.data, name, str((base / value).resolve()))
    return cfg


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the config as YAML (atomically)."""
    write_text(path, yaml.safe_dump(cfg.as_dict(), sort_keys=False))
