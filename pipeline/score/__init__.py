"""Batch scoring of scan archives with a packaged model: resumable chunks, failure rows, pluggable engines.

Modules: `archive` (`score`, one archive end to end), `packaged` (loading the model), `plan` (work
folder, plan key, chunk writer), `scorer` (the per-batch Scorer every engine runs), `adabn`
(BatchNorm adaptation to the archive), `table` (the output table and summary), `external`
(external-validation metrics), `engines` (the `Engine` contract and the `ENGINES` registry) and
one module per engine: `local_engine`, `ray_engine` (Ray is imported only when it runs). A new
engine is one module with a function of the `Engine` signature plus one `ENGINES` entry.
Domain statistics (`DomainStats`, `compare_domain`, `reference_stats`) live in `pipeline.evaluate`.
"""

from pipeline.score.archive import score
from pipeline.score.engines import ENGINES, Engine, EngineOptions
from pipeline.score.external import external_metrics
from pipeline.score.packaged import load_packaged

__all__ = [
    "ENGINES",
    "Engine",
    "EngineOptions",
    "external_metrics",
    "load_packaged",
    "score",
]
