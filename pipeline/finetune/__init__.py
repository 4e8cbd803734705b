"""Fine-tuning stage: strategies, imbalance handling, the training loop, resume and DDP."""

from pipeline.finetune.distributed import World, init_distributed, pick_device, shutdown
from pipeline.finetune.loop import autocast, finetune, predict_logits, val_auroc
from pipeline.finetune.losses import FocalLoss, make_loss
from pipeline.finetune.lpft import lp_ft
from pipeline.finetune.options import check_options
from pipeline.finetune.probe import extract_features, feature_cache_key, linear_probe, logistic_head

__all__ = [
    "FocalLoss",
    "World",
    "autocast",
    "check_options",
    "extract_features",
    "feature_cache_key",
    "finetune",
    "init_distributed",
    "linear_probe",
    "logistic_head",
    "lp_ft",
    "make_loss",
    "pick_device",
    "predict_logits",
    "shutdown",
    "val_auroc",
]
