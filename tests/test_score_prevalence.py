"""`medxfer score --prevalence P`: prior-shift recalibration (Saerens et al. 2002) of a binary model's probabilities."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fixed_key

from pipeline import tracking
from pipeline.adapt import CalibratedNet, build_model
from pipeline.cli import main
from pipeline.errors import ConfigError
from pipeline.evaluate import brier, ece
from pipeline.prepare import make_spec
from pipeline.run import log_packaged
from pipeline.stats import auroc, check_prevalence, prior_shift
from pipeline.synthetic import make_cohort


def test_the_shift_has_its_closed_form_and_undoes_itself():
    # π = 0.1 → π' = 0.375: odds × (0.375/0.625)/(0.1/0.9) = 5.4, so p = 0.5 → 5.4/6.4 = 27/32
    assert prior_shift(0.5, 0.1, 0.375) == pytest.approx(27 / 32, abs=1e-15)
    p = np.array([0.0, 0.01, 0.2, 0.5, 0.93, 1.0, np.nan])
    np.testing.assert_allclose(prior_shift(p, 0.3, 0.3), p)  # the same prior: nothing moves
    back = prior_shift(prior_shift(p, 0.1, 0.375), 0.375, 0.1)
    np.testing.assert_allclose(back, p, atol=1e-12)
    odds = lambda q: q / (1 - q)  # noqa: E731
    np.testing.assert_allclose(odds(prior_shift(p[1:5], 0.1, 0.375)), odds(p[1:5]) * 5.4)
    assert np.isnan(prior_shift(np.nan, 0.1, 0.375))


def _shifted_site(n=4000, seed=0):
    """Scores from N(±1, 1) class densities; the model's p(1|x) is exact under π = 0.1, the site has π' = 0.375."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.375).astype(int)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    likelihood_ratio = np.exp(2 * x)  # N(1, 1) / N(-1, 1) densities at x
    p = 0.1 * likelihood_ratio / (0.1 * likelihood_ratio + 0.9)
    return y, p


def test_auroc_is_unchanged_and_calibration_improves_on_a_prior_shifted_site():
    y, p = _shifted_site()
    adjusted = prior_shift(p, 0.1, 0.375)
    assert auroc(y, adjusted) == auroc(y, p)
    np.testing.assert_array_equal(np.argsort(adjusted, kind="stable"), np.argsort(p, kind="stable"))
    raw_ece, adj_ece = ece(np.column_stack([1 - p, p]), y), ece(np.column_stack([1 - adjusted, adjusted]), y)
    assert raw_ece > 0.08 and adj_ece < 0.02, (raw_ece, adj_ece)
    assert brier(np.column_stack([1 - adjusted, adjusted]), y) < brier(np.column_stack([1 - p, p]), y)
    assert abs(adjusted.mean() - y.mean()) < 0.02 < abs(p.mean() - y.mean())  # calibration-in-the-large


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2", "nan"])
def test_a_prevalence_outside_0_1_exits_2_before_torch_or_mlflow_load(value):
    code = (
        "import sys\nfrom pipeline.cli import main\n"
        f"rc = main(['score', 'archive', '--model', 'models:/m/1', '--out', 'o.parquet', '--prevalence', {value!r}])\n"
        "print(rc, sorted({'torch', 'mlflow'} & set(sys.modules)))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "2 []", run.stdout
    assert "must be strictly between 0 and 1" in run.stderr and "Traceback" not in run.stderr
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        check_prevalence(float(value))


def _register(classes: list[str], name: str, **extra) -> str:
    torch.manual_seed(0)
    net, _ = build_model("tf_efficientnet_lite0", "none", num_classes=len(classes), in_channels=1, dims="2d")
    spec = make_spec("2d", "xray", [64, 64], {"mean": (0.5,), "std": (0.5,)})
    meta = {
        "prepare": spec.as_dict(),
        "classes": classes,
        "temperature": 1.0,
        "operating_point": {"rule": "youden", "threshold": 0.5},
        "train_run_id": "test",
        **extra,
    }
    with tracking.start_run("prevalence-tests"):
        info = log_packaged(CalibratedNet(net, 1.0), np.zeros((1, 1, 64, 64), np.float32), meta, name)
    return f"models:/{name}/{info['version']}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Registered random-init lite0 models (with, without a training prevalence; 3-class) and an 8-patient archive."""
    root = tmp_path_factory.mktemp("prevalence")
    uri = tracking.connect(f"sqlite:///{root / 'mlflow.db'}")
    cohort = make_cohort(root / "cxr", kind="cxr2d", n=8, seed=3)
    return {
        "uri": uri,
        "binary": _register(["0", "1"], "prev", prevalence_train=0.1),
        "old": _register(["0", "1"], "old"),
        "tri": _register(["a", "b", "c"], "tri3", prevalence_train=0.1),
        "source": str(cohort.archive_dir),
        "labels": str(cohort.labels_csv),
        "key": str(fixed_key(root / "key")),
        "root": root,
    }


def _cli(setup, model, out, *extra):
    args = ["-q", "score", setup["source"], "--model", setup[model], "--out", str(out)]
    return main([*args, "--tracking-uri", setup["uri"], "--key-file", setup["key"], "--batch-size", "4", *extra])


def test_score_with_prevalence_and_labels_reports_both_calibrations(setup, capsys):
    out = setup["root"] / "pred.parquet"
    assert _cli(setup, "binary", out, "--labels", setup["labels"], "--prevalence", "0.375") == 0
    console = capsys.readouterr().out
    table = pd.read_parquet(out)
    ok = table[table["status"] == "ok"]
    assert len(ok) >= 8 and list(table.columns[3:6]) == ["prob", "prob_unadjusted", "decision"]
    np.testing.assert_allclose(ok["prob"], prior_shift(ok["prob_unadjusted"], 0.1, 0.375), rtol=1e-6)
    assert (ok["decision"] == np.where(ok["prob"] >= 0.5, "1", "0")).all()  # frozen threshold, adjusted prob
    metrics = json.loads(Path(f"{out}.metrics.json").read_text())
    assert metrics["prior_shift"]["train_prevalence"] == 0.1 and metrics["prior_shift"]["prevalence"] == 0.375
    ev = metrics["external_validation"]
    assert ev["n"] == len(ok)  # every scored unit is labelled
    assert {"ece", "ece_unadjusted", "brier", "brier_unadjusted", "auroc"} <= set(ev)
    assert ev["ece"] != ev["ece_unadjusted"]
    assert "prior shift: probabilities moved from the training prevalence 0.100 to the stated 0.375" in console
    assert f"unadjusted ECE {ev['ece_unadjusted']:.3f}" in console

    plain = setup["root"] / "plain.parquet"
    assert _cli(setup, "binary", plain, "--labels", setup["labels"]) == 0
    capsys.readouterr()
    base = pd.read_parquet(plain)
    assert "prob_unadjusted" not in base.columns
    np.testing.assert_array_equal(base["prob"].dropna(), ok["prob_unadjusted"])  # the model's own, unchanged
    ev_plain = json.loads(Path(f"{plain}.metrics.json").read_text())["external_validation"]
    assert ev_plain["auroc"] == pytest.approx(ev["auroc"]) and ev_plain["ece"] == pytest.approx(ev["ece_unadjusted"])


def test_prevalence_needs_a_binary_model_that_records_its_training_prevalence(setup, capsys):
    assert _cli(setup, "old", setup["root"] / "o.parquet", "--prevalence", "0.3") == 1
    err = capsys.readouterr().err
    assert "records no training prevalence (metadata prevalence_train" in err and "Fix: evaluate" in err
    assert _cli(setup, "tri", setup["root"] / "t.parquet", "--prevalence", "0.3") == 2
    assert "prior-shift recalibration is for binary models" in capsys.readouterr().err
    assert not (setup["root"] / "o.parquet").exists() and not (setup["root"] / "t.parquet").exists()


@pytest.mark.slow  # trains (1-epoch cached linear probe at 32 px) and evaluates a tiny model: ~30 s on 2 shared cores
def test_evaluate_records_the_training_prevalence_that_score_shifts_from(tmp_path, capsys):
    import yaml
    from conftest import disc_cohort

    from pipeline.config import load_config
    from pipeline.run import evaluate, train
    from pipeline.score import load_packaged

    ft = {"strategy": "linear-probe", "epochs": 1, "batch_size": 8, "device": "cpu"}
    raw = disc_cohort(tmp_path, "prevalence-e2e", ft, f"sqlite:///{tmp_path / 'mlflow.db'}")
    raw["evaluate"] = {"bootstrap": 20, "subgroups": [], "calibration": "none"}
    raw["tracking"]["register_as"] = "prev-e2e"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "c.yaml")
    run_id = train(cfg, progress=False)
    evaluate(cfg, run_id, progress=False)
    pkg = load_packaged("models:/prev-e2e/1")
    logged = tracking.get_run(run_id)["metrics"]["prevalence_train"]
    assert pkg.train_prevalence == pkg.meta["prevalence_train"] == pytest.approx(logged) and 0 < logged < 1
    out = tmp_path / "scored.parquet"
    args = ["-q", "score", str(tmp_path / "archive"), "--model", "models:/prev-e2e/1", "--out", str(out)]
    args += ["--labels", str(tmp_path / "labels.csv"), "--key-file", raw["data"]["key_file"], "--prevalence", "0.25"]
    assert main(args) == 0
    table = pd.read_parquet(out)
    np.testing.assert_allclose(table["prob"], prior_shift(table["prob_unadjusted"], logged, 0.25), rtol=1e-6)
    assert "unadjusted ECE" in capsys.readouterr().out
