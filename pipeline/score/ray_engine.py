"""Ray engine: Ray Data actors, each loading the packaged model once, score the local engine's batches."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline import tracking
from pipeline.records import Packaged
from pipeline.score.packaged import load_packaged
from pipeline.score.scorer import Scorer, Sink

if TYPE_CHECKING:
    from pipeline.score.engines import EngineOptions

log = logging.getLogger("medxfer")


def ray_runtime_env() -> dict[str, Any]:
    """Runtime env that makes this checkout importable in local Ray workers (an installed medxfer needs none)."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


class ModelActor:
    """Ray Data callable class: loads the packaged model once per actor, then scores rows that each
    hold one batch of units (``{"units": JSON [[idx, path], ...]}``, the local engine's batches)."""

    def __init__(self, model_uri: str, tracking_uri: str, bn_state: dict[str, torch.Tensor] | None = None):
        tracking.connect(tracking_uri)
        pkg = load_packaged(model_uri)
        if bn_state:
            pkg.model.load_state_dict(bn_state, strict=False)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.scorer = Scorer(pkg.model, pkg.spec, device, len(pkg.classes))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for units in batch["units"]:
            items = [(int(i), *self.scorer.prepare(str(p))) for i, p in json.loads(str(units))]
            results.append(self.scorer.score_items(items))
        return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


def run_ray(
    pkg: Packaged,
    units: Sequence[dict[str, Any]],
    batches: list[list[int]],
    sink: Sink,
    options: EngineOptions,
) -> None:
    """Ray engine: ``ray.data.from_items(rows).map_batches(ModelActor, ...)``; results go to `sink`.

    Implements `pipeline.score.engines.Engine`; reads ``options.address``, ``workers``,
    ``tracking_uri`` and ``bn_state`` (actors load ``pkg.uri`` again and apply it). Ray is
    imported here, only when this engine runs.

    Each row is one batch of `batches` (the local engine's batches), so both engines run the
    model on the same batch compositions: with the same torch thread count their probabilities
    are bit-identical, otherwise equal to float32 rounding (~1e-7).

    Cluster use::

        ray start --head --port 6379 --ray-client-server-port 10001      # on the head node
        ray start --address HEAD:6379                                     # on each worker node
        medxfer score --engine ray --address ray://HEAD:10001 \\
            --model models:/cxr-demo/latest --tracking-uri http://MLFLOW:5000 \\
            /shared/archive --out /shared/scores/predictions.parquet

    Every node needs the same medxfer (and torch) installed, and must see the same paths: the
    output folder (its ``<out>.work/manifest/images`` is what actors read; put it on a shared
    filesystem) and the model (use an MLflow server URI, or a model path / sqlite store on the
    shared filesystem). One actor per GPU when the cluster has GPUs (``num_gpus=1``, bf16
    autocast), else one per CPU; ``--workers N`` sets the actor count. Ingest, chunk commits and
    the final table run on the driver, so a killed driver resumes like the local engine. Without
    ``--address`` a local Ray is started (and stopped); ``--address auto`` joins a running one.
    """
    import ray

    address, workers = options.address, options.workers
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address,
            runtime_env=ray_runtime_env() if address is None else None,
            include_dashboard=False,
            log_to_driver=False,
        )
    elif address:
        log.info("score: Ray is already initialised in this process; --address %s ignored", address)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        size = workers or gpus or max(1, int(resources.get("CPU", 1)))
        rows = [{"units": json.dumps([[i, units[i]["path"]] for i in batch])} for batch in batches]
        ds = ray.data.from_items(rows).map_batches(
            ModelActor,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=1,
            num_gpus=1 if gpus else 0,
            fn_constructor_kwargs={
                "model_uri": pkg.uri,
                "tracking_uri": options.tracking_uri,
                "bn_state": options.bn_state,
            },
        )
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            sink(out)
    finally:
        if started:
            ray.shutdown()
