"""lp-ft (Kumar et al. 2022): the probe is linear-probe's exactly, then every group trains; resume in either phase."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_finetune_resume import GROUPS, TIMING, Augmented, DropToy
from test_study import write_study

from pipeline.cli import main
from pipeline.config import EarlyStoppingConfig, FinetuneConfig, from_dict
from pipeline.errors import ConfigError
from pipeline.finetune import finetune, linear_probe, lp_ft
from pipeline.finetune.checkpoint import load_state
from pipeline.finetune.options import check_options
from pipeline.study import load_study

PROBE = 3  # probe epochs
BACKBONE = [k for k in DropToy().state_dict() if not k.startswith("head.")]


def _cfg(**kw):
    base = dict(
        strategy="lp-ft",
        lpft_probe_epochs=PROBE,
        lpft_probe_lr=2e-2,
        epochs=2,
        lr=1e-3,
        batch_size=8,
        device="cpu",
        bn="frozen",
        early_stopping=EarlyStoppingConfig("val_loss", 9),
    )
    base.update(kw)
    return FinetuneConfig(**base)


def _features(model, ds):
    """Pooled features of the frozen toy backbone (eval mode), as the cached linear probe uses them."""
    model.eval()
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        return model.features(x), torch.as_tensor([ds[i][1] for i in range(len(ds))])


def _lpft(cfg, cached, checkpoint=None, resume=False, raise_at=None):
    """A toy lp-ft run; returns (model, result, snapshots of the model as each phase starts)."""
    torch.manual_seed(0)
    model = DropToy()
    train_ds, val_ds = Augmented(augment=not cached), Augmented(seed=1, augment=False)
    snaps = {}

    def on_phase(phase, first_epoch):
        snaps[phase] = (first_epoch, copy.deepcopy(model.state_dict()))

    def on_epoch(epoch, row):
        snaps.setdefault("rows", []).append((epoch, row["lpft_phase"], row["trainable_params"]))
        if epoch == raise_at:
            raise KeyboardInterrupt

    feats = (_features(model, train_ds), _features(model, val_ds)) if cached else None
    res = lp_ft(
        model,
        GROUPS,
        train_ds,
        val_ds,
        train_ds.y.numpy(),
        cfg,
        2,
        on_epoch=on_epoch,
        on_phase=on_phase,
        checkpoint=checkpoint,
        resume=resume,
        features=feats,
    )
    return model, res, snaps


def _probe_alone(cached):
    """strategy linear-probe with the probe's seed, epochs and lr: what lp-ft's first phase must equal."""
    torch.manual_seed(0)
    model = DropToy()
    train_ds, val_ds = Augmented(augment=not cached), Augmented(seed=1, augment=False)
    cfg = _cfg(strategy="linear-probe", epochs=PROBE, lr=2e-2, lpft_probe_lr=None)
    if cached:
        res = linear_probe(model, _features(model, train_ds), _features(model, val_ds), cfg, 2)
    else:
        res = finetune(model, GROUPS, train_ds, val_ds, train_ds.y.numpy(), cfg, 2)
    return model, res


@pytest.mark.parametrize("cached", [True, False])
def test_the_probe_phase_is_linear_probe_and_then_every_group_trains(cached):
    torch.manual_seed(0)
    initial = DropToy().state_dict()
    probed, probe = _probe_alone(cached)
    model, res, snaps = _lpft(_cfg(), cached)
    first, at_ft = snaps["finetune"]
    assert first == PROBE and snaps["probe"][0] == 0
    for key in BACKBONE:  # the probe froze the backbone: weights and BatchNorm statistics as they came in
        assert torch.equal(at_ft[key], initial[key]), key
    for key in ("head.weight", "head.bias"):  # the fine-tuning starts from linear-probe's own head, exactly
        assert torch.equal(at_ft[key], probed.state_dict()[key]), key
        assert not torch.equal(at_ft[key], initial[key]), key
    n_head, n_all = 8 * 2 + 2, sum(p.numel() for p in DropToy().parameters())
    assert res.trainable_by_phase == [n_head, n_all]
    rows = snaps["rows"]
    assert [(e, ph) for e, ph, _ in rows] == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1)]
    assert [n for *_, n in rows] == [n_head] * PROBE + [n_all] * 2
    assert res.history["val_loss"][:PROBE] == probe.history["val_loss"]  # the probe's epochs, as linear-probe's
    assert res.history["lpft_phase"] == [0.0] * PROBE + [1.0] * 2 and res.epochs_run == PROBE + 2
    assert PROBE <= res.best_epoch < PROBE + 2  # the kept model is a fine-tuned one
    final = model.state_dict()
    for _, prefixes in GROUPS:  # during fine-tuning every group trains
        keys = [k for k in final if any(k.startswith(p + ".") for p in prefixes) and final[k].is_floating_point()]
        assert any(not torch.equal(final[k], at_ft[k]) for k in keys), prefixes


@pytest.mark.parametrize(
    ("cached", "raise_at"),
    [
        (True, 1),  # in the probe (cached features)
        (False, 1),  # in the probe (through the loop, augmented)
        (True, PROBE),  # the first fine-tuning epoch: the checkpoint still holds the finished probe
        (False, PROBE + 1),  # mid fine-tuning
    ],
)
def test_resume_in_either_phase_equals_the_uninterrupted_run(tmp_path, cached, raise_at):
    full_model, full, _ = _lpft(_cfg(), cached)
    ckpt = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        _lpft(_cfg(), cached, checkpoint=ckpt, raise_at=raise_at)
    phase = load_state(ckpt)["extra"]["lpft"]["phase"]
    assert phase == ("probe" if raise_at <= PROBE else "finetune")
    model, res, _ = _lpft(_cfg(), cached, checkpoint=ckpt, resume=True)
    assert res.resumed_from == raise_at and res.epochs_run == full.epochs_run == PROBE + 2
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    for key, values in full.history.items():
        if key not in TIMING:
            assert res.history[key] == pytest.approx(values, nan_ok=True), key
    assert (res.best_epoch, res.trainable_by_phase) == (full.best_epoch, full.trainable_by_phase)
    with pytest.raises(ConfigError, match=r"finetune.lpft_probe_epochs: 3 then, 4 now"):
        _lpft(_cfg(lpft_probe_epochs=4), cached, checkpoint=ckpt, resume=True)


def test_lpft_options_are_validated_with_every_problem_named():
    with pytest.raises(ConfigError) as err:
        check_options(_cfg(lpft_probe_epochs=0, lpft_probe_lr=-1.0, head="logistic"))
    text = str(err.value)
    assert "finetune.lpft_probe_epochs: must be ≥ 1 epoch of linear probe before fine-tuning, got 0" in text
    assert "finetune.lpft_probe_lr: must be > 0, or null" in text
    assert "it needs strategy linear-probe, got 'lp-ft'" in text
    with pytest.raises(ConfigError, match=r"finetune.lpft_probe_epoch: unknown key \(did you mean 'lpft_probe_epochs'"):
        from_dict({"finetune": {"strategy": "lp-ft", "lpft_probe_epoch": 3}})
    with pytest.raises(ConfigError, match=r"'lpft' is not one of .*\(did you mean 'lp-ft'\?\)"):
        from_dict({"finetune": {"strategy": "lpft"}})
    with pytest.raises(ConfigError, match=r"call pipeline\.finetune\.lp_ft, not finetune"):
        finetune(DropToy(), GROUPS, Augmented(), Augmented(), Augmented().y.numpy(), _cfg(), 2)


def test_lpft_warns_when_fine_tuning_is_faster_than_the_probe(caplog):
    check_options(_cfg(lr=1e-3, lpft_probe_lr=1e-2))
    assert "lp-ft fine-tunes" not in caplog.text
    check_options(_cfg(lr=1e-2, lpft_probe_lr=1e-3))
    assert "lp-ft fine-tunes at lr 0.01, above the probe's 0.001" in caplog.text


def test_a_study_accepts_lp_ft_arms(tmp_path, capsys):
    path = write_study(tmp_path, "name: s\nbase: base.yaml\naxes: {strategy: [linear-probe, lp-ft]}\n")
    study = load_study(path)
    assert [a.strategy for a in study.arms] == ["linear-probe", "lp-ft"]
    assert study.configs[study.arms[1].key][1e-3].finetune.strategy == "lp-ft"
    assert main(["study", str(path), "--dry-run"]) == 0
    assert "strategy=lp-ft" in capsys.readouterr().out


# --- through `train` / `medxfer train --resume` with a real manifest and MLflow -------------------


@pytest.mark.slow  # trains a scratch EfficientNet-Lite0 at 32 px three times (~60-90 s on 2 shared cores)
def test_train_lp_ft_logs_both_phases_and_resumes_in_the_fine_tuning(tmp_path, monkeypatch, capsys):
    import yaml
    from conftest import disc_cohort
    from test_finetune_resume import _epoch_history, _state_dict

    from pipeline import tracking
    from pipeline.config import load_config
    from pipeline.run import checkpoint_path, train

    ft = {
        "strategy": "lp-ft",
        "lpft_probe_epochs": 2,
        "lpft_probe_lr": 1e-2,
        "epochs": 2,
        "lr": 1e-3,
        "batch_size": 4,
        "device": "cpu",
        "early_stopping": {"metric": "val_loss", "patience": 9},
    }
    raw = disc_cohort(tmp_path, "lpft-resume", ft, f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    reference = train(load_config(path), progress=False)
    run = tracking.get_run(reference)
    assert [m for m in run["history"]["lpft_phase"]] == [0.0, 0.0, 1.0, 1.0]
    head = run["history"]["trainable_params"]
    assert head[0] == head[1] < head[2] == head[3]  # the head alone, then every layer
    summary = json.loads((tracking.download_artifacts(reference, "training_summary.json", tmp_path)).read_text())
    assert summary["trainable_by_phase"] == [head[0], head[2]]

    logged = tracking.log_metrics

    def log_then_die(metrics, step=None):  # epoch 4 (the second fine-tuning one) is logged, never checkpointed
        logged(metrics, step=step)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.run.tracking.log_metrics", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(path), progress=False)
    monkeypatch.setattr("pipeline.run.tracking.log_metrics", logged)
    run_id = next(r for r in tracking.search_runs(run["experiment_id"]) if r["run_id"] != reference)["run_id"]
    assert load_state(checkpoint_path(tmp_path / "manifest", run_id))["extra"]["lpft"]["phase"] == "finetune"
    assert main(["-q", "train", str(path), "--resume", run_id]) == 0
    assert capsys.readouterr().out.strip() == run_id
    history, expected = _epoch_history(run_id), _epoch_history(reference)
    for key, (steps, values) in history.items():
        assert steps == [1, 2, 3, 4], key  # each epoch exactly once
        if key != "epoch_seconds":
            assert values == expected[key][1], key
    for key, value in _state_dict(reference).items():
        assert torch.equal(value, _state_dict(run_id)[key]), key


def test_the_model_card_names_both_phases():
    from pipeline.report.facts import Facts
    from pipeline.report.sections import model_section

    ft = {"strategy": "lp-ft", "lpft_probe_epochs": 4, "lpft_probe_lr": None, "head_lr": 0.01, "lr": 0.001}
    adaptation = {"total_params": 3372994}
    facts = Facts(config={"finetune": ft}, adaptation=adaptation, training={"trainable_by_phase": [1282, 3372994]})
    card = json.dumps(model_section(facts), ensure_ascii=False)
    assert "up to 4 epochs of the head alone at lr 0.01, then every layer from that head at lr 0.001" in card
    assert "Trainable parameters per phase" in card and "100.0%" in card
    from pipeline.report.sections import training_section

    trained = Facts(config={"finetune": {**ft, "epochs": 10}}, metrics={"epochs_run": 14}, training={"history": {}})
    assert '"4 probe + 10 / 14"' in json.dumps(training_section(trained))
    linear = {**ft, "strategy": "linear-probe"}
    probe = json.dumps(model_section(Facts(config={"finetune": linear}, adaptation=adaptation)))
    assert "lp-ft probe" not in probe
