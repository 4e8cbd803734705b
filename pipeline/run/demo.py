"""`run` (one config end to end) and `demo` (a generated chest X-ray cohort through all of it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import tracking
from pipeline.config import Config, save_config
from pipeline.run.evaluation import evaluate
from pipeline.run.training import train

if TYPE_CHECKING:
    from pipeline.synthetic import SyntheticCohort

log = logging.getLogger("medxfer")


def run(cfg: Config, report: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """ingest → train → evaluate → report, for one config. Returns run id, metrics and report path."""
    from pipeline.report import write_report

    tracking.connect(cfg.tracking.uri)  # fail fast, before any work
    run_id = train(cfg, progress)
    metrics = evaluate(cfg, run_id, progress)
    out = Path(report or Path("reports") / f"{cfg.experiment}.html")
    write_report(run_id, out, tracking_uri=cfg.tracking.uri, manifest_dir=cfg.data.manifest)
    with tracking.start_run(cfg.experiment, run_id=run_id):
        tracking.log_artifact(out, "report")
    return {"run_id": run_id, "metrics": metrics, "report": str(out)}


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
    from pipeline.report.fmt import calibration_name
    from pipeline.synthetic import make_cohort

    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log.info("1/5 generating a synthetic chest X-ray cohort of %d patients in %s", n, root / "cohort")
    cohort = make_cohort(root / "cohort", kind="cxr2d", n=n, seed=seed, progress=True)
    cfg = demo_config(root, cohort)
    save_config(cfg, root / "config.yaml")
    result = run(cfg, report=root / "report.html")
    m = result["metrics"]
    method = tracking.get_run(result["run_id"])["tags"].get("calibration_method", cfg.evaluate.calibration)
    print(
        f"\nmedxfer demo finished: test AUROC {m['test_auroc']:.3f} "
        f"(95% CI {m.get('test_auroc_ci_low', float('nan')):.3f}–{m.get('test_auroc_ci_high', float('nan')):.3f}), "
        f"ECE {m['test_ece']:.3f} with {calibration_name(method, m.get('temperature'))} "
        f"({m['test_ece_uncalibrated']:.3f} uncalibrated)"
    )
    print(f"  report:       {result['report']}")
    print(f"  MLflow store: {cfg.tracking.uri}  (run {result['run_id']})")
    print(f"  open the UI:  mlflow ui --backend-store-uri {cfg.tracking.uri}")
    print(f"  config:       {root / 'config.yaml'}  (re-run with: medxfer run {root / 'config.yaml'})")
    return result
