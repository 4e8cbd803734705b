"""Fine-tuning: strategies freeze by named group, BN policy, per-group learning rates, class weights."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.config import EarlyStoppingConfig, FinetuneConfig
from pipeline.errors import ConfigError, DataError
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
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),  # stem: features.0/.1
            nn.Conv2d(4, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),  # stage: features.3/.4
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
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
    idx = list(weighted_sampler(y, seed=0))
    frac = np.mean(y[idx])
    assert 0.35 < frac < 0.65


class _Recording(torch.utils.data.Dataset):
    """A train set that records which images the loader draws."""

    def __init__(self, ds: TensorDataset):
        self.ds, self.drawn = ds, []

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        self.drawn.append(int(i))
        return self.ds[i]


def _drawn_counts(y: np.ndarray, **kw) -> np.ndarray:
    """Class counts of the train images `finetune` draws in 3 epochs (Toy model, fixed seed)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(y), 1, 8, 8, generator=g) + torch.as_tensor(y).view(-1, 1, 1, 1).float()
    ds = TensorDataset(x, torch.as_tensor(y), torch.arange(len(y)))
    train = _Recording(ds)
    cfg = _cfg(epochs=3, batch_size=40, seed=0, early_stopping=EarlyStoppingConfig("val_loss", 9), **kw)
    finetune(Toy(), GROUPS, train, ds, y, cfg, 2)
    return np.bincount(y[train.drawn], minlength=2)


def test_weighted_sampler_balances_by_itself_whatever_the_loss_weights():
    y = np.array([0] * 180 + [1] * 20)
    counts = {str(w): _drawn_counts(y, sampler="weighted", class_weights=w) for w in ("none", [10, 1], "balanced")}
    for w, c in counts.items():  # 600 draws: balanced within sampling noise (sd of the fraction ≈ 0.02)
        assert 0.42 < c[1] / c.sum() < 0.58, (w, c)
    # the same draws whatever the loss weights: the sampler does not read them
    assert counts["none"].tolist() == counts["[10, 1]"].tolist() == counts["balanced"].tolist()
    assert _drawn_counts(y, sampler="uniform").tolist() == [540, 60]  # uniform keeps the train imbalance


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
    res = finetune(
        model,
        GROUPS,
        ds,
        ds,
        y,
        _cfg(strategy="gradual", epochs=3, early_stopping=EarlyStoppingConfig("val_loss", 9)),
        2,
        on_epoch=lambda e, row: seen.append(row["trainable_params"]),
    )
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


# --- loss, sampler, options, logistic head, multi-class (issue 5) -------------------------------


def test_focal_loss_known_values():
    from pipeline.finetune import FocalLoss, make_loss

    logits, target = torch.tensor([[0.0, 0.0]]), torch.tensor([1])  # p_y = 0.5
    assert float(FocalLoss(gamma=2.0)(logits, target)) == pytest.approx(0.25 * math.log(2))
    assert float(FocalLoss(gamma=0.0)(logits, target)) == pytest.approx(math.log(2))
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(20, 3, generator=g), torch.randint(0, 3, (20,), generator=g)
    w = np.array([0.5, 1.0, 2.0])
    ce = make_loss("ce", w)(logits, target)
    assert float(make_loss("focal", w, gamma=0.0)(logits, target)) == pytest.approx(float(ce), rel=1e-6)
    assert float(make_loss("focal", w, gamma=2.0)(logits, target)) < float(ce)  # easy examples count less
    with pytest.raises(ConfigError, match="did you mean 'focal'"):
        make_loss("focall", w)


def test_epoch_sampler_is_a_function_of_seed_and_epoch_and_shards_global_batches():
    from pipeline.finetune.weighting import EpochSampler

    one = EpochSampler(10, seed=3)
    first = list(one)
    assert sorted(first) == list(range(10)) and list(one) == first
    one.set_epoch(1)
    assert list(one) != first
    one.set_epoch(0)
    shards = [EpochSampler(10, seed=3, rank=r, world=2) for r in range(2)]
    assert [len(s) for s in shards] == [5, 5]
    per_rank = [list(s) for s in shards]
    for b in range(0, 5, 2):  # global batch 4 = 2 per rank: the union is the one-process batch
        assert sorted(per_rank[0][b : b + 2] + per_rank[1][b : b + 2]) == sorted(first[2 * b : 2 * b + 4])
    odd = [list(EpochSampler(5, seed=0, rank=r, world=2)) for r in range(2)]
    assert len(odd[0]) == len(odd[1]) == 3 and set(odd[0] + odd[1]) == set(range(5))  # padded by repeating


def test_weighted_sampler_shards_keep_the_balance():
    y = np.array([0] * 90 + [1] * 10)
    shards = [list(weighted_sampler(y, seed=0, rank=r, world=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 50
    assert 0.35 < np.mean(y[shards[0] + shards[1]]) < 0.65


def test_check_options_lists_every_problem():
    from pipeline.finetune import check_options

    cfg = _cfg(
        strategy="finetune",
        head="logistic",
        focal_gamma=-1.0,
        unfreeze_every=0,
        batch_size=15,
        early_stopping=EarlyStoppingConfig("val_auc", 3),
    )
    with pytest.raises(ConfigError) as err:
        check_options(cfg, world_size=2)
    text = str(err.value)
    for needle in (
        "finetune.focal_gamma: must be ≥ 0",
        "finetune.unfreeze_every",
        "did you mean 'val_auroc'",
        "needs strategy linear-probe",
        "batch_size: 15 is the global batch",
    ):
        assert needle in text, needle
    with pytest.raises(ConfigError, match="unknown 'val_auc'"):
        finetune(Toy(), GROUPS, *_data()[:1], *_data()[:1], _data()[1], cfg, 2)


def test_weighted_sampler_with_balanced_loss_weights_warns_of_correcting_twice(caplog):
    from pipeline.finetune import check_options

    with caplog.at_level("WARNING", logger="medxfer"):
        check_options(_cfg(sampler="weighted", class_weights="balanced"))
    assert "corrects the imbalance a second time" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="medxfer"):
        for cfg in (_cfg(sampler="weighted", class_weights="none"), _cfg(sampler="uniform")):
            check_options(cfg)
    assert caplog.text == ""


def test_unfreeze_every_and_partial_freeze_come_from_the_config():
    ds, y = _data()
    seen = []
    finetune(
        Toy(),
        GROUPS,
        ds,
        ds,
        y,
        _cfg(strategy="gradual", epochs=4, unfreeze_every=2, early_stopping=EarlyStoppingConfig("val_loss", 9)),
        2,
        on_epoch=lambda e, row: seen.append(row["trainable_params"]),
    )
    assert seen[0] == seen[1] < seen[2] == seen[3]
    model = Toy()
    before = model.features[3].weight.clone()
    finetune(model, GROUPS, ds, ds, y, _cfg(strategy="partial", partial_freeze=2, epochs=1), 2)
    assert torch.equal(before, model.features[3].weight)  # stem and stage1 frozen: only the head trains


def test_compile_option_wraps_the_training_model(monkeypatch):
    calls = []

    def fake_compile(module):
        calls.append(type(module).__name__)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    ds, y = _data()
    finetune(Toy(), GROUPS, ds, ds, y, _cfg(epochs=1), 2)
    assert calls == []
    finetune(
        Toy(),
        GROUPS,
        ds,
        ds,
        y,
        _cfg(strategy="gradual", epochs=2, compile=True, early_stopping=EarlyStoppingConfig("val_loss", 9)),
        2,
    )
    assert calls == ["Toy", "Toy"]  # once per gradual phase


def _three_class(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 8, 8, generator=g)
    x[:, :, :4] += (y == 1).float().view(-1, 1, 1, 1) * 1.5  # class 1: bright top
    x[:, :, 4:] += (y == 2).float().view(-1, 1, 1, 1) * 1.5  # class 2: bright bottom
    return TensorDataset(x, y, torch.arange(n)), y.numpy()


def test_multiclass_finetune_with_focal_loss_and_weighted_sampler():
    torch.manual_seed(0)
    model = Toy()
    model.head = nn.Linear(8, 3)
    ds, y = _three_class()
    res = finetune(
        model,
        GROUPS,
        ds,
        ds,
        y,
        _cfg(epochs=6, loss="focal", sampler="weighted", early_stopping=EarlyStoppingConfig("val_loss", 9)),
        3,
    )
    assert len(res.class_weights) == 3
    assert max(res.history["val_auroc"]) > 0.8  # macro one-vs-rest AUROC
    assert res.history["train_loss"][-1] < res.history["train_loss"][0]


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logistic_head_equals_sklearn_predict_proba(n_classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.finetune import logistic_head

    g = torch.Generator().manual_seed(1)
    y = torch.tensor([i % n_classes if i % 5 else 0 for i in range(90)])  # class 0 over-represented
    x = torch.randn(90, 8, generator=g) * 3 + 5 + 4 * y.view(-1, 1).float() * torch.linspace(-1, 1, 8)
    model = Toy()
    model.head = nn.Linear(8, n_classes)
    frozen = {k: v.clone() for k, v in model.features.state_dict().items()}
    seen = []
    cfg = _cfg(strategy="linear-probe", head="logistic", logistic_c=0.5, class_weights="balanced")
    res = logistic_head(model, (x, y), (x, y), cfg, n_classes, on_epoch=lambda e, row: seen.append(e))
    weights = class_weights(y.numpy(), n_classes, "balanced")
    assert weights[0] < weights[1]
    ref = make_pipeline(
        StandardScaler(), LogisticRegression(C=0.5, max_iter=5000, class_weight=dict(enumerate(weights)))
    )
    ref.fit(x.double().numpy(), y.numpy())
    with torch.no_grad():
        probs = torch.softmax(model.head(x).double(), dim=1).numpy()
    np.testing.assert_allclose(probs, ref.predict_proba(x.double().numpy()), atol=1e-5)
    assert seen == [0] and res.epochs_run == 1 and res.history["val_auroc"][0] > 0.9
    assert res.trainable_by_phase == [8 * n_classes + n_classes]
    for k, v in model.features.state_dict().items():
        assert torch.equal(frozen[k], v), k
    with pytest.raises(DataError, match="every class needs train images"):
        logistic_head(model, (x, torch.zeros(90, dtype=torch.long)), (x, y), cfg, n_classes)


def test_feature_cache_key_tells_apart_what_the_weights_file_does_not():
    """Same weights file, same images: another depth padding, inflation or random init is another key."""
    from pipeline.adapt import build_model
    from pipeline.finetune import feature_cache_key

    def key(seed=0, **kw):
        torch.manual_seed(seed)
        model, _ = build_model("resnet18", "none", dims="3d", **kw)
        return feature_cache_key(model.features, "spec", ["a", "b"])

    base = key()
    assert key() == base  # deterministic
    assert key(depth_padding="zeros") != base  # same tensors, other structure
    assert key(inflation="i3d-center") != base
    assert key(keep_depth=2) != base  # same tensors, other depth strides
    assert key(pool="max") != base
    assert key(seed=1) != base  # weights "none" with another seed
    torch.manual_seed(0)
    model, _ = build_model("resnet18", "none", dims="3d")
    assert feature_cache_key(model.features, "spec", ["a", "c"]) != base
    assert feature_cache_key(model.features, "other-spec", ["a", "b"]) != base
