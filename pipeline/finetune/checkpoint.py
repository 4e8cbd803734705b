"""Training-state checkpoints for --resume: atomic writes, random-number states, config fingerprints."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from pipeline.config import FinetuneConfig
from pipeline.errors import ConfigError, DataError
from pipeline.io import atomic_path, load_tensors

FORMAT = "medxfer-train-state/1"
# settings that may change between an interrupted run and its resumption
RESUMABLE_CHANGES = ("resume", "device", "num_workers", "compile")


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write a training state atomically (temp file in the same folder, then rename)."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a training state written by `save_state` (tensors and plain values only).

    Raises:
        ConfigError: the file does not exist.
        DataError: the file is not a medxfer training state.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"cannot resume: no training checkpoint at {path}; the run never finished an epoch "
            "or the file was removed. Start a new run (without --resume)"
        )
    state = load_tensors(path, "training checkpoint", "delete it and start a new run (without --resume)")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(
            f"{path}: expected a '{FORMAT}' training checkpoint, got "
            f"{state.get('format') if isinstance(state, dict) else type(state).__name__}"
        )
    return state


def fingerprint(cfg: FinetuneConfig) -> dict[str, Any]:
    """The finetune settings that must not change across a resume, as plain JSON values."""
    is_instance = dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)
    raw = dataclasses.asdict(cfg) if is_instance else dict(vars(cfg))
    raw = {k: v for k, v in raw.items() if k not in RESUMABLE_CHANGES}
    return json.loads(json.dumps(raw, default=str, sort_keys=True))


def check_fingerprint(saved: dict[str, Any], cfg: FinetuneConfig, path: str | Path) -> None:
    """Raise ConfigError listing every setting that differs from the interrupted run's."""
    now = fingerprint(cfg)
    diffs = [
        f"finetune.{k}: {saved.get(k)!r} then, {now.get(k)!r} now"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if diffs:
        raise ConfigError(
            f"cannot resume from {path}: the config differs from the interrupted run's:\n  - "
            + "\n  - ".join(diffs)
            + "\nuse the same config (only the resume target, device, "
            "num_workers and compile may change) or start a new run"
        )


def random_states(obj: Any, depth: int = 6, seen: set[int] | None = None) -> list[np.random.RandomState]:
    """Every numpy RandomState reachable from `obj` (e.g. a dataset's MONAI augmentation), in a stable order."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth < 0 or obj is None or isinstance(obj, str | bytes | int | float | torch.Tensor):
        return []
    seen.add(id(obj))
    if isinstance(obj, np.random.RandomState):
        return [obj]
    if isinstance(obj, list | tuple):
        children = list(obj)
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module | type):
        children = [v for k, v in vars(obj).items() if not k.startswith("_")]  # public state only
    else:
        return []
    return [r for child in children for r in random_states(child, depth - 1, seen)]


def _np_state(state: tuple) -> tuple:
    name, keys, pos, has_gauss, gauss = state
    return name, torch.as_tensor(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)


def _np_unstate(state: tuple) -> tuple:
    name, keys, pos, has_gauss, gauss = state
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss


def capture_rng(loader_gen: torch.Generator | None, extra: list[np.random.RandomState]) -> dict[str, Any]:
    """torch (CPU and CUDA), numpy, python, the loader's generator and `extra` RandomStates."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _np_state(cast(tuple, np.random.get_state())),
        "python": random.getstate(),
        "loader": loader_gen.get_state() if loader_gen is not None else None,
        "extra": [_np_state(cast(tuple, r.get_state())) for r in extra],
    }


def restore_rng(state: dict[str, Any], loader_gen: torch.Generator | None, extra: list[np.random.RandomState]) -> None:
    """Put back what `capture_rng` saved (CUDA states only where the devices match)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(_np_unstate(state["numpy"]))
    random.setstate(state["python"])
    if loader_gen is not None and state["loader"] is not None:
        loader_gen.set_state(state["loader"])
    for r, s in zip(extra, state["extra"], strict=False):
        r.set_state(_np_unstate(s))
