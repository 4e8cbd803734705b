"""`run` (one config end to end) and `demo` (a generated chest X-ray cohort through all of it)."""

from __future__ import annotations

import itertools
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import tracking
from pipeline.config import Config, save_config
from pipeline.run.evaluation import evaluate
from pipeline.run.training import train

if TYPE_CHECKING:
    from pipeline.synthetic import SyntheticCohort

log = logging.getLogger("medxfer")


def run(cfg: Config, report: str | Path | None = None, progress: bool = True, first_step: int = 1) -> dict[str, Any]:
    """ingest → train → evaluate → report, for one config. Returns run id, metrics and report path.

    Each of the four steps is announced on the console as "i/n", numbered from `first_step` (the
    demo's cohort generation is its step 1).
    """
    from pipeline.report import write_report

    step = stepper(first_step, first_step + 3)
    tracking.connect(cfg.tracking.uri)  # fail fast, before any work
    run_id = train(cfg, progress, step=step)
    metrics = evaluate(cfg, run_id, progress, step=step)
    out = Path(report or Path(REPORTS) / f"{cfg.experiment}-{run_id[:8]}.html")
    step(f"writing the audit report {_shown(out)}")
    write_report(run_id, out, tracking_uri=cfg.tracking.uri, manifest_dir=cfg.data.manifest)
    with tracking.start_run(cfg.experiment, run_id=run_id):
        tracking.log_artifact(out, "report")
    return {"run_id": run_id, "metrics": metrics, "report": str(out)}


def stepper(first: int, total: int) -> Callable[[str], None]:
    """A console announcer of numbered steps: each call logs "i/total MESSAGE", i counting from `first`."""
    counter = itertools.count(first)
    return lambda message: log.info("%d/%d %s", next(counter), total, message)


REPORTS = "medxfer-reports"  # default report folder of `run`, in the working folder (not the repo's reports/)

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cxr-demo.yaml"


def demo_config(root: Path, cohort: SyntheticCohort) -> Config:
    """The demo experiment (configs/cxr-demo.yaml) pointed at a generated cohort under `root`."""
    from pipeline.config import load_config

    cfg = load_config(DEMO_CONFIG)
    cfg.data.source, cfg.data.labels = str(cohort.archive_dir), str(cohort.labels_csv)
    cfg.data.manifest, cfg.data.key_file = str(root / "manifest"), str(root / "keys" / "pseudonym.key")
    cfg.tracking.uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    cfg.prepare.cache_dir = str(root / "cache")
    return cfg


def demo(out: str | Path = "medxfer-demo", n: int = 240, seed: int = 0) -> dict[str, Any]:
    """Generate a synthetic chest X-ray cohort under `out` and run the whole pipeline on it."""
    from pipeline.synthetic import make_cohort

    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log.info("1/5 generating a synthetic chest X-ray cohort of %d patients in %s", n, _shown(root / "cohort"))
    cohort = make_cohort(root / "cohort", kind="cxr2d", n=n, seed=seed, progress=True)
    cfg = demo_config(root, cohort)
    save_config(cfg, root / "config.yaml")
    result = run(cfg, report=root / "report.html", first_step=2)
    print(f"\nmedxfer demo finished: {headline(result['run_id'], result['metrics'])}")
    for label, line in closing_lines(root, cfg, result):
        print(f"  {label + ':':<14}{line}")
    return result


def headline(run_id: str, m: dict[str, Any]) -> str:
    """The headline test numbers of an evaluated run, with their 95% CIs, as `run` and `demo` print them."""
    from pipeline.report.fmt import calibration_name

    def ci(key: str) -> str:
        low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
        return f" (95% CI {low:.3f}–{high:.3f})" if low is not None and high is not None else ""

    method = tracking.get_run(run_id)["tags"].get("calibration_method", "none")
    parts = [f"test AUROC {m['test_auroc']:.3f}{ci('test_auroc')}"] if "test_auroc" in m else []
    if "test_ece" in m:
        uncalibrated = m.get("test_ece_uncalibrated") if method != "none" else None  # else the same number
        parts.append(
            f"ECE {m['test_ece']:.3f}{ci('test_ece')} with {calibration_name(method, m.get('temperature'))}"
            + (f" ({uncalibrated:.3f} uncalibrated)" if uncalibrated is not None else "")
        )
    rates = [f"{name} {m[f'test_{name}']:.3f}{ci(f'test_{name}')}" for name in ("sensitivity", "specificity")
             if f"test_{name}" in m]  # fmt: skip
    if rates and "threshold" in m:
        parts.append(f"{' and '.join(rates)} at the threshold frozen on validation ({m['threshold']:.3f})")
    return ", ".join(parts) or "no test metrics were logged"


def closing_lines(root: Path, cfg: Config, result: dict[str, Any]) -> list[tuple[str, str]]:
    """The demo's closing lines: where things are and commands that work as printed, venv or not.

    Commands name this interpreter's own executables (no activated venv needed) and the demo's
    store (`--tracking-uri`), with paths relative to the working folder when they lie below it.
    """
    uri = f"sqlite:///{_shown(root / 'mlflow.db')}"
    python = shlex.quote(_shown(Path(sys.executable)))
    medxfer = _shown(Path(sys.executable).parent / "medxfer")
    medxfer = shlex.quote(medxfer) if Path(medxfer).is_file() else f"{python} -m pipeline"  # no script: source tree
    cohort = root / "cohort"
    score = (
        f"{medxfer} score --model models:/{cfg.tracking.register_as}/latest --tracking-uri {shlex.quote(uri)} "
        f"{shlex.quote(_shown(cohort / 'archive'))} --labels {shlex.quote(_shown(cohort / 'labels.csv'))} "
        f"--out {shlex.quote(_shown(root / 'scores' / 'predictions.parquet'))}"
    )
    return [
        ("report", _shown(Path(result["report"]))),
        ("MLflow store", f"{uri}  (run {result['run_id']})"),
        ("open the UI", f"{python} -m mlflow ui --backend-store-uri {shlex.quote(uri)}"),
        ("score", score),
        ("re-run", f"{medxfer} run {shlex.quote(_shown(root / 'config.yaml'))}"),
    ]


def _shown(path: Path) -> str:
    """`path` relative to the working folder when it lies below it, else absolute."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
