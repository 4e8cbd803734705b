"""The study file: a base config, the axes to vary, the lr grid and the reference; validated before torch loads.

```yaml
name: cxr-demo-study            # optional; default the file's name without .yaml
base: cxr-demo.yaml             # a normal medxfer config, relative to this file
axes:                           # each optional; an absent axis keeps the base config's value
  weights: [imagenet, none, transfusion]
  strategy: [linear-probe, finetune]
  backbone: [tf_efficientnet_lite0]
  prepare.dims: [2d]
  train_fraction: [0.25, 0.5, 1.0]
  seeds: [0, 1]
lr_grid: [1.0e-3, 3.0e-3]       # every arm trains once per lr; the best validation AUROC is kept
reference: {weights: none}      # each arm is compared with the arm that differs only here
```

Arms are the cartesian product of the axes. Every problem (unknown keys, axes or values, an arm
whose config would not validate) is listed at once in one ConfigError (exit 2).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config, FinetuneConfig, PrepareConfig, load_config
from pipeline.errors import ConfigError, did_you_mean

KEYS = ("name", "base", "axes", "lr_grid", "reference")
AXES = ("weights", "strategy", "backbone", "prepare.dims", "train_fraction", "seeds")
WEIGHTS = ("imagenet", "none", "transfusion")
STRATEGIES: tuple[str, ...] = typing.get_args(typing.get_type_hints(FinetuneConfig)["strategy"])
DIMS: tuple[str, ...] = typing.get_args(typing.get_type_hints(PrepareConfig)["dims"])
# the backbones of pipeline.adapt.registry.BACKBONES, named here so a study file is checked before torch
# loads (tests/test_study.py checks the two lists are the same)
BACKBONES = (
    "tf_efficientnet_lite0",
    "tf_efficientnet_lite1",
    "tf_efficientnet_lite2",
    "efficientnet_b0",
    "resnet18",
    "resnet50",
    "densenet121",
)
DEFAULT_LR_GRID = (1.0e-3, 3.0e-3)
DEFAULT_REFERENCE = {"weights": "none"}
# settings that change how a run is executed, not what it computes: left out of the study hash
UNHASHED = (
    ("finetune", "device"),
    ("finetune", "num_workers"),
    ("finetune", "compile"),
    ("finetune", "resume"),
    ("data", "workers"),
    ("tracking", "uri"),
    ("prepare", "cache_dir"),
)


@dataclass(frozen=True)
class Arm:
    """One arm of a study: a value of every axis. Its `key` names it in MLflow tags and study.json."""

    weights: str
    strategy: str
    backbone: str
    dims: str
    train_fraction: float
    seed: int

    @property
    def key(self) -> str:
        """'weights=imagenet strategy=linear-probe backbone=... dims=2d train_fraction=1 seed=0'."""
        return " ".join(f"{k}={_text(v)}" for k, v in self.values().items())

    def values(self) -> dict[str, Any]:
        """Axis name (as in the study file, `seeds` as `seed`, `prepare.dims` as `dims`) → value."""
        return {
            "weights": self.weights,
            "strategy": self.strategy,
            "backbone": self.backbone,
            "dims": self.dims,
            "train_fraction": self.train_fraction,
            "seed": self.seed,
        }

    def overrides(self, lr: float) -> dict[str, Any]:
        """The base-config overrides of this arm trained at learning rate `lr`."""
        return {
            "model": {"weights": self.weights, "backbone": self.backbone},
            "finetune": {"strategy": self.strategy, "seed": self.seed, "lr": lr, "resume": None},
            "prepare": {"dims": self.dims},
            "data": {"train_fraction": self.train_fraction},
        }


@dataclass
class Study:
    """A validated study file.

    Attributes:
        name: the study's name (output folder study-<name>, MLflow run name).
        path: the study file. base_path: its base config (absolute).
        base: the base config as loaded (paths resolved against its folder).
        axes: axis → values in the order given (absent axes: the base config's one value).
        lr_grid: learning rates every arm is trained with (selection on validation AUROC).
        reference: axis → value that defines each arm's reference arm (same other axes).
        arms: the cartesian product of the axes, in file order.
        configs: arm key → lr → the arm's full Config at that lr (validated).
    """

    name: str
    path: Path
    base_path: Path
    base: Config
    axes: dict[str, list[Any]]
    lr_grid: list[float]
    reference: dict[str, Any]
    arms: list[Arm]
    configs: dict[str, dict[float, Config]] = field(repr=False)

    def label(self, arm: Arm) -> str:
        """The arm named by the axes that vary in this study only (its full key when none varies)."""
        varying = [_ARM_FIELD[a] for a in AXES if len(self.axes[a]) > 1]
        values = arm.values()
        return " ".join(f"{k}={_text(values[k])}" for k in varying) or arm.key

    def reference_of(self, arm: Arm) -> Arm | None:
        """The arm that differs from `arm` only in the reference's axes; None when it is `arm` or absent."""
        values = {**arm.values(), **{_ARM_FIELD[k]: v for k, v in self.reference.items()}}
        ref = Arm(**values)
        return ref if ref != arm and ref in self.arms else None

    def hash(self, manifest_hash: str) -> str:
        """sha256 (first 16 hex) of the base config, the axes, the lr grid and the manifest's hash.

        The execution settings in `UNHASHED` (device, workers, tracking URI, cache folder) are left
        out, so moving a study to another machine or store keeps its hash; the reference is left out
        too (it changes the comparisons, not what is trained).
        """
        base = copy.deepcopy(self.base.as_dict())
        for section, key in UNHASHED:
            base.get(section, {}).pop(key, None)
        blob = {"base": base, "axes": self.axes, "lr_grid": self.lr_grid, "manifest_hash": manifest_hash}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """The study as study.json records it (no paths but the file names)."""
        return {
            "name": self.name,
            "file": self.path.name,
            "base": self.base_path.name,
            "axes": self.axes,
            "lr_grid": self.lr_grid,
            "reference": self.reference,
            "n_arms": len(self.arms),
            "n_trainings": len(self.arms) * len(self.lr_grid),
        }


_ARM_FIELD = {"weights": "weights", "strategy": "strategy", "backbone": "backbone", "prepare.dims": "dims",
              "train_fraction": "train_fraction", "seeds": "seed"}  # fmt: skip


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def load_study(path: str | Path) -> Study:
    """Read and validate a study file and every arm's config; nothing heavy is imported.

    Raises:
        ConfigError: every problem at once (unknown keys, axes, values with "did you mean", an lr
            grid that is not a list of positive numbers, a reference outside the axes, a base config
            or arm config that does not validate).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"study file not found: {path}. Fix: give the path of a study YAML, e.g. configs/study-cxr-demo.yaml"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (base:, axes:, lr_grid:, reference:)")
    problems: list[str] = []
    for key in raw:
        if key not in KEYS:
            problems.append(f"{key}: unknown key{did_you_mean(str(key), KEYS)}; valid keys: {list(KEYS)}")
    base_path, base = _base(path, raw.get("base"), problems)
    axes = _axes(raw.get("axes"), base, problems)
    lr_grid = _lr_grid(raw.get("lr_grid", list(DEFAULT_LR_GRID)), problems)
    reference = _reference(raw.get("reference"), axes, problems)
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name.strip() or "/" in name:
        problems.append(f"name: expected a short name without '/', got {name!r}")
    if problems or base is None or base_path is None:
        raise ConfigError(_listing(path, problems))
    arms = [Arm(*values) for values in itertools.product(*(axes[a] for a in AXES))]
    configs: dict[str, dict[float, Config]] = {}
    for arm in arms:
        for lr in lr_grid:
            try:
                configs.setdefault(arm.key, {})[lr] = load_config(base_path, arm.overrides(lr))
            except ConfigError as exc:
                lines = str(exc).splitlines()
                problems += [f"arm {arm.key}: {line.strip(' -')}" for line in lines[1:] or lines]
                break
    if problems:
        raise ConfigError(_listing(path, sorted(set(problems))))
    return Study(name.strip(), path, base_path, base, axes, lr_grid, reference, arms, configs)


def _listing(path: Path, problems: list[str]) -> str:
    return f"invalid study file {path}:\n  - " + "\n  - ".join(problems)


def _base(path: Path, value: Any, problems: list[str]) -> tuple[Path | None, Config | None]:
    if not isinstance(value, str) or not value:
        problems.append("base: missing; name the medxfer config the arms start from, e.g. base: cxr-demo.yaml")
        return None, None
    base_path = (path.resolve().parent / value).resolve()
    if not base_path.is_file():
        problems.append(f"base: {value} does not exist (looked for {base_path}; it is relative to the study file)")
        return None, None
    try:
        base = load_config(base_path)
    except ConfigError as exc:
        problems.append(f"base: {exc}")
        return None, None
    if not base.data.manifest:
        problems.append(f"base: {value} sets no data.manifest; the study needs one manifest for all its arms")
    return base_path, base


def _axes(raw: Any, base: Config | None, problems: list[str]) -> dict[str, list[Any]]:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        problems.append(f"axes: expected a mapping of axis → list of values, got {raw!r}")
        raw = {}
    for key in raw:
        if key not in AXES:
            problems.append(f"axes.{key}: unknown axis{did_you_mean(str(key), AXES)}; axes: {list(AXES)}")
    defaults: dict[str, Any] = {}
    if base is not None:
        defaults = {
            "weights": base.model.weights,
            "strategy": base.finetune.strategy,
            "backbone": base.model.backbone,
            "prepare.dims": base.prepare.dims,
            "train_fraction": base.data.train_fraction,
            "seeds": base.finetune.seed,
        }
    out: dict[str, list[Any]] = {}
    for axis in AXES:
        if axis not in raw:
            out[axis] = [defaults.get(axis)]
            continue
        values = raw[axis] if isinstance(raw[axis], list) else [raw[axis]]
        if not values:
            problems.append(f"axes.{axis}: empty; give at least one value or leave the axis out")
        if len({json.dumps(v, default=str) for v in values}) != len(values):
            problems.append(f"axes.{axis}: {values} names a value twice")
        out[axis] = [_value(axis, v, problems) for v in values]
    return out


def _value(axis: str, value: Any, problems: list[str]) -> Any:
    """Check one axis value; return it coerced (floats for train_fraction)."""
    where = f"axes.{axis}: {value!r}"
    choices = {"weights": WEIGHTS, "backbone": BACKBONES, "prepare.dims": DIMS}
    if axis == "strategy":
        if value not in STRATEGIES:
            problems.append(
                f"{where} is not a strategy{did_you_mean(str(value), STRATEGIES)}; use one of {list(STRATEGIES)}"
            )
    elif axis in choices:
        if value not in choices[axis]:
            problems.append(f"{where} is not one of {list(choices[axis])}{did_you_mean(str(value), choices[axis])}")
    elif axis == "train_fraction":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            problems.append(f"{where}: expected a share of the train split's patients in (0, 1], e.g. 0.25")
            return value
        return float(value)
    elif axis == "seeds" and (isinstance(value, bool) or not isinstance(value, int)):
        problems.append(f"{where}: expected a whole number (finetune.seed)")
    return value


def _lr_grid(raw: Any, problems: list[str]) -> list[float]:
    values = raw if isinstance(raw, list) else [raw]
    ok = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 10]
    if not values or len(ok) != len(values) or len(set(ok)) != len(ok):
        problems.append(
            f"lr_grid: expected a short list of distinct learning rates in (0, 10), got {raw!r}; e.g. [1.0e-3, 3.0e-3]"
        )
        return [float(v) for v in ok]
    return [float(v) for v in values]


def _reference(raw: Any, axes: dict[str, list[Any]], problems: list[str]) -> dict[str, Any]:
    if raw is None:
        return dict(DEFAULT_REFERENCE)
    if not isinstance(raw, dict) or not raw:
        problems.append(f"reference: expected a mapping of axis → value, e.g. {{weights: none}}, got {raw!r}")
        return dict(DEFAULT_REFERENCE)
    out = {}
    for key, value in raw.items():
        if key not in AXES:
            problems.append(f"reference.{key}: unknown axis{did_you_mean(str(key), AXES)}; axes: {list(AXES)}")
            continue
        value = float(value) if key == "train_fraction" and isinstance(value, int | float) else value
        if value not in axes.get(key, []):
            problems.append(
                f"reference.{key}: {value!r} is not one of the study's values {axes.get(key)}; "
                "the reference must be an arm of the study"
            )
        out[key] = value
    return out
