"""Composes the stages for `train`, `evaluate`, `run` and `demo`: the one place they meet.

Modules: `cohort` (ingest when needed, the labelled cohort, datasets, the network from the config),
`training` (`train`), `evaluation` (`evaluate`: calibrate, measure, package, register), `packaging` (the model as data,
logged with its pyfunc flavour, whose code file is `pyfunc_model.py`), `demo`
(`run` end to end, and `demo`).
"""

from pipeline import tracking
from pipeline.run.cohort import ensure_manifest, load_cohort, manifest_hash
from pipeline.run.demo import DEMO_CONFIG, demo, demo_config, run
from pipeline.run.evaluation import data_example, evaluate
from pipeline.run.packaging import log_packaged
from pipeline.run.training import RESUMABLE_PARAMS, checkpoint_path, train

__all__ = [
    "DEMO_CONFIG",
    "RESUMABLE_PARAMS",
    "checkpoint_path",
    "data_example",
    "demo",
    "demo_config",
    "ensure_manifest",
    "evaluate",
    "load_cohort",
    "log_packaged",
    "manifest_hash",
    "run",
    "tracking",
    "train",
]
