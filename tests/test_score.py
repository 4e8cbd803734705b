"""Batch scoring on a real synthetic DICOM archive with junk files, a registered tiny model, Ray and kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from pipeline import tracking
from pipeline.adapt import CalibratedNet, build_model, write_package
from pipeline.cli import main
from pipeline.errors import ConfigError, DataError
from pipeline.evaluate import DomainStats, compare_domain, reference_stats
from pipeline.ingest import load_manifest
from pipeline.prepare import make_spec, prepare_image, spec_from_dict
from pipeline.records import PrepareSpec
from pipeline.run import log_packaged
from pipeline.score import ENGINES, load_packaged, score
from pipeline.score.adabn import adapt_batchnorm
from pipeline.score.engines import get_engine
from pipeline.score.local_engine import run_local
from pipeline.score.ray_engine import ray_runtime_env
from pipeline.synthetic import make_cohort

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"batch_size": 2, "chunk_size": 3, "progress": False}
JUNK = {"empty.dcm": "empty-file", "MRN7654321_notes.txt": "not-dicom"}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict:
    """9 chest X-rays of 8 patients, 8 CT series (3D units), a 2D MR slice, and junk files (one with a fake MRN)."""
    root = tmp_path_factory.mktemp("score-archive")
    cxr = make_cohort(root / "cxr", kind="cxr2d", n=8, seed=3)
    ct = make_cohort(root / "ct", kind="ct3d", n=4, seed=3)
    shutil.copytree(ct.archive_dir, cxr.archive_dir / "ct")
    (cxr.archive_dir / "empty.dcm").write_bytes(b"")
    (cxr.archive_dir / "MRN7654321_notes.txt").write_text("not an image\n")
    mr = cxr.archive_dir / "sub-99" / "anat"
    mr.mkdir(parents=True)
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((32, 32, 1), dtype=np.float32), np.eye(4)),
        mr / "sub-99_T1w.nii.gz",
    )
    return {
        "root": root,
        "source": cxr.archive_dir,
        "labels": cxr.labels_csv,
        "key": root / "keys" / "k.key",
        "patient_ids": pd.read_csv(cxr.labels_csv, dtype=str)["patient_id"].tolist(),
    }


def _log(net: nn.Module, classes: list[str], name: str, threshold: float | None = 0.22, **extra) -> str:
    spec = make_spec("2d", "xray", [64, 64], {"mean": (0.5,), "std": (0.5,)})
    meta = {
        "prepare": spec.as_dict(),
        "classes": classes,
        "temperature": 1.5,
        "operating_point": {"rule": "youden", "threshold": threshold},
        "train_run_id": "test",
        **extra,
    }
    with tracking.start_run("score-tests"):
        info = log_packaged(CalibratedNet(net, 1.5), np.zeros((1, 1, 64, 64), np.float32), meta, name)
    return f"models:/{name}/{info['version']}"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Ray actors run torch on one thread; the local engine does too here, so results are bit-identical."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Registered random-init tf_efficientnet_lite0 models (64×64, 2D xray) in a sqlite MLflow store.

    The binary one carries `reference_stats` far from anything the xray preset produces, so
    scoring with it must warn about domain shift; the 3-class one carries none.
    """
    root = tmp_path_factory.mktemp("score-mlflow")
    uri = tracking.connect(f"sqlite:///{root / 'mlflow.db'}")
    torch.manual_seed(0)
    net, _ = build_model("tf_efficientnet_lite0", "none", num_classes=2, in_channels=1, dims="2d")
    tri, _ = build_model("tf_efficientnet_lite0", "none", num_classes=3, in_channels=1, dims="2d")
    far = {"n": 50, "intensity_mean": [5.0, 0.1], "intensity_std": [0.5, 0.1]}
    return {
        "uri": uri,
        "binary": _log(net, ["0", "1"], "tiny", reference_stats=far),
        "tri": _log(tri, ["a", "b", "c"], "tri"),
    }


def _score(models: dict, archive: dict, out: Path, model: str = "binary", **kw) -> dict:
    args = {**SETTINGS, **kw}
    return score(models[model], archive["source"], out, tracking_uri=models["uri"], key_file=archive["key"], **args)


@pytest.fixture(scope="module")
def scored(models, archive, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("score-out") / "predictions.parquet"
    result = _score(models, archive, out, labels=archive["labels"])
    return {
        "result": result,
        "out": out,
        "table": pd.read_parquet(out),
        "metrics": json.loads(Path(f"{out}.metrics.json").read_text()),
    }


def test_every_unit_and_junk_file_gets_one_row(scored):
    t, r = scored["table"], scored["result"]
    assert list(t.columns) == [
        "image_id",
        "subject_id",
        "modality",
        "prob",
        "decision",
        "status",
        "reason",
        "detail",
        "source_ref",
        "model_uri",
        "model_version",
    ]
    assert (r["n_ok"], r["n_failed"]) == (9, 8 + 1 + len(JUNK))
    ok = t[t["status"] == "ok"]
    assert set(ok["modality"]) <= {"DX", "CR"}
    assert ok["prob"].between(0, 1).all()
    assert (ok["decision"] == np.where(ok["prob"] >= 0.22, "1", "0")).all()
    assert set(ok["decision"]) == {"0", "1"}  # the threshold splits this archive, so the check bites
    assert t["image_id"][t["image_id"] != ""].is_unique
    assert set(t["model_version"]) == {"1"}
    assert set(t["model_uri"]) == {"models:/tiny/1"}


def test_junk_files_are_failure_rows_without_their_path(scored):
    t = scored["table"]
    junk = t[t["image_id"] == ""]
    assert sorted(junk["reason"]) == sorted(JUNK.values())
    assert (junk["status"] == "failed").all()
    assert junk["prob"].isna().all()
    assert (junk["decision"] == "").all()
    assert junk["source_ref"].str.fullmatch(r"src-[0-9a-f]{16}").all()
    assert junk["source_ref"].is_unique


def test_no_identifier_in_any_output(scored, archive):
    blobs = [scored["out"].read_bytes(), Path(f"{scored['out']}.metrics.json").read_bytes()]
    for secret in [*archive["patient_ids"], "MRN7654321", "notes.txt", "sub-99_T1w", str(archive["source"])]:
        assert not any(secret.encode() in b for b in blobs), secret


def test_2d_model_refuses_3d_units_with_a_reason(scored):
    ct = scored["table"][scored["table"]["modality"] == "CT"]
    assert len(ct) == 8
    assert (ct["status"] == "failed").all()
    assert (ct["reason"] == "dims-mismatch").all()
    assert ct["detail"].str.contains("2D model cannot score a volume of").all()
    assert ct["prob"].isna().all()
    assert ct["image_id"].str.startswith("img-").all()


def test_units_of_a_modality_the_model_was_not_trained_on_are_refused(scored):
    mr = scored["table"][scored["table"]["modality"] == "MR"]
    assert list(mr["reason"]) == ["modality-mismatch"]
    assert "trained on CR/DX/MG/RG/XA images (preset xray); this unit is MR" in mr["detail"].iloc[0]


def test_probabilities_equal_the_packaged_model_on_prepared_images(scored, models):
    pkg = load_packaged(models["binary"])
    model, meta = pkg.model, pkg.meta
    manifest = Path(f"{scored['out']}.work") / "manifest"
    frame = load_manifest(manifest).set_index("image_id")
    ok = scored["table"][scored["table"]["status"] == "ok"].head(3)
    spec = spec_from_dict(meta["prepare"])
    x = torch.stack([prepare_image(manifest / frame.loc[i, "image_path"], spec) for i in ok["image_id"]])
    with torch.no_grad():
        expected = model.eval()(x)[:, 1].numpy()
    np.testing.assert_allclose(ok["prob"].to_numpy(), expected, atol=1e-6)


def test_external_validation_metrics_match_a_direct_computation(scored, archive):
    ev = scored["metrics"]["external_validation"]
    frame = load_manifest(Path(f"{scored['out']}.work") / "manifest").set_index("image_id")
    ok = scored["table"][scored["table"]["status"] == "ok"]
    y = frame.loc[ok["image_id"], "label"].astype(int).to_numpy()
    p = ok["prob"].to_numpy()
    assert ev["n"] == 9
    assert ev["n_by_class"] == {"0": int((y == 0).sum()), "1": int((y == 1).sum())}
    assert ev["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert ev["auroc_ci"][0] <= ev["auroc"] <= ev["auroc_ci"][1]
    assert ev["brier"] == pytest.approx(np.mean((p - y) ** 2))  # the one-column binary Brier
    assert scored["metrics"]["temperature"] == 1.5
    assert scored["metrics"]["adapt_bn"] is None


def test_domain_shift_is_checked_against_the_models_reference_stats(scored):
    shift = scored["metrics"]["domain_shift"]
    assert shift["checked"]
    assert shift["n_archive"] == 9
    assert shift["intensity_mean_smd"] < -10
    assert any("intensity mean of the prepared images differs" in w for w in shift["warnings"])
    assert "embedding_note" in shift  # this reference_stats holds no embeddings


def test_multiclass_model_writes_one_probability_per_class(models, archive, tmp_path):
    result = _score(models, archive, tmp_path / "tri.parquet", model="tri")
    t = pd.read_parquet(result["out"])
    ok = t[t["status"] == "ok"]
    probs = ok[["prob_a", "prob_b", "prob_c"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (ok["decision"] == np.array(["a", "b", "c"])[probs.argmax(axis=1)]).all()
    assert "no reference_stats" in result["domain_shift"]["note"]
    assert not result["domain_shift"]["checked"]


def test_2d_model_with_slice_reduction_scores_ct_volumes_and_refuses_xrays(models, archive, tmp_path):
    if "reduce" not in PrepareSpec.__dataclass_fields__:
        pytest.skip("this prepare.py has no slice reduction for 2D models")
    torch.manual_seed(1)
    net, _ = build_model("tf_efficientnet_lite0", "none", num_classes=2, in_channels=1, dims="2d")
    spec = make_spec("2d", "ct-lung", [32, 32], {"mean": (0.5,), "std": (0.5,)}, reduce="mip")
    with tracking.start_run("score-tests"):
        info = log_packaged(
            CalibratedNet(net),
            np.zeros((1, 1, 32, 32), np.float32),
            {"prepare": spec.as_dict(), "classes": ["0", "1"]},
            "mip",
        )
    result = score(
        f"models:/mip/{info['version']}",
        archive["source"],
        tmp_path / "mip.parquet",
        tracking_uri=models["uri"],
        key_file=archive["key"],
        **SETTINGS,
    )
    t = pd.read_parquet(result["out"]).set_index("modality")
    assert (t.loc["CT", "status"] == "ok").all()
    assert len(t.loc["CT"]) == 8
    assert set(t.loc[["DX", "CR", "MR"], "reason"]) == {"modality-mismatch"}
    assert (t.loc["CT", "decision"] == np.where(t.loc["CT", "prob"] >= 0.5, "1", "0")).all()  # no threshold: argmax


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(models, archive, scored, tmp_path):
    """A real subprocess is SIGKILLed right after its first chunk commit; the rerun finishes the rest."""
    out = tmp_path / "killed.parquet"
    code = (
        "import time, torch\n"
        "import pipeline.score as s\n"
        "import pipeline.score.plan as plan\n"
        "torch.set_num_threads(1)  # as in this module, so the chunks are bit-identical\n"
        "commit = plan.ChunkWriter._commit\n"
        "def slow(self, c, got):\n"
        "    commit(self, c, got)\n"
        "    time.sleep(30)  # a window for the parent's SIGKILL\n"
        "plan.ChunkWriter._commit = slow\n"
        f"s.score({models['binary']!r}, {str(archive['source'])!r}, {str(out)!r}, tracking_uri={models['uri']!r},"
        f" labels={str(archive['labels'])!r}, key_file={str(archive['key'])!r}, batch_size=2, chunk_size=3,"
        " progress=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    chunks = Path(f"{out}.work") / "chunks"
    deadline = time.time() + 120
    while not list(chunks.glob("part-*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert len(list(chunks.glob("part-*.parquet"))) == 1
    assert not out.exists()
    result = _score(models, archive, out, labels=archive["labels"])
    assert (result["n_chunks"], result["chunks_reused"]) == (3, 1)
    pd.testing.assert_frame_equal(pd.read_parquet(out), scored["table"], check_exact=True)


def test_cli_score_with_adapt_bn(models, archive, scored, tmp_path, capsys):
    out = tmp_path / "cli.parquet"
    code = main(
        [
            "score",
            str(archive["source"]),
            "--model",
            models["binary"],
            "--out",
            str(out),
            "--tracking-uri",
            models["uri"],
            "--key-file",
            str(archive["key"]),
            "--batch-size",
            "4",
            "--adapt-bn",
        ]
    )
    assert code == 0
    assert "scored 9 units, 11 failures" in capsys.readouterr().out
    metrics = json.loads(Path(f"{out}.metrics.json").read_text())
    assert metrics["adapt_bn"] == {"applied": True, "n_images": 9, "n_layers": 49}
    assert json.loads(pq.read_schema(out).metadata[b"medxfer"])["adapt_bn"]["applied"] is True
    assert (Path(f"{out}.work") / "chunks" / "adabn.pt").exists()  # reused by a resumed run
    adapted = pd.read_parquet(out).set_index("image_id")["prob"].dropna()
    plain = scored["table"].set_index("image_id")["prob"].dropna()
    assert not np.allclose(adapted.loc[plain.index], plain, atol=1e-4)  # AdaBN changed the predictions


@pytest.mark.slow
def test_ray_engine_equals_local(models, archive, tmp_path):
    """Same rows and bit-identical probabilities (same batches, one torch thread), AdaBN state shipped to actors."""
    ray = pytest.importorskip("ray")
    local = _score(models, archive, tmp_path / "local.parquet", adapt_bn=True, labels=archive["labels"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=ray_runtime_env())
    try:
        remote = _score(
            models, archive, tmp_path / "ray.parquet", engine="ray", workers=2, adapt_bn=True, labels=archive["labels"]
        )
    finally:
        ray.shutdown()
    assert remote["engine"] == "ray"
    assert remote["adapt_bn"] == local["adapt_bn"]
    pd.testing.assert_frame_equal(pd.read_parquet(remote["out"]), pd.read_parquet(local["out"]), check_exact=True)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"engine": "rey"}, ConfigError, "did you mean 'ray'"),
        ({"batch_size": 0}, ConfigError, "--batch-size: must be a whole number >= 1, got 0"),
        ({"chunk_size": 2.5}, ConfigError, "--chunk-size"),
        ({"workers": -1}, ConfigError, "--workers: must be a whole number >= 0"),
    ],
)
def test_bad_arguments_fail_with_a_named_fix(models, archive, tmp_path, kw, error, match):
    with pytest.raises(error, match=match):
        _score(models, archive, tmp_path / "bad.parquet", **kw)
    assert not (tmp_path / "bad.parquet").exists()


def test_unknown_engine_names_the_registered_ones():
    with pytest.raises(ConfigError, match=r"^--engine: unknown engine 'onnx'; choose one of local, ray$"):
        get_engine("onnx")


def test_score_dispatches_through_the_engine_registry(models, archive, scored, tmp_path, monkeypatch):
    """A new engine is one ENGINES entry with the Engine signature; this one wraps the local engine."""
    calls = []

    def wrapped(pkg, units, batches, sink, options):
        calls.append((len(units), batches, options.workers, options.bn_state))
        run_local(pkg, units, batches, sink, options)

    monkeypatch.setitem(ENGINES, "wrapped", wrapped)
    result = _score(models, archive, tmp_path / "wrapped.parquet", engine="wrapped")
    assert result["engine"] == "wrapped"
    assert calls == [(9, [[0, 1], [2], [3, 4], [5], [6, 7], [8]], 0, None)]  # batches never straddle chunks of 3
    pd.testing.assert_frame_equal(pd.read_parquet(result["out"]), scored["table"], check_exact=True)


def test_training_does_not_import_scoring_and_scoring_does_not_import_ray():
    code = (
        "import sys, pipeline.run\n"
        "assert not [m for m in sys.modules if m.startswith('pipeline.score')], 'pipeline.run imports scoring'\n"
        "import pipeline.score, pipeline.cli\n"
        "assert 'ray' not in sys.modules, 'ray imported before the ray engine runs'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_model_without_medxfer_metadata_is_refused(tmp_path):
    net, _ = build_model("tf_efficientnet_lite0", "none", num_classes=2, in_channels=1, dims="2d")
    write_package(tmp_path / "plain", CalibratedNet(net), {"note": "no prepare spec, no classes"})
    with pytest.raises(DataError, match=r"plain carries no medxfer metadata \['prepare', 'classes'\]"):
        load_packaged(str(tmp_path / "plain"))


def test_adapt_batchnorm_known_answer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    a, b = torch.randn(5, 3, 4, 4) * 2 + 1, torch.randn(7, 3, 4, 4) - 3
    assert adapt_batchnorm(net, [a, b]) == (12, 1)
    bn = net[0]
    expect_mean = (a.mean((0, 2, 3)) + b.mean((0, 2, 3))) / 2  # momentum None: plain average over batches
    expect_var = (a.var((0, 2, 3), unbiased=True) + b.var((0, 2, 3), unbiased=True)) / 2
    torch.testing.assert_close(bn.running_mean, expect_mean)
    torch.testing.assert_close(bn.running_var, expect_var)
    assert bn.momentum == 0.1
    assert not bn.training
    assert not net.training
    before = bn.running_mean.clone()
    with pytest.raises(DataError, match="cannot be re-estimated"):
        adapt_batchnorm(net, [])
    torch.testing.assert_close(bn.running_mean, before)  # restored


def test_domain_stats_and_comparison_known_answers():
    rng = np.random.default_rng(0)
    means, stds, emb = rng.normal(0.2, 0.1, 40), rng.normal(0.5, 0.05, 40), rng.normal(0, 1, (40, 6))
    whole, a, b = DomainStats(), DomainStats(), DomainStats()
    whole.add(means, stds, emb)
    a.add(means[:15], stds[:15], emb[:15])
    b.add(means[15:], stds[15:], emb[15:])
    a.merge(b)
    s = a.summary()
    assert s["n"] == 40
    assert s["intensity_mean"] == pytest.approx([means.mean(), means.std(ddof=1)])
    np.testing.assert_allclose(s["embedding_sd"], emb.std(axis=0, ddof=1))
    same = compare_domain(s, whole.summary())
    assert same["checked"]
    assert same["warnings"] == []
    assert same["embedding_rms_smd_corrected"] == 0.0
    shifted = DomainStats()
    shifted.add(means + 0.1, stds, emb + 1.0)  # +1 SD on both
    diff = compare_domain(s, shifted.summary())
    assert diff["intensity_mean_smd"] == pytest.approx(0.1 / means.std(ddof=1))
    assert diff["embedding_rms_smd_corrected"] > 0.8
    assert len(diff["warnings"]) == 2
    assert compare_domain(None, s)["checked"] is False


def test_reference_stats_of_a_dataset_have_the_metadata_schema():
    torch.manual_seed(0)
    net, _ = build_model("tf_efficientnet_lite0", "none", num_classes=2, in_channels=1, dims="2d")
    x = torch.randn(6, 1, 32, 32)
    ref = reference_stats(CalibratedNet(net), torch.utils.data.TensorDataset(x), batch_size=4)
    assert ref["n"] == 6
    assert len(ref["embedding_mean"]) == net.num_features == 1280
    assert ref["intensity_mean"][0] == pytest.approx(float(x.flatten(1).mean(1).mean()), abs=1e-6)
    assert compare_domain(ref, ref)["warnings"] == []


def test_a_probability_equal_to_the_threshold_is_decided_as_evaluation_did():
    """Evaluation compares float64 probabilities with the threshold; scoring stores float32 ones."""
    from pipeline.score.table import decisions

    threshold = 0.7  # a val probability; not a float32 number: float32(0.7) < 0.7
    stored = np.array([[0.3, 0.7], [0.8, 0.2], [0.05, 0.95]], dtype=np.float32).astype(np.float64)
    assert not stored[0, 1] >= threshold  # the naive comparison would call P = threshold negative
    assert decisions(stored, ["0", "1"], threshold).tolist() == ["1", "0", "1"]
    assert decisions(stored, ["0", "1"], None).tolist() == ["1", "0", "1"]
