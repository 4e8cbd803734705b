"""Fine-tuning stage: strategies, imbalance handling and the training loop."""

from pipeline.finetune.loop import (
    TrainResult,
    extract_features,
    feature_cache_key,
    finetune,
    linear_probe,
    pick_device,
    predict_logits,
)

__all__ = ["TrainResult", "extract_features", "feature_cache_key", "finetune", "linear_probe", "pick_device",
           "predict_logits"]
