"""The engine contract (one signature for every scoring engine) and the registry `score` dispatches through."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pipeline.errors import ConfigError, did_you_mean
from pipeline.records import Packaged
from pipeline.score.local_engine import run_local
from pipeline.score.ray_engine import run_ray
from pipeline.score.scorer import Sink

_CPU = torch.device("cpu")


@dataclass(frozen=True)
class EngineOptions:
    """Run settings every engine receives; each reads the ones it needs.

    Attributes:
        workers: DataLoader processes (local) or actors (ray; 0 = one per GPU, else one per CPU).
        device: the driver's device (local inference runs there).
        tracking_uri: absolute MLflow store URI, for engines that load the model again elsewhere.
        address: Ray cluster address (``ray://host:10001``, ``auto``) or None.
        bn_state: AdaBN BatchNorm state dict (CPU tensors) already loaded into ``pkg.model``, for
            engines that load the model again elsewhere; None without AdaBN.
    """

    workers: int = 0
    device: torch.device = _CPU
    tracking_uri: str = ""
    address: str | None = None
    bn_state: dict[str, torch.Tensor] | None = None


class Engine(Protocol):
    """A scoring engine: score every unit of `batches` with `pkg` and hand the results to `sink`.

    Args:
        pkg: the packaged model (with AdaBN already applied to ``pkg.model`` when used).
        units: the units in plan order; an engine reads ``units[i]["path"]`` (the unit's NIfTI file).
        batches: lists of unit indices, one forward pass each (they never straddle two chunks).
            Engines keep these compositions, so that every engine gives the same probabilities.
        sink: called with `Scorer.score_items`-shaped results (any order, any grouping of batches);
            every unit index must reach it exactly once. Failures are rows (a reason), not exceptions.
        options: run settings (`EngineOptions`).
    """

    def __call__(
        self,
        pkg: Packaged,
        units: Sequence[dict[str, Any]],
        batches: list[list[int]],
        sink: Sink,
        options: EngineOptions,
    ) -> None: ...


ENGINES: dict[str, Engine] = {"local": run_local, "ray": run_ray}


def get_engine(name: str) -> Engine:
    """The registered engine called `name`.

    Raises:
        ConfigError: no such engine (with the closest name and the list of engines).
    """
    if name not in ENGINES:
        raise ConfigError(
            f"--engine: unknown engine '{name}'{did_you_mean(name, ENGINES)}; choose one of {', '.join(ENGINES)}"
        )
    return ENGINES[name]
