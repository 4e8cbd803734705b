"""A newcomer's first hour (issue 16): the README's Quick start and every command the demo prints work as shown."""

from __future__ import annotations

import csv
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _printed(stdout: str, label: str) -> str:
    """The command the demo printed after `label:` on its closing lines."""
    match = re.search(rf"^  {re.escape(label)}:\s+(.+)$", stdout, re.MULTILINE)
    assert match, f"the demo printed no '{label}:' line:\n{stdout}"
    return match.group(1).strip()


def test_readme_quick_start_is_the_demo_and_the_test_command_ci_runs():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.DOTALL)
    assert [b.strip() for b in blocks] == [
        "python3.11 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/medxfer demo",
        ".venv/bin/python -m pytest",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/pip install -q -e '.[dev]'" in ci and "\n.venv/bin/python -m pytest\n" in ci


@pytest.mark.slow  # scores the demo's archive in a subprocess (~30-60 s)
def test_the_demo_prints_a_score_command_that_works_as_printed(demo_run):
    """The conftest fixture runs `medxfer demo` through the CLI; the score command it printed runs as printed."""
    command = _printed(demo_run["stdout"], "score")
    assert "--tracking-uri" in command and "models:/cxr-demo/latest" in command
    here = Path.cwd()  # where the demo ran and printed it (its paths may be relative to this folder)
    had_store = (here / "mlflow.db").exists()
    proc = subprocess.run(shlex.split(command), cwd=here, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^scored \d+ units, 0 failures", proc.stdout, re.MULTILINE), proc.stdout
    assert re.search(r"external validation on \d+ labelled units: AUROC 0\.\d{3} \(95% CI", proc.stdout)
    out = here / re.search(r"--out (\S+)", command).group(1)
    table = pd.read_parquet(out)
    assert len(table) == int(re.search(r"^scored (\d+) units", proc.stdout, re.MULTILINE).group(1))
    assert set(table["status"]) == {"ok"}
    assert (here / "mlflow.db").exists() == had_store  # the printed command creates no store where it runs


def test_the_demo_announces_each_of_its_five_steps_in_order(demo_run):
    steps = re.findall(r"^(\d)/5 (.*)$", demo_run["log"], flags=re.M)
    assert [int(i) for i, _ in steps] == [1, 2, 3, 4, 5], demo_run["log"]
    words = ["generating", "ingesting", "training", "evaluating", "report"]
    assert all(word in text for word, (_, text) in zip(words, steps, strict=True)), steps
    after_evaluating = demo_run["log"].split("4/5 ")[1]
    assert "registering it as cxr-demo" in after_evaluating.split("5/5 ")[0]  # packaging is not silent


def test_the_demo_prints_commands_that_need_no_activated_venv(demo_run):
    ui = shlex.split(_printed(demo_run["stdout"], "open the UI"))
    assert Path(ui[0]).resolve() == Path(sys.executable).resolve() and ui[1:4] == ["-m", "mlflow", "ui"]
    assert ui[4:] == ["--backend-store-uri", demo_run["uri"]]
    rerun = shlex.split(_printed(demo_run["stdout"], "re-run"))
    assert Path(rerun[0]).is_file() and rerun[-2:] == ["run", str(demo_run["root"] / "config.yaml")]


def test_score_against_a_store_that_does_not_exist_names_it_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "archive").mkdir()
    code = main(["score", "--model", "models:/cxr-demo/latest", "archive", "--out", "p.parquet"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"no MLflow store at {tmp_path / 'mlflow.db'}" in err and "--tracking-uri" in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "p.parquet.work").exists()


@pytest.mark.slow
def test_an_unknown_model_error_names_the_store_and_the_models_it_holds(demo_run, tmp_path, capsys):
    code = main(
        ["score", "--model", "models:/cxr-dmeo/latest", "--tracking-uri", demo_run["uri"], str(tmp_path), "--out",
         str(tmp_path / "p.parquet")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "no registered model 'cxr-dmeo'" in err and demo_run["uri"] in err
    assert "registered models there: cxr-demo" in err and "--tracking-uri" in err


@pytest.mark.slow  # generates a small CT cohort and scores it (~30 s)
def test_scoring_that_scores_nothing_exits_1_with_the_reasons_and_the_list(demo_run, tmp_path, capsys):
    from pipeline.synthetic import make_cohort

    ct = make_cohort(tmp_path / "ct", kind="ct3d", n=4, seed=0)
    (ct.archive_dir / "notes.txt").write_text("not an image\n")  # one file no reader takes
    out = tmp_path / "scores" / "p.parquet"
    code = main(
        ["score", "--model", "models:/cxr-demo/latest", "--tracking-uri", demo_run["uri"], str(ct.archive_dir),
         "--out", str(out), "--key-file", str(tmp_path / "key")]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    n_failed = int(re.search(r"scored 0 units, (\d+) failures", captured.out).group(1))
    line = r"failures by reason: dims-mismatch (\d+), (\S+) 1; what each is about: (\S+)\n"
    by_reason = re.search(line, captured.out)
    assert by_reason and int(by_reason.group(1)) == n_failed - 1 >= 4, captured.out  # each CT volume, one text file
    assert by_reason.group(3) == f"{out}.quarantine.csv"
    assert "no unit of" in captured.err and "could be scored" in captured.err
    table = pd.read_parquet(out)
    with open(f"{out}.quarantine.csv", newline="") as fh:
        listed = list(csv.DictReader(fh))
    refs = {r["ref"]: r for r in listed}
    failed_file = table[table["source_ref"] != ""].iloc[0]
    assert refs[failed_file["source_ref"]]["path"] == "notes.txt"  # the pseudonymised reference resolves
    misfits = table.loc[table["reason"] == "dims-mismatch", "image_id"]
    assert set(misfits) <= set(refs)
    assert all(Path(refs[i]["path"]).is_file() and refs[i]["path"].endswith(".nii") for i in misfits)  # openable
    assert "notes.txt" not in table.to_csv()  # the table itself carries no path


@pytest.mark.slow
def test_the_reports_reproduce_block_runs_elsewhere_with_the_logged_config(demo_run, tmp_path, monkeypatch):
    """Step 2 of the block runs as printed; step 3, with the placeholders filled in, gives the run's own config."""
    import html

    from pipeline.cli import _overrides, build_parser
    from pipeline.config import load_config

    page = Path(demo_run["report"]).read_text()
    block = html.unescape(re.search(r"Reproduce this run.*?<pre[^>]*>(.*?)</pre>", page, re.DOTALL).group(1))
    commands = [c for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]
    assert str(ROOT) not in block.split("# 2.")[1].split("\n", 1)[1].replace(demo_run["uri"], "")  # no local paths
    download = shlex.split(next(c for c in commands if "artifacts download" in c))
    env_var, argv = download[0].split("=", 1), download[1:]
    assert env_var == ["MLFLOW_TRACKING_URI", demo_run["uri"]] and argv[0] == ".venv/bin/python"
    monkeypatch.chdir(tmp_path)
    proc = subprocess.run(
        [sys.executable, *argv[1:]], env={**__import__("os").environ, "MLFLOW_TRACKING_URI": env_var[1]},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_line = next(c for c in commands if "medxfer run" in c)
    cohort = demo_run["root"] / "cohort"
    for placeholder, path in (
        ("ARCHIVE", cohort / "archive"),
        ("LABELS_CSV", cohort / "labels.csv"),
        ("KEY_FILE", demo_run["root"] / "keys" / "pseudonym.key"),
    ):
        assert f"={placeholder} " in run_line + " "
        run_line = run_line.replace(f"={placeholder} ", f"={path} ")
    args = build_parser().parse_args(shlex.split(run_line)[1:])
    assert args.command == "run" and args.report == "repro/report.html"
    cfg = load_config(args.config, _overrides(args.set))
    original = load_config(demo_run["root"] / "config.yaml").as_dict()
    ours = cfg.as_dict()
    assert ours["data"]["manifest"] == str(tmp_path / "repro" / "manifest")
    assert ours["tracking"]["uri"] == "sqlite:///repro/mlflow.db"
    for section in ("data", "prepare", "tracking"):
        for key in ("manifest", "cache_dir", "uri"):
            ours[section].pop(key, None), original[section].pop(key, None)
    assert ours == original  # the same experiment, the same archive, labels and key


def test_every_option_of_every_command_has_help_text():
    import argparse

    from pipeline.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in subparsers.choices.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert not missing, missing


@pytest.mark.parametrize(("method", "shown"), [("none", None), ("temperature", "0.090 uncalibrated")])
def test_the_headline_names_the_uncalibrated_ece_only_when_a_calibration_changed_it(tmp_path, method, shown):
    from pipeline import tracking
    from pipeline.run.demo import headline

    tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracking.start_run("headline") as run_id:
        tracking.set_tags({"calibration_method": method})
    m = {"test_auroc": 0.9, "test_auroc_ci_low": 0.8, "test_auroc_ci_high": 0.95, "test_ece": 0.05}
    m |= {"test_ece_uncalibrated": 0.09 if shown else 0.05, "temperature": 1.5}
    line = headline(run_id, m)
    assert line.startswith("test AUROC 0.900 (95% CI 0.800–0.950), ECE 0.050 with ")
    assert ("uncalibrated" in line) == bool(shown) and (shown is None or shown in line)


def test_the_readme_ct_recipe_makes_the_cohort_its_configs_read_and_its_commands_parse():
    """The '2D, 2.5D and 3D' commands, as printed: the synth output is where every config looks, options exist."""
    from pipeline.cli import build_parser
    from pipeline.config import load_config

    section = (ROOT / "README.md").read_text().split("## 2D, 2.5D and 3D", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.strip()]
    assert all(c[0] == "medxfer" for c in commands)
    parser = build_parser()
    for command in commands:
        parser.parse_args(command[1:])  # exits 2 on an unknown option
    synth = next(c for c in commands if c[1] == "synth")
    cohort = (ROOT / synth[synth.index("--out") + 1]).resolve()
    runs = [c[2] for c in commands if c[1] == "run"]
    assert sorted(runs) == ["configs/ct3d-2.5d.yaml", "configs/ct3d-2d.yaml", "configs/ct3d-3d.yaml"]
    synth_line = " ".join(synth)
    for name in runs:
        cfg = load_config(ROOT / name)
        assert Path(cfg.data.source).resolve() == cohort / "archive", name
        assert Path(cfg.data.labels).resolve() == cohort / "labels.csv", name
        assert f"`{synth_line}`" in (ROOT / name).read_text(), f"{name} names another cohort"
