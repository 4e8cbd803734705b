"""The audit report: real MLflow runs in, one self-contained HTML file out (sections, no external resources,
no identifiers, "not available" instead of crashes), rendered in headless Chromium."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import tracking
from pipeline.errors import TrackingError
from pipeline.evaluate import (
    confusion_figure,
    evaluation_summary,
    pr_figure,
    reliability_figure,
    roc_figure,
    training_curves_figure,
)
from pipeline.records import MANIFEST_COLUMNS
from pipeline.report import collect_context, render_report, write_report
from pipeline.report.fmt import as_floats, ci, count, duration, num, rate_with_ci, table, with_ci

SECTIONS = (
    "summary",
    "cohort",
    "exclusions",
    "preprocessing",
    "model",
    "training",
    "performance",
    "calibration",
    "subgroups",
    "transfer",
    "provenance",
    "warnings",
)
# Things that must never reach the report: quarantine paths/details and free text naming a patient.
SECRETS = ("DOE^JOHN", "MRN0042", "1.2.840.113619", "ST. MARY", "unreadable header of patient")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# --------------------------------------------------------------------------- a hand-built real run
def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _manifest(root: Path, rng: np.random.Generator) -> pd.DataFrame:
    """A pseudonymised manifest of 100 single-image patients, with quarantine.csv and ingest_report.json."""
    n = 100
    split = np.array(["train"] * 50 + ["val"] * 20 + ["test"] * 30)
    frame = pd.DataFrame({c: [""] * n for c in MANIFEST_COLUMNS})
    frame["image_id"] = [f"img-{i:016x}" for i in range(n)]
    frame["subject_id"] = [f"sub-{i * 7919:016x}" for i in range(n)]
    frame["modality"], frame["source_format"], frame["split"] = "DX", "dicom", split
    frame["label"] = np.where(rng.random(n) < 0.35, "1", "0")
    frame["manufacturer"] = rng.choice(["GE MEDICAL SYSTEMS", "SIEMENS", "Philips"], n)
    frame["warnings"] = [("irregular slice spacing: 1 to 2 mm" if i % 17 == 0 else "") for i in range(n)]
    frame["sex"] = rng.choice(["F", "M"], n)
    frame["age_band"] = rng.choice(["40-49", "50-59", "60-69"], n)
    frame["site"] = rng.choice(["site-A", "site-B"], n)
    root.mkdir(parents=True)
    frame.to_parquet(root / "manifest.parquet", index=False)
    (root / "quarantine.csv").write_text(
        "path,reason,detail\n"
        "DOE^JOHN/MRN0042/IM0001.dcm,decode-error,JPEG stream truncated (SOP 1.2.840.113619.2.1)\n"
        "DOE^JOHN/MRN0042/notes.txt,not-dicom,ST. MARY export log\n"
        "X/empty.dcm,empty-file,\n"
    )
    (root / "ingest_report.json").write_text(
        json.dumps(
            {  # the layout pipeline.ingest writes
                "format": 1,
                "parameters": {"val": 0.2, "test": 0.3, "seed": 0},
                "split_source": "keyed-hash",
                "files_seen": 103,
                "files": {"dicom": 101, "nifti": 0, "rejected_at_scan": 2},
                "units": 100,
                "subjects": 100,
                "quarantined": {"files": 3, "by_reason": {"decode-error": 1, "not-dicom": 1, "empty-file": 1}},
                "splits": {"train": {"units": 50, "subjects": 50, "by_label": {"0": 35, "1": 15}}},
                "labels": {
                    "given": True,
                    "rows": 101,
                    "problems": [
                        {"line": 7, "problem": "no-images", "detail": "MRN0042 unreadable header of patient"},
                        {"line": 9, "problem": "no-images", "detail": "MRN0043"},
                    ],
                    "warnings": [],
                },
                "warnings": [
                    "label '1': 3 subject(s), none in val; check the split fractions",
                    "archive DOE^JOHN/MRN0042 skipped",
                ],
                "unit_warnings": ["img-00ab: irregular slice spacing: 1 to 2 mm"],
                "manifest_sha256": "ab" * 32,
            }
        )
    )
    return frame


def _log_run(
    cfg: dict, frame: pd.DataFrame, rng: np.random.Generator, *, signal: float, evaluate: bool, manifest_dir: Path
) -> str:
    """Log one run the way pipeline.run does (params, tags, artifacts, per-epoch metrics, evaluation)."""
    flat = {
        "prepare.dims": "2d",
        "prepare.preset": "xray",
        "prepare.size": "[224, 224]",
        "model.backbone": "tf_efficientnet_lite0",
        "model.weights": cfg["model"]["weights"],
        "finetune.strategy": "linear-probe",
        "classes": '["0", "1"]',
        "n_train": 50,
        "n_val": 20,
        "n_test": 30,
    }
    sha = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db" if signal > 1 else "none"
    tags = {
        "config_hash": "c0ffee0123456789",
        "manifest_hash": _hash(manifest_dir),
        "git_commit": "abc123def",
        "weights_sha256": sha,
        "prepare_hash": "feedbeef00112233",
        "stage": "train",
    }
    with tracking.start_run("report-test", tags=tags) as run_id:
        tracking.log_params({**flat, "weights_sha256": sha})
        tracking.log_json(cfg, "config.json")
        tracking.log_json(
            {
                "backbone": "tf_efficientnet_lite0",
                "weights": cfg["model"]["weights"],
                "weights_file": "/opt/weights/efficientnet-lite0-57934424.pth",
                "weights_sha256": sha,
                "dims": "2d",
                "in_channels": 1,
                "channel_method": "sum-fold RGB->1",
                "inflation": None,
                "num_classes": 2,
                "missing_keys": [],
                "unexpected_keys": [],
                "total_params": 3371042,
                "trainable_params": 2562,
                "mean": [0.5],
                "std": [0.5],
                "input_size": [224, 224],
            },
            "adaptation_summary.json",
        )
        tracking.log_json(frame[["image_id", "subject_id", "split", "label"]].to_dict("list"), "splits.json")
        hist = {"train_loss": [], "val_loss": [], "val_auroc": [], "lr": []}
        for epoch in range(6):
            row = {
                "train_loss": 0.7 - 0.05 * epoch,
                "val_loss": 0.68 - 0.03 * epoch,
                "val_auroc": 0.6 + 0.04 * epoch,
                "lr": 3e-3,
                "trainable_params": 2562,
                "epoch_seconds": 1.5,
                "images_per_s": 33.0,
            }
            tracking.log_metrics(row, step=epoch + 1)
            for k in hist:
                hist[k].append(row[k])
        tracking.log_metrics({"best_epoch": 6, "epochs_run": 6, "train_seconds": 9.2, "stopped_early": 0.0})
        tracking.log_json(
            {
                "class_weights": [0.77, 1.43],
                "trainable_by_phase": [2562],
                "history": hist,
                "device": "cpu",
                "platform": "Linux-x86_64",
                "torch": "2.14.1",
            },
            "training_summary.json",
        )
        tracking.log_figure(training_curves_figure(hist), "figures/training_curves.png")
        if evaluate:
            _log_evaluation(frame, rng, signal)
    return run_id


def _hash(manifest_dir: Path) -> str:
    import hashlib

    return hashlib.sha256((manifest_dir / "manifest.parquet").read_bytes()).hexdigest()[:16]


def _log_evaluation(frame: pd.DataFrame, rng: np.random.Generator, signal: float) -> None:
    val, test = frame[frame["split"] == "val"], frame[frame["split"] == "test"]
    yv, yt = val["label"].astype(int).to_numpy(), test["label"].astype(int).to_numpy()
    zv = np.column_stack([np.zeros(len(yv)), signal * (yv - 0.5) + rng.normal(0, 1, len(yv))])
    zt = np.column_stack([np.zeros(len(yt)), signal * (yt - 0.5) + rng.normal(0, 1, len(yt))])
    s = evaluation_summary(
        yv,
        zv,
        yt,
        zt,
        test["subject_id"].to_numpy(),
        operating_points=["youden", "sensitivity@0.90"],
        n_boot=200,
        subgroups={"sex": test["sex"].to_numpy(), "site": test["site"].to_numpy()},
        calibration="temperature",
        groups_val=val["subject_id"].to_numpy(),
    )
    tracking.log_metrics(s.metrics)
    rel = s.reliability
    # reliability bins go in as numpy arrays, as pipeline.run logs them (MLflow writes them as "[0. 0.1 ...]")
    tracking.log_json(
        {
            **_jsonable(
                {
                    "operating_points": s.operating_points,
                    "subgroups": s.subgroups,
                    "notes": s.notes,
                    "classes": ["0", "1"],
                    "discrimination": s.discrimination,
                    "calibration": dataclasses.asdict(s.calibration),
                }
            ),
            "reliability": {k: rel[k] for k in ("n_bins", "before", "after")},
        },
        "evaluation.json",
    )
    p = s.probs_test[:, 1]
    for name, fig in {
        "roc.png": roc_figure(yt, p, s.operating_points),
        "pr.png": pr_figure(yt, p),
        "confusion.png": confusion_figure(s.discrimination["confusion_matrix"], ["0", "1"]),
        "reliability.png": reliability_figure(rel["probs_before"], rel["probs_after"], yt),
    }.items():
        tracking.log_figure(fig, f"figures/{name}")
    tracking.set_tags({"stage": "evaluated", "model_uri": "models:/m-123", "registered_model": "report-test/1"})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A sqlite MLflow store with a pretrained run, a from-scratch baseline and a train-only run."""
    root = tmp_path_factory.mktemp("report-store")
    uri = tracking.connect(f"sqlite:///{root / 'mlflow.db'}")
    rng = np.random.default_rng(0)
    manifest_dir = root / "manifest"
    frame = _manifest(manifest_dir, rng)
    cfg = {
        "experiment": "report-test",
        "data": {"manifest": str(manifest_dir)},
        "model": {"backbone": "tf_efficientnet_lite0", "weights": "imagenet"},
        "finetune": {"strategy": "linear-probe", "epochs": 6},
        "evaluate": {"calibration": "temperature"},
    }
    scratch = _log_run(
        {**cfg, "model": {**cfg["model"], "weights": "none"}},
        frame,
        rng,
        signal=1.0,
        evaluate=True,
        manifest_dir=manifest_dir,
    )
    main = _log_run(cfg, frame, rng, signal=2.0, evaluate=True, manifest_dir=manifest_dir)
    untested = _log_run(cfg, frame, rng, signal=3.0, evaluate=False, manifest_dir=manifest_dir)
    with tracking.start_run("report-test", tags={"stage": "evaluated"}) as broken:  # damaged artifacts
        tracking.log_metrics({"test_auroc": 0.8, "test_ece": 0.05})
        garbage = root / "evaluation.json"
        garbage.write_text("{not json")
        tracking.log_artifact(garbage)
    return {
        "uri": uri,
        "root": root,
        "manifest": manifest_dir,
        "main": main,
        "scratch": scratch,
        "untested": untested,
        "broken": broken,
    }


@pytest.fixture(scope="module")
def main_html(store) -> str:
    path = write_report(store["main"], store["root"] / "out" / "main.html", tracking_uri=store["uri"])
    return path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- helpers
class _Resources(HTMLParser):
    """Collect every src/href/srcset/poster/data attribute, tag names and inline style text."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []
        self.styles: list[str] = []
        self._in_style = False
        self.ids: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_style = tag == "style"
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data", "action", "xlink:href"):
                self.refs.append((tag, name, value or ""))
            if name == "style":
                self.styles.append(value or "")
            if name == "id":
                self.ids.append(value or "")

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def _parse(html: str) -> _Resources:
    p = _Resources()
    p.feed(html)
    return p


def _section(html: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', html, flags=re.S)
    assert match, f"section {sid} missing"
    return re.sub(r' data-label="[^"]*"', "", match.group(1))  # the narrow-screen labels (see test_at_420_px_…)


def assert_self_contained(html: str) -> None:
    """Every resource inline (data: PNG) or a same-page anchor; no scripts, links, imports or remote URLs."""
    p = _parse(html)
    assert p.refs, "no src/href at all: the parser saw nothing"
    for tag, attr, value in p.refs:
        if attr == "href":
            assert value.startswith("#"), (tag, attr, value[:80])
        else:
            assert value.startswith("data:image/png;base64,"), (tag, attr, value[:80])
    assert not {"script", "link", "iframe", "object", "embed", "base"} & set(p.tags)
    style = " ".join(p.styles)
    assert "url(" not in style
    assert "@import" not in style
    assert not re.search(r"""(src|href|srcset)\s*=\s*["']?\s*(https?:)?//""", html, flags=re.I)


# --------------------------------------------------------------------------- tests
def test_format_helpers_known_answers():
    assert [num(0.87654), num(None), num(float("nan")), num(True), num("n/a")] == ["0.877", "—", "—", "yes", "n/a"]
    assert [with_ci(0.8712, 0.80, 0.93), with_ci(0.5, None, 1)] == ["0.871 (0.800–0.930)", "0.500"]
    assert [ci(0.8, None), count(12345.0), count(None)] == ["—", "12,345", "—"]
    assert [duration(12.34), duration(245), duration(3720)] == ["12.3 s", "4 min 05 s", "1 h 02 min"]
    assert as_floats("[0.   0.5\n nan]") == [0.0, 0.5, None]  # numpy arrays as MLflow's log_dict writes them
    assert as_floats([1, "x"]) == [1.0, None]
    assert as_floats("[1 2 ... 9]") == []
    t = table(["group", "n", "AUROC"], [["F", "12", "0.812 (0.700–0.900)"], ["M", "8", "—"]])
    assert t["numeric"] == [False, True, True]
    op = {"sensitivity": 0.75, "sensitivity_ci": [0.62, 0.86], "ppv": None, "ppv_ci": None, "npv": 0.9}
    assert [rate_with_ci(op, k) for k in ("sensitivity", "ppv", "npv")] == ["0.750 (0.620–0.860)", "—", "0.900"]
    assert rate_with_ci([1], "sensitivity") == "—"


def test_report_has_every_section_headline_and_figures(store, main_html):
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in main_html
        assert f'href="#{sid}"' in main_html
    m = tracking.get_run(store["main"])["metrics"]
    headline = (
        f"AUROC {m['test_auroc']:.2f} (95% CI {m['test_auroc_ci_low']:.2f}–{m['test_auroc_ci_high']:.2f}) "
        "on 30 test images from 30 patients"
    )
    assert headline in _section(main_html, "summary")
    assert "class 1 is the positive class, the one AUROC, sensitivity and prevalence refer to" in _section(
        main_html, "summary"
    )
    assert main_html.count('src="data:image/png;base64,') == 5  # roc, pr, confusion, reliability, curves
    assert f"{m['test_ece']:.3f}" in _section(main_html, "calibration")
    assert "15 equal-width confidence bins" in _section(main_html, "calibration")
    assert "Reliability bins after calibration (non-empty of 15)" in _section(main_html, "calibration")
    assert f"{m['temperature']:.3f}" in _section(main_html, "calibration")
    perf = _section(main_html, "performance")
    for text in ("youden", "sensitivity@0.90", "test PPV"):
        assert text in perf
    assert "not available" not in perf
    ops = collect_context(store["main"], store["uri"])["evaluation"]["operating_points"]
    for op in ops:  # test rates with their patient-bootstrap CIs
        for k in ("sensitivity", "specificity", "npv"):
            assert f'<td class="num">{with_ci(op["test"][k], *op["test"][f"{k}_ci"])}</td>' in perf, (op["rule"], k)
    assert "test rates with 95% CIs (patient bootstrap)" in perf


def test_missed_target_note_is_a_warning(store):
    ctx = collect_context(store["main"], store["uri"])
    text = "sensitivity@0.90: test sensitivity 0.60 (95% CI 0.53–0.67) misses the target 0.90 met on validation"
    ctx["evaluation"]["notes"] = [text, "rules youden, sensitivity@1.0 chose the same threshold 0.600"]
    html = render_report(ctx)
    assert f'<li class="warn"><span class="lvl">warn</span>{text}' in _section(html, "warnings")
    assert '<li class="info"><span class="lvl">info</span>rules youden' in _section(html, "warnings")
    assert f'<div class="note warn">{text}' in _section(html, "performance")


def test_cohort_and_exclusions_are_counts_from_the_manifest(store, main_html):
    frame = pd.read_parquet(store["manifest"] / "manifest.parquet")
    cohort = _section(main_html, "cohort")
    test = frame[frame["split"] == "test"]
    row = (
        f'<td>test</td><td class="num">30</td><td class="num">30</td>'
        f'<td class="num">{(test["label"] == "0").sum()}</td><td class="num">{(test["label"] == "1").sum()}</td>'
    )
    assert row in cohort
    for caption in ("sex", "age band", "site", "manufacturer"):
        assert f"Images by {caption} and split" in cohort
    excl = _section(main_html, "exclusions")
    for reason in ("decode-error", "not-dicom", "empty-file"):
        assert f'<td>{reason}</td><td class="num">1</td>' in excl
    assert '<td>no-images</td><td class="num">2</td><td>7, 9</td>' in excl  # label problems by kind
    assert '<td>irregular slice spacing</td><td class="num">6</td>' in excl  # flagged units, by kind
    assert "Ingest: label &#39;1&#39;: 3 subject(s), none in val" in excl
    assert "a warning withheld from the report" in excl
    assert '<td>files.rejected_at_scan</td><td class="num">2</td>' in excl
    assert "parameters" not in excl
    assert "by_label" not in excl


def test_no_identifiers_or_paths_reach_the_report(store, main_html):
    for secret in SECRETS:
        assert secret.lower() not in main_html.lower(), secret
    frame = pd.read_parquet(store["manifest"] / "manifest.parquet")
    assert not any(s in main_html for s in frame["subject_id"]), "pseudonyms are not needed in a report"


def test_report_is_self_contained(main_html):
    assert_self_contained(main_html)
    assert "@media print" in main_html
    assert "max-width: 700px" in main_html


def test_self_contained_check_catches_remote_resources(main_html):
    for bad in (
        '<img src="https://cdn.example/x.png">',
        '<script src="//cdn.example/x.js"></script>',
        '<link rel="stylesheet" href="http://x/y.css">',
        '<div style="background:url(x.png)"></div>',
    ):
        with pytest.raises(AssertionError):
            assert_self_contained(main_html.replace("</main>", bad + "</main>"))


def test_transfer_gain_against_the_from_scratch_run(store, main_html):
    transfer = _section(main_html, "transfer")
    assert store["scratch"] in transfer
    a = tracking.get_run(store["main"])["metrics"]["test_auroc"]
    b = tracking.get_run(store["scratch"])["metrics"]["test_auroc"]
    assert f"{a - b:+.3f}" in transfer
    assert f"AUROC {a - b:+.2f} over a from-scratch run" in _section(main_html, "summary")


def test_provenance_names_commit_hashes_and_reproduce_command(store, main_html):
    prov = _section(main_html, "provenance")
    for text in (
        "abc123def",
        "c0ffee0123456789",
        "feedbeef00112233",
        "report-test/1",
        store["main"],
        "matches the manifest read for this report",
        "medxfer run repro/config.json",
        "mlflow",
    ):
        assert text in prov, text


def test_unevaluated_run_says_not_available(store, tmp_path):
    html = write_report(
        store["untested"], tmp_path / "r.html", tracking_uri=store["uri"], manifest_dir=store["manifest"]
    ).read_text()
    for sid in ("performance", "calibration", "subgroups"):
        assert "has not been evaluated" in _section(html, sid)
    assert "has not been evaluated" in _section(html, "warnings")
    assert "images (patient-level split)" in _section(html, "summary")
    assert_self_contained(html)


def test_damaged_run_renders_with_not_available_notes(store, tmp_path):
    html = write_report(store["broken"], tmp_path / "r.html", tracking_uri=store["uri"]).read_text()
    assert "artifact evaluation.json of run" in _section(html, "warnings")
    assert "is unreadable" in _section(html, "warnings")
    assert "figures/roc.png is not in the run" in _section(html, "performance")
    assert "AUROC 0.80" in _section(html, "summary")
    for sid in ("cohort", "model", "training", "provenance"):
        assert "not available" in _section(html, sid), sid
    assert_self_contained(html)


def test_changed_manifest_and_missing_manifest_are_reported(store, tmp_path):
    moved = tmp_path / "manifest"
    shutil.copytree(store["manifest"], moved)
    pd.read_parquet(moved / "manifest.parquet").iloc[:90].to_parquet(moved / "manifest.parquet", index=False)
    html = render_report(collect_context(store["main"], store["uri"], moved))
    assert "The manifest changed since training" in _section(html, "warnings")
    gone = render_report(collect_context(store["main"], store["uri"], tmp_path / "nowhere"))
    assert "From the run&#39;s splits.json" in _section(gone, "cohort")
    assert "Exclusions not available" in _section(gone, "exclusions")


def test_any_part_of_the_context_may_be_missing_or_malformed(store):
    """Never a crash: each part of a real context replaced by None, text, a list or a number still renders."""
    ctx = collect_context(store["main"], store["uri"])
    run_parts = ("params", "metrics", "tags", "history")
    for key in [*ctx, *[f"run.{k}" for k in run_parts]]:
        for junk in (None, "junk", [1, "x"], 7, {"x": {"y": [None]}}):
            broken = {**ctx, "run": dict(ctx["run"])}
            if key.startswith("run."):
                broken["run"][key[4:]] = junk
            else:
                broken[key] = junk
            html = render_report(broken)
            assert '<section id="warnings">' in html, (key, junk)
            assert "could not be rendered" not in html, (key, junk)  # handled, not just caught
    deep = json.loads(json.dumps(ctx, default=str))
    deep["evaluation"]["operating_points"] = [{"rule": None, "val": "x", "test": [1]}, "junk"]
    deep["evaluation"]["subgroups"] = [{"auroc": "high"}, 3]
    deep["evaluation"]["reliability"] = {"after": {"edges": "[0 1]", "count": "x"}}
    deep["training"] = {
        "trainable_by_phase": ["many", None],
        "class_weights": [None, "x", 1],
        "history": {"val_auroc": [None, "y"]},
    }
    deep["adaptation"]["missing_keys"] = "head.weight"
    deep["cohort"]["attributes"] = "junk"
    html = render_report(deep)
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in html


def test_empty_context_renders_every_section_as_not_available():
    html = render_report({})
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in html
    assert "not available" in _section(html, "model")
    assert_self_contained(html.replace("</main>", '<a href="#summary">x</a></main>'))


def test_write_is_atomic_and_unknown_run_is_a_tracking_error(store, tmp_path):
    out = tmp_path / "deep" / "r.html"
    out.parent.mkdir()
    out.write_text("old")
    assert write_report(store["main"], out, tracking_uri=store["uri"]) == out
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["r.html"]
    with pytest.raises(TrackingError, match="not found"):
        write_report("0" * 32, tmp_path / "x.html", tracking_uri=store["uri"])
    assert not (tmp_path / "x.html").exists()


# --------------------------------------------------------------------------- a real browser
def screenshot(html_file: Path, png: Path, width: int = 1200, height: int = 2400) -> str:
    """Render `html_file` in headless Chromium, save a PNG, return Chromium's stderr log."""
    profile = png.parent / f"profile-{png.stem}"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--screenshot={png}",
        f"--window-size={width},{height}",
        "--enable-logging=stderr",
        "--v=0",
        html_file.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.is_file(), proc.stderr[-2000:]
    return proc.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI installs Debian `chromium`)")
def test_renders_in_headless_chromium(store, main_html, tmp_path):
    from PIL import Image

    page = tmp_path / "report.html"
    page.write_text(main_html, encoding="utf-8")
    for width, height in ((1200, 2400), (390, 1600)):
        png = tmp_path / f"shot-{width}.png"
        log = screenshot(page, png, width, height)
        assert "Uncaught" not in log, log[-2000:]
        img = Image.open(png).convert("RGB")
        assert img.size == (width, height)
        lo, hi = zip(*img.getextrema(), strict=True)
        assert max(hi) - min(lo) > 100, "the page rendered blank"
        assert len(img.getcolors(maxcolors=1 << 20) or []) > 50, "too few colours: figures did not render"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI installs Debian `chromium`)")
def test_chromium_check_catches_script_errors(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    assert "Uncaught" in screenshot(page, tmp_path / "bad.png", 400, 300)


@pytest.mark.slow
def test_report_of_the_real_demo_run(demo_run):
    """The report `medxfer demo` wrote: every section filled, self-contained, no identifier of the cohort."""
    import pydicom

    html = Path(demo_run["report"]).read_text(encoding="utf-8")
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in html
    assert_self_contained(html)
    m = demo_run["metrics"]
    assert (
        f"AUROC {m['test_auroc']:.2f} (95% CI {m['test_auroc_ci_low']:.2f}–{m['test_auroc_ci_high']:.2f}) "
        f"on {int(m['test_n_images'])} test images from {int(m['test_n_patients'])} patients"
    ) in html
    assert html.count('src="data:image/png;base64,') == 5
    assert "matches the manifest read for this report" in html
    for word in ("not been evaluated", "unreadable", "not available: no manifest"):
        assert word not in html
    labels = pd.read_csv(demo_run["root"] / "cohort" / "labels.csv", dtype=str)
    secrets = set(labels["patient_id"])
    for path in (demo_run["root"] / "cohort" / "archive").rglob("*"):
        if path.is_file():
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            secrets |= {
                str(ds.get(k, ""))
                for k in ("PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID", "InstitutionName")
            }
    leaked = [x for x in secrets - {""} if x in html]
    assert not leaked, leaked[:5]


def test_cohort_shows_the_realised_prevalence_per_split(store, main_html):
    """The patient prevalence of every split, recomputed from the manifest, and where the splits came from."""
    frame = pd.read_parquet(store["manifest"] / "manifest.parquet")
    cohort = _section(main_html, "cohort")
    assert "prevalence (patients with class 1)" in cohort
    for split in ("train", "val", "test"):
        part = frame[frame["split"] == split]
        expected = part.loc[part["label"] == "1", "subject_id"].nunique() / part["subject_id"].nunique()
        row = re.search(rf"<tr><td>{split}</td>(.*?)</tr>", cohort, flags=re.S)
        assert row, split
        assert f'<td class="num">{expected:.3f}</td>' in row.group(1), (split, expected)
    assert "stratified by label" in cohort


def test_confusion_matrix_is_at_the_operating_point_the_model_decides_with(store, main_html):
    """The report's confusion matrix and threshold metrics are the deployed rule's, not the arg-max's."""
    ctx = collect_context(store["main"], store["uri"])
    op = ctx["evaluation"]["operating_points"][0]
    t = op["test"]
    perf = _section(main_html, "performance")
    caption = f"Confusion matrix counts (at the {op['rule']} threshold {op['threshold']:.3f}"
    assert caption in perf
    body = perf[perf.index(caption) :]
    cells = re.findall(r'<td class="num">([\d,]+)</td>', body)[:4]
    assert [int(c) for c in cells] == [t["tn"], t["fp"], t["fn"], t["tp"]]
    n = t["tp"] + t["fp"] + t["tn"] + t["fn"]
    assert f"{(t['tp'] + t['tn']) / n:.3f}" in perf
    assert "not how the model decides" in perf  # the 0.5 numbers, if shown, are labelled as such


NARROW_CHECK = """<script>
window.addEventListener("load", () => {
  const width = document.documentElement.clientWidth;
  const hidden = [...document.querySelectorAll("table th, table td")]
    .filter(c => c.offsetParent !== null && c.getBoundingClientRect().right > width + 1)
    .map(c => c.textContent.trim().slice(0, 40));
  const out = parent.document.createElement("pre");
  out.id = "narrow-check";
  out.textContent = JSON.stringify({width: width, hidden: hidden});
  parent.document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI installs Debian `chromium`)")
def test_at_420_px_no_table_cell_lies_off_screen(store, main_html, tmp_path):
    """A phone-width reader sees every column of every table (the subgroup flag column was off-screen)."""
    page = tmp_path / "narrow.html"  # headless Chromium's window is at least 500 px wide: frame the report at 420
    framed = main_html.replace("</body>", NARROW_CHECK + "</body>")
    page.write_text(
        f'<!DOCTYPE html><html><body style="margin:0"><iframe width="420" height="2000" style="border:0" '
        f'srcdoc="{html.escape(framed, quote=True)}"></iframe></body></html>',
        encoding="utf-8",
    )
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=420,2000", "--virtual-time-budget=5000",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<pre id="narrow-check">(.*?)</pre>', proc.stdout, re.DOTALL)
    assert found, proc.stdout[-2000:]
    result = json.loads(html.unescape(found.group(1)))
    assert result["width"] == 420
    assert result["hidden"] == []


@pytest.mark.parametrize(
    ("method", "ece_sub", "brier_sub"),
    [
        ("none", "plain softmax, not calibrated", "plain softmax; scaled Brier 0.200"),
        ("temperature", "calibrated; 0.090 before", "calibrated; scaled Brier 0.200"),
    ],
)
def test_the_summary_cards_say_calibrated_only_when_a_calibration_was_applied(method, ece_sub, brier_sub):
    from pipeline.report.facts import facts
    from pipeline.report.summary import _cards

    metrics = {"test_auroc": 0.9, "test_ece": 0.05, "test_ece_uncalibrated": 0.09, "test_brier": 0.1}
    context = {
        "run": {"metrics": {**metrics, "test_brier_scaled": 0.2}},
        "evaluation": {"calibration": {"method": method}},
    }
    subs = {c["label"]: c["sub"] for c in _cards(facts(context))}
    assert (subs["ECE"], subs["Brier"]) == (ece_sub, brier_sub)
