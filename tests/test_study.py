"""`medxfer study`: study-file refusals, nested train fractions, transfusion statistics, one tiny study end to end.

The end-to-end study runs two arms (ImageNet and from-scratch linear probes, 32 px, 3 epochs) at two
learning rates on one small synthetic chest X-ray cohort in a real MLflow sqlite store, then checks
the fairness invariants from what the runs logged, the parent/child runs, study.json, and resume.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fixed_key
from test_report import CHROMIUM, screenshot
from torch import nn

from pipeline.cli import main
from pipeline.ingest.splits import nested_subset
from pipeline.study import load_study
from pipeline.study.results import console_table, forest_rows, learning_curves, study_page
from pipeline.study.spec import BACKBONES

BASE = """\
experiment: study-test
data: {{source: {source}, labels: {labels}, manifest: manifest, key_file: key,
       split: {{val: 0.25, test: 0.35, seed: 0}}}}
prepare: {{dims: 2d, preset: xray, size: [32, 32], cache_dir: "{cache}"}}
model: {{backbone: tf_efficientnet_lite0, weights: imagenet, in_channels: 1}}
finetune: {{strategy: linear-probe, epochs: 3, batch_size: 16, device: cpu}}
evaluate: {{bootstrap: 50, subgroups: [], calibration: temperature}}
tracking: {{uri: "sqlite:///{db}", register_as: study-tiny}}
"""


def write_study(root: Path, body: str, source: str = "cohort/archive", labels: str = "cohort/labels.csv") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "base.yaml").write_text(
        BASE.format(source=source, labels=labels, db=root / "mlflow.db", cache=root / "cache")
    )
    path = root / "study.yaml"
    path.write_text(body)
    return path


# --------------------------------------------------------------------------- the study file
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("base: base.yaml\naxes: {weight: [none]}\n", "axes.weight: unknown axis (did you mean 'weights'?)"),
        (
            "base: base.yaml\naxes: {weights: [imagnet]}\n",
            "'imagnet' is not one of ['imagenet', 'none', 'transfusion'] (did you mean 'imagenet'?)",
        ),
        ("base: base.yaml\naxes: {strategy: [finetun]}\n", "'finetun' is not a strategy (did you mean 'finetune'?)"),
        ("base: base.yaml\naxes: {strategy: [lpft]}\n", "'lpft' is not a strategy (did you mean 'lp-ft'?)"),
        ("base: base.yaml\naxes: {backbone: [resnet19]}\n", "(did you mean 'resnet18'?)"),
        ("base: base.yaml\naxes: {prepare.dims: [2.5]}\n", "axes.prepare.dims: 2.5 is not one of ['2d', '2.5d', '3d']"),
        ("base: base.yaml\naxes: {train_fraction: [0, 0.5]}\n", "axes.train_fraction: 0: expected a share"),
        ("base: base.yaml\naxes: {seeds: [0, 0]}\n", "axes.seeds: [0, 0] names a value twice"),
        ("base: base.yaml\nlr_grid: [0.001, -1]\n", "lr_grid: expected a short list of distinct learning rates"),
        ("base: base.yaml\nlr_grids: [0.001]\n", "lr_grids: unknown key (did you mean 'lr_grid'?)"),
        (
            "base: base.yaml\naxes: {weights: [imagenet]}\nreference: {weights: none}\n",
            "reference.weights: 'none' is not one of the study's values",
        ),
        ("base: other.yaml\n", "base: other.yaml does not exist"),
        ("base: base.yaml\naxes: {prepare.dims: [3d]}\n", "prepare.size: 3d needs [D, H, W], got [32, 32]"),
    ],
)
def test_bad_study_files_exit_2_naming_the_problem(tmp_path, capsys, body, message) -> None:
    path = write_study(tmp_path, body)
    assert main(["study", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    if "lpft" in body:  # refused naming the strategies that exist
        assert "use one of ['linear-probe', 'finetune', 'partial', 'gradual', 'lp-ft']" in err


def test_every_problem_is_listed_at_once_and_nothing_heavy_is_imported(tmp_path) -> None:
    path = write_study(tmp_path, "base: base.yaml\naxes: {weights: [imagnet], seed: [1]}\nlr_grid: [0]\n")
    code = (
        "import sys\nfrom pipeline.study import load_study\nfrom pipeline.errors import ConfigError\n"
        f"try:\n    load_study({str(path)!r})\nexcept ConfigError as e:\n    print(e)\n"
        "print('heavy' if {'torch', 'mlflow'} & set(sys.modules) else 'light')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "(did you mean 'imagenet'?)" in out and "(did you mean 'seeds'?)" in out and "lr_grid:" in out
    assert out.strip().endswith("light")


def test_arms_are_the_product_of_the_axes_and_each_has_its_reference(tmp_path, capsys) -> None:
    body = "name: s1\nbase: base.yaml\naxes: {weights: [imagenet, none, transfusion], seeds: [0, 1]}\n"
    study = load_study(write_study(tmp_path, body))
    assert len(study.arms) == 6 and study.lr_grid == [1e-3, 3e-3]
    for arm in study.arms:
        ref = study.reference_of(arm)
        if arm.weights == "none":
            assert ref is None
        else:
            assert ref is not None and ref.weights == "none" and ref.seed == arm.seed
    cfg = study.configs[study.arms[0].key][3e-3]
    assert (cfg.finetune.lr, cfg.model.weights, cfg.data.train_fraction) == (3e-3, "imagenet", 1.0)
    assert study.hash("m1") == load_study(tmp_path / "study.yaml").hash("m1") != study.hash("m2")
    assert main(["study", str(tmp_path / "study.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 arms x 2 learning rates" in out and "weights=transfusion seed=1   (reference: weights=none seed=1)" in out
    (tmp_path / "afile").write_text("")
    assert main(["study", str(tmp_path / "study.yaml"), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err


def test_the_example_study_file_loads() -> None:
    study = load_study(Path(__file__).resolve().parents[1] / "configs" / "study-cxr-demo.yaml")
    assert len(study.arms) == 6 and {a.weights for a in study.arms} == {"imagenet", "none", "transfusion"}
    assert sum(study.reference_of(a) is not None for a in study.arms) == 4


def test_the_study_knows_every_registered_backbone() -> None:
    from pipeline.adapt import BACKBONES as REGISTERED

    assert set(BACKBONES) == set(REGISTERED)


# --------------------------------------------------------------------------- nested train fractions
def test_train_fraction_subsets_are_nested_stratified_and_deterministic() -> None:
    fractions = (0.1, 0.25, 0.5, 0.75, 1.0)
    for trial in range(20):
        rng = np.random.default_rng(trial)
        n = int(rng.integers(5, 80))
        labels = {f"sub-{rng.integers(1 << 60):016x}": [str(int(rng.random() < 0.3))] for _ in range(n)}
        by_label = {lab: [s for s, v in labels.items() if v == [lab]] for lab in ("0", "1")}
        subsets = [nested_subset(labels, f, seed=trial) for f in fractions]
        for small, large in itertools.pairwise(subsets):
            assert small <= large  # nested
        assert subsets[-1] == set(labels)
        for f, subset in zip(fractions, subsets, strict=True):
            for members in by_label.values():  # stratified: ceil(f × stratum) of each label, at least one
                if members:
                    assert len(subset & set(members)) == max(1, math.ceil(f * len(members) - 1e-9))
            shuffled = dict(reversed(list(labels.items())))
            assert nested_subset(shuffled, f, seed=trial) == subset  # deterministic, order-free
        other = nested_subset(labels, 0.5, seed=trial + 100)
        assert len(other) == len(subsets[2])  # another seed draws another subset of the same size
    with pytest.raises(Exception, match=r"data.train_fraction: must be in \(0, 1\]"):
        nested_subset({"a": ["0"]}, 0.0, 0)


# --------------------------------------------------------------------------- transfusion
def test_transfusion_has_each_layers_imagenet_mean_and_std_but_not_its_values() -> None:
    from pipeline.adapt import build_model

    torch.manual_seed(0)
    imagenet, _ = build_model("tf_efficientnet_lite0", "imagenet", in_channels=1)
    transfused, summary = build_model("tf_efficientnet_lite0", "transfusion", in_channels=1)
    assert summary.weights == "transfusion" and summary.weights_sha256  # the statistics' source is recorded
    pairs = list(zip(imagenet.features.modules(), transfused.features.modules(), strict=True))
    layers = [(a, b) for a, b in pairs if isinstance(a, nn.modules.conv._ConvNd | nn.Linear)]
    assert len(layers) > 40
    with torch.no_grad():
        for a, b in layers:
            wa, wb = a.weight, b.weight
            assert float(wb.mean()) == pytest.approx(float(wa.mean()), abs=1e-5 * float(wa.std()))
            assert float(wb.std()) == pytest.approx(float(wa.std()), rel=1e-5)
            assert not torch.allclose(wa, wb)  # redrawn, not copied
            assert abs(float(torch.corrcoef(torch.stack([wa.flatten(), wb.flatten()]))[0, 1])) < 0.5
        for m in transfused.features.modules():
            if isinstance(m, nn.BatchNorm2d):  # ImageNet statistics of features that no longer exist: reset
                assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
                assert torch.equal(m.weight, torch.ones_like(m.weight))


# --------------------------------------------------------------------------- the study page (constructed case)
def constructed_result() -> dict:
    """A study result by hand: an ImageNet arm at two train fractions, the smaller one worse than scratch."""

    def row(fraction: float, patients: int, auroc: float, diff: float) -> dict:
        label = f"weights=imagenet train_fraction={fraction:g}"
        return {
            "arm": label, "label": label,
            "train_fraction": fraction, "n_train_patients": patients, "lr": 0.001, "val_auroc": 0.6,
            "val_auroc_by_lr": {"0.001": 0.6}, "test_auroc": auroc, "test_auroc_ci_low": auroc - 0.1,
            "test_auroc_ci_high": auroc + 0.1, "run_id": f"r{fraction}", "reference_run_id": "r0", "report": "a.html",
            "negative_transfer": diff < -0.2,
            "delta_auroc": {"diff": diff, "ci_low": diff - 0.15, "ci_high": diff + 0.15, "p": 0.0004,
                            "method": "DeLong"},
        }  # fmt: skip

    fairness = {"n_test_units": 10, "epochs_budget": [3], "same_test_units": True, "same_epochs_budget": True,
                "manifest_hash": "m", "test_split_ids": ["t"], "test_units_sha256": ["t"],
                "test_opened": {"r0.5": 1, "r1.0": 1}}  # fmt: skip
    return {
        "study": {"name": "s", "lr_grid": [0.001]},
        "study_hash": "h",
        "mlflow_parent_run_id": "p",
        "fixed": "",
        "fairness": fairness,
        "arms": [row(0.5, 7, 0.55, -0.3), row(1.0, 14, 0.8, 0.05)],
        "recommendation": {"line": "Recommended: weights=imagenet"},
        "negative_transfer": ["weights=imagenet train_fraction=0.5"],
        "notes": [],
    }


def test_negative_transfer_is_flagged_on_the_console_and_the_page_with_its_figures() -> None:
    result = constructed_result()
    text = console_table(result)
    assert "weights=imagenet train_fraction=0.5  NEGATIVE TRANSFER" in text and "-0.300" in text and "<0.001" in text
    page = study_page(result)
    assert '<div class="note warn">Negative transfer: weights=imagenet train_fraction=0.5 ranks worse' in page
    assert "http://" not in page and "<script" not in page
    curves = learning_curves(result)
    assert list(curves) == ["weights=imagenet"] and [n for n, _ in curves["weights=imagenet"]] == [7.0, 14.0]
    assert [p for _, p in curves["weights=imagenet"]] == [
        pytest.approx((0.55, 0.45, 0.65)),
        pytest.approx((0.8, 0.7, 0.9)),
    ]
    assert [label for label, _ in forest_rows(result)] == [r["label"] for r in result["arms"]]
    assert page.count("data:image/png;base64,") == 2 and "against labelled training patients" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI installs Debian `chromium`)")
def test_the_study_page_renders_in_headless_chromium(tmp_path) -> None:
    from PIL import Image

    page = tmp_path / "study.html"
    page.write_text(study_page(constructed_result()), encoding="utf-8")
    for width in (1200, 390):
        png = tmp_path / f"shot-{width}.png"
        log = screenshot(page, png, width, 1800)
        assert "Uncaught" not in log, log[-2000:]
        img = Image.open(png).convert("RGB")
        assert len(img.getcolors(maxcolors=1 << 20) or []) > 50, "too few colours: the figures did not render"


# --------------------------------------------------------------------------- one tiny study end to end
@pytest.fixture(scope="module")
def study_run(tmp_path_factory) -> dict:
    """The tiny study, killed (SIGKILL) while its second training runs, then the same command run to the end."""
    import os
    import threading

    from pipeline.synthetic import make_cohort

    root = tmp_path_factory.mktemp("study")
    make_cohort(root / "cohort", kind="cxr2d", n=40, seed=3, positive_fraction=0.5)
    fixed_key(root / "key")
    body = "name: tiny\nbase: base.yaml\naxes: {weights: [none, imagenet]}\nlr_grid: [1.0e-3, 1.0e-2]\n"
    path = write_study(root, body)
    out = root / "out"
    argv = ["study", str(path), "--out", str(out)]
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    seen = ""
    assert proc.stderr is not None
    for line in proc.stderr:
        seen += line
        # the first training has finished and been tagged; the second has checkpointed epoch 1 (it logs, then
        # saves the epoch's training state, so the line of epoch 2 comes after the checkpoint of epoch 1)
        if "[2/4] training" in seen and line.startswith("epoch   2/3"):
            proc.kill()  # kill -9: no cleanup, the second run stays RUNNING
            break
    proc.wait()
    watchdog.cancel()
    assert proc.returncode == -9, seen[-2000:]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    at_kill = {
        r["run_id"]: (r["status"], r["tags"].get("study_trained")) for r in _runs(uri) if "study_arm" in r["tags"]
    }
    assert main(["-q", *argv]) == 0
    first = json.loads((out / "study.json").read_text())
    return {"root": root, "path": path, "out": out, "uri": uri, "first": first, "at_kill": at_kill}


def _runs(uri: str) -> list[dict]:
    from pipeline import tracking

    tracking.connect(uri, existing=True)
    return tracking.search_runs(tracking.experiment_id("study-test"), max_results=1000)


@pytest.mark.slow
def test_a_tiny_study_is_fair_and_recorded(study_run, tmp_path) -> None:
    from pipeline import tracking
    from pipeline.ingest import load_manifest

    result = json.loads((study_run["out"] / "study.json").read_text())
    runs = {r["run_id"]: r for r in _runs(study_run["uri"])}
    parents = [r for r in runs.values() if r["tags"].get("kind") == "study"]
    assert len(parents) == 1 and parents[0]["run_id"] == result["mlflow_parent_run_id"]
    children = [r for r in runs.values() if r["tags"].get("mlflow.parentRunId") == result["mlflow_parent_run_id"]]
    assert len(children) == 4 and len(runs) == 5  # 2 arms x 2 learning rates and the parent: nothing orphaned
    assert all(r["status"] == "FINISHED" and r["tags"]["study_trained"] == "1" for r in children)
    # killed in its second training: the first was reused; the second, left RUNNING, continued in the same run
    at_kill, first = study_run["at_kill"], study_run["first"]
    assert len(at_kill) == 2 and sum(trained == "1" for _, trained in at_kill.values()) >= 1
    interrupted = [rid for rid, (status, trained) in at_kill.items() if status == "RUNNING" and trained != "1"]
    assert first["reused_trainings"] + first["resumed_trainings"] == 2 and first["resumed_trainings"] == len(
        interrupted
    )
    for rid in interrupted:  # (the kill lands in epoch 2 or 3 of 3: this is the case but for a rare race)
        run = tracking.get_run(rid)
        assert run["tags"]["resumed_at_epoch"] in ("2", "3")
        assert len(run["history"]["epoch_seconds"]) == int(run["metrics"]["epochs_run"])  # no epoch logged twice
    assert {r["tags"]["study_hash"] for r in children} == {result["study_hash"]} == {parents[0]["tags"]["study_hash"]}
    assert sorted(r["tags"]["study_role"] for r in children) == ["arm", "arm", "lr-trial", "lr-trial"]
    assert {r["params"]["finetune.epochs"] for r in children} == {"3"}  # the same epoch budget
    # the lr of each arm is the argmax of the validation AUROC of its kept epoch, over the grid
    for row in result["arms"]:
        val = {}
        for lr_key, rid in row["trial_runs"].items():
            run = tracking.get_run(rid)
            val[float(lr_key)] = run["history"]["val_auroc"][int(run["metrics"]["best_epoch"]) - 1]
        assert row["lr"] == max(val, key=val.get) and row["val_auroc"] == pytest.approx(max(val.values()))
        assert runs[row["run_id"]]["tags"]["study_role"] == "arm"
        assert row["probe_epochs"] == 0  # linear-probe arms: no lp-ft probe before the budget
    # only the selected runs were evaluated, each exactly once; the others never opened the test split
    selected = {row["run_id"] for row in result["arms"]}
    for r in children:
        assert ("test_auroc" in r["metrics"]) == (r["run_id"] in selected)
    log = json.loads((study_run["root"] / "manifest" / "test_evaluations.json").read_text())
    assert sorted(rid for entry in log.values() for rid in entry["runs"]) == sorted(selected)
    assert result["fairness"]["test_opened"] == {r["run_id"]: int(r["run_id"] in selected) for r in children}
    # the same test units in every arm's logged predictions: the manifest's test split
    manifest = load_manifest(study_run["root"] / "manifest")
    test_ids = set(manifest.loc[manifest["split"] == "test", "image_id"])
    for rid in selected:
        preds = pd.read_parquet(tracking.download_artifacts(rid, "predictions/test.parquet", tmp_path / rid))
        assert set(preds["image_id"]) == test_ids
    assert result["fairness"]["same_test_units"] is True and result["fairness"]["n_test_units"] == len(test_ids)
    # the paired comparison: ImageNet arm − the from-scratch arm, the difference of their logged test AUROCs
    by_weights = {row["weights"]: row for row in result["arms"]}
    imnet, scratch = by_weights["imagenet"], by_weights["none"]
    assert imnet["reference_run_id"] == scratch["run_id"] and scratch["delta_auroc"] is None
    expected = runs[imnet["run_id"]]["metrics"]["test_auroc"] - runs[scratch["run_id"]]["metrics"]["test_auroc"]
    assert imnet["delta_auroc"]["diff"] == pytest.approx(expected, abs=1e-12)
    assert imnet["negative_transfer"] == (imnet["delta_auroc"]["ci_high"] < 0)
    best = max(result["arms"], key=lambda r: r["val_auroc"])
    assert result["recommendation"]["run_id"] == best["run_id"]
    assert result["recommendation"]["line"].startswith("Recommended (best validation AUROC")
    # each arm: its own evaluated, registered-style run with an audit report; the parent holds the study files
    for row in result["arms"]:
        assert (study_run["out"] / "arms" / row["report"]).is_file()
        assert "report" in tracking.list_artifacts(row["run_id"])
    assert {"study.json", "study.html", "study"} <= set(tracking.list_artifacts(result["mlflow_parent_run_id"]))
    # only the recommended arm's model is registered: models:/study-tiny/latest is the study's answer
    import mlflow

    versions = mlflow.MlflowClient().search_model_versions("name='study-tiny'")
    assert [v.run_id for v in versions] == [result["recommendation"]["run_id"]]
    page = (study_run["out"] / "study.html").read_text()
    assert "http://" not in page and "<script" not in page and "Learning-rate selection" in page
    assert page.count("data:image/png;base64,") == 1 and "red: CI below 0" in page  # the forest plot only
    text = page + json.dumps(result)
    assert not any(s in text for s in manifest["subject_id"]) and not any(i in text for i in manifest["image_id"])


@pytest.mark.slow
def test_rerunning_a_study_reuses_finished_arms_and_continues_the_rest(study_run) -> None:
    import mlflow

    before = {r["run_id"] for r in _runs(study_run["uri"])}
    log_file = study_run["root"] / "manifest" / "test_evaluations.json"
    opened = log_file.read_text()
    argv = ["-q", "study", str(study_run["path"]), "--out", str(study_run["out"])]
    assert main(argv) == 0
    assert {r["run_id"] for r in _runs(study_run["uri"])} == before  # nothing trained or evaluated again
    assert log_file.read_text() == opened
    assert json.loads((study_run["out"] / "study.json").read_text())["reused_trainings"] == 4
    # stopped between the end of a training and its study_trained tag: recognised as trained, tagged, not redone
    result = json.loads((study_run["out"] / "study.json").read_text())
    trial = next(r for r in _runs(study_run["uri"]) if r["tags"].get("study_role") == "lr-trial")
    mlflow.MlflowClient().delete_tag(trial["run_id"], "study_trained")
    assert main(argv) == 0
    again = json.loads((study_run["out"] / "study.json").read_text())
    assert {r["run_id"] for r in _runs(study_run["uri"])} == before and again["reused_trainings"] == 4
    assert mlflow.MlflowClient().get_run(trial["run_id"]).data.tags["study_trained"] == "1"
    assert [r["run_id"] for r in again["arms"]] == [r["run_id"] for r in result["arms"]]  # same selection
    assert log_file.read_text() == opened  # the selected runs were not evaluated again


@pytest.mark.slow
def test_train_fraction_keeps_val_and_test_whole_and_trains_on_a_nested_subset(study_run) -> None:
    from pipeline.run import load_cohort

    manifest = study_run["root"] / "manifest"
    full = load_cohort(manifest)
    half, quarter = load_cohort(manifest, 0.5, seed=0), load_cohort(manifest, 0.25, seed=0)
    for name in ("val", "test"):
        assert half.split(name).equals(full.split(name)) and quarter.split(name).equals(full.split(name))
    train = [set(c.split("train")["subject_id"]) for c in (quarter, half, full)]
    assert train[0] < train[1] < train[2]
    for c, f in ((quarter, 0.25), (half, 0.5)):
        for label in full.classes:

            def patients(frame: pd.DataFrame, label: str = label) -> int:
                return frame.loc[frame["label"] == label, "subject_id"].nunique()

            assert patients(c.split("train")) == math.ceil(f * patients(full.split("train")) - 1e-9)
