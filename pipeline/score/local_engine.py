"""Local engine: a streaming DataLoader (prepare in worker processes) feeding batched inference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader

from pipeline.records import Packaged
from pipeline.score.scorer import Scorer, Sink, UnitDataset, collate_units

if TYPE_CHECKING:
    from pipeline.score.engines import EngineOptions


def run_local(
    pkg: Packaged,
    units: Sequence[dict[str, Any]],
    batches: list[list[int]],
    sink: Sink,
    options: EngineOptions,
) -> None:
    """Score `batches` in this process on ``options.device``; prepare in ``options.workers`` processes.

    Implements `pipeline.score.engines.Engine`.
    """
    scorer = Scorer(pkg.model, pkg.spec, options.device, len(pkg.classes))
    loader = DataLoader(
        UnitDataset([u["path"] for u in units], scorer.spec),
        batch_sampler=batches,
        num_workers=options.workers,
        collate_fn=collate_units,
        prefetch_factor=2 if options.workers else None,
    )
    for items in loader:
        sink(scorer.score_items(items))
