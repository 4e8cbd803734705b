"""Fine-tuning: strategies freeze by named group, BN policy, per-group learning rates, class weights."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.config import EarlyStoppingConfig, FinetuneConfig
from pipeline.errors import ConfigError
from pipeline.finetune import extract_features, finetune, linear_probe
from pipeline.finetune.freezing import (
    apply_freezing,
    group_of,
    param_groups,
    trainable_group_indices,
)
from pipeline.finetune.weighting import class_weights, weighted_sampler


class Toy(nn.Module):
    """A small CNN with the MedNet contract: .features → (B, F), .head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),  # stem: features.0/.1
            nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # stage: features.3/.4
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 2)
        self.num_features = 8

    def forward(self, x):
        return self.head(self.features(x))


GROUPS = [("stem", ["features.0", "features.1"]), ("stage1", ["features.3", "features.4"]), ("head", ["head"])]


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()  # brighter = positive
    return TensorDataset(x, y, torch.arange(n)), y.numpy()


def _cfg(**kw):
    base = dict(strategy="finetune", epochs=3, batch_size=16, lr=1e-2, device="cpu", num_workers=0)
    base.update(kw)
    return FinetuneConfig(**base)


def test_class_weights_on_known_imbalance():
    y = np.array([0] * 90 + [1] * 10)
    w = class_weights(y, 2, "balanced")
    assert w[1] / w[0] == pytest.approx(9.0)
    assert w.mean() == pytest.approx(1.0)
    assert class_weights(y, 2, "none").tolist() == [1.0, 1.0]
    eff = class_weights(y, 2, "effective-number")
    assert 1.0 < eff[1] / eff[0] < 9.0  # effective number softens the imbalance
    assert class_weights(y, 2, [1, 3])[1] == pytest.approx(1.5)
    with pytest.raises(ConfigError, match="did you mean 'balanced'"):
        class_weights(y, 2, "balance")


def test_weighted_sampler_balances_classes():
    y = np.array([0] * 90 + [1] * 10)
    idx = list(weighted_sampler(y, class_weights(y, 2, "balanced"), seed=0))
    frac = np.mean(y[idx])
    assert 0.35 < frac < 0.65


def test_groups_and_strategies():
    model = Toy()
    assert group_of("features.3.weight", GROUPS) == 1
    assert trainable_group_indices("linear-probe", 3) == {2}
    assert trainable_group_indices("partial", 3, partial_freeze=1) == {1, 2}
    assert trainable_group_indices("gradual", 3, phase=0) == {2}
    assert trainable_group_indices("gradual", 3, phase=5) == {0, 1, 2}
    n = apply_freezing(model, GROUPS, {2})
    assert n == 8 * 2 + 2


def test_param_groups_decay_from_head():
    model = Toy()
    groups = param_groups(model, GROUPS, {0, 1, 2}, lr=1.0, decay=0.5, head_lr=2.0)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"stem": 0.25, "stage1": 0.5, "head": 2.0}


def test_partial_keeps_frozen_weights_and_bn_stats_unchanged():
    torch.manual_seed(0)
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds, y = _data()
    res = finetune(model, GROUPS, ds, ds, y, _cfg(strategy="partial", bn="frozen"), 2, partial_freeze=1)
    after = model.state_dict()
    for key in ("features.0.weight", "features.1.weight", "features.1.running_mean", "features.1.running_var"):
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert not torch.equal(before["features.4.running_mean"], after["features.4.running_mean"])
    assert res.epochs_run == 3 and len(res.history["val_auroc"]) == 3


def test_bn_train_policy_updates_frozen_bn_stats():
    model = Toy()
    before = model.features[1].running_mean.clone()
    ds, y = _data()
    finetune(model, GROUPS, ds, ds, y, _cfg(strategy="partial", bn="train", epochs=1), 2, partial_freeze=1)
    assert not torch.equal(before, model.features[1].running_mean)


def test_gradual_unfreezes_one_group_per_phase():
    model = Toy()
    ds, y = _data()
    seen = []
    res = finetune(model, GROUPS, ds, ds, y, _cfg(strategy="gradual", epochs=3, early_stopping=EarlyStoppingConfig("val_loss", 9)),
                   2, on_epoch=lambda e, row: seen.append(row["trainable_params"]))
    assert seen[0] < seen[1] < seen[2]
    assert res.trainable_by_phase == seen


def test_finetune_learns_and_is_deterministic():
    ds, y = _data()
    aurocs = []
    for _ in range(2):
        torch.manual_seed(0)
        res = finetune(Toy(), GROUPS, ds, ds, y, _cfg(epochs=4), 2)
        aurocs.append(res.history["val_auroc"])
    assert aurocs[0] == aurocs[1]
    assert max(aurocs[0]) > 0.8


def test_early_stopping_stops_and_keeps_best():
    ds, y = _data()
    # nothing can change: only the head trains, at lr 0, with every BatchNorm frozen
    cfg = _cfg(strategy="linear-probe", epochs=30, lr=0.0, early_stopping=EarlyStoppingConfig("val_loss", 2))
    res = finetune(Toy(), GROUPS, ds, ds, y, cfg, 2)
    assert res.stopped_early and res.epochs_run == 3 and res.best_epoch == 0


def test_linear_probe_on_cached_features(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    frozen = {k: v.clone() for k, v in model.features.state_dict().items()}
    ds, _ = _data()
    cache = tmp_path / "feats.pt"
    feats = extract_features(model.features, ds, torch.device("cpu"), 16, cache)
    assert cache.exists() and feats[0].shape == (48, 8)
    again = extract_features(nn.Identity(), ds, torch.device("cpu"), 16, cache)  # served from the cache
    assert torch.equal(feats[0], again[0])
    res = linear_probe(model, feats, feats, _cfg(epochs=5), 2)
    for k, v in model.features.state_dict().items():
        assert torch.equal(frozen[k], v), k
    assert res.trainable_by_phase == [18]
