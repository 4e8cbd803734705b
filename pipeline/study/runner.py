"""Run a study: ingest once, train every arm at every lr, select on validation, evaluate each selection once, resume.

Fairness, enforced here and recorded in study.json: one manifest (ingested once through the base
config) and so one split and the same test units for every arm; the same epoch budget (the base
config's); every arm trained once per learning rate of the grid, the run with the best validation
AUROC kept (test is never looked at for the choice); the test split opened once per arm, for the
selected run only, after every arm has trained. MLflow: a parent run (tag kind = study, study_hash)
and one child run per training (tag mlflow.parentRunId; study_arm, study_lr; study_role = arm for
the selected one, lr-trial for the others), each a normal medxfer run; the selected one is
evaluated, registered and given its audit report.

Resume: the same command reuses the parent run with the same study hash, every training whose
child run finished (tag study_trained), and every evaluation that finished (tag stage = evaluated,
status FINISHED); a training that was interrupted (its run left RUNNING by a kill, or FAILED)
continues from its last finished epoch in the same run (`train` with finetune.resume), or trains
anew when its training state is gone; the rest is done.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import tracking
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.run import ensure_manifest, evaluate, load_cohort, manifest_hash, train
from pipeline.run.cohort import TEST_LOG
from pipeline.study.spec import Arm, Study

log = logging.getLogger("medxfer")

KIND = "study"  # the `kind` tag of a study's parent run
PARENT = "mlflow.parentRunId"
TAG_HASH, TAG_NAME, TAG_ARM, TAG_LR = "study_hash", "study_name", "study_arm", "study_lr"
TAG_ROLE, TAG_TRAINED, TAG_DONE = "study_role", "study_trained", "study_done"
REPORTS = "medxfer-reports"


def default_out(study: Study) -> Path:
    """medxfer-reports/study-<name> in the working folder."""
    return Path(REPORTS) / f"study-{study.name}"


def lr_text(lr: float) -> str:
    """The learning rate as tagged and keyed: repr of the float (exact, so resume finds it)."""
    return repr(float(lr))


def run_study(study: Study, out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train, select, evaluate and compare every arm of `study`; write study.json and study.html into `out`.

    Returns:
        The study.json dict (see `pipeline.study.results.summarise`).

    Raises:
        ConfigError, DataError, TrackingError: as `train` and `evaluate` raise them.
    """
    from pipeline.study.results import finish

    base = study.base
    out_dir = Path(out) if out else default_out(study)
    uri = tracking.connect(base.tracking.uri)
    n_runs = len(study.arms) * len(study.lr_grid)
    log.info(
        "study %s: %d arms x %d learning rates = %d trainings; ingesting once into %s",
        study.name,
        len(study.arms),
        len(study.lr_grid),
        n_runs,
        base.data.manifest,
    )
    manifest_dir = ensure_manifest(base, progress)
    mhash = manifest_hash(manifest_dir)
    shash = study.hash(mhash)
    parent = _parent_run(study, shash, mhash)
    trained, unfinished = _child_runs(base.experiment, shash)
    trials: dict[tuple[str, str], str] = {}
    reused, resumed = 0, 0
    for i, (arm, lr) in enumerate(((a, lr) for a in study.arms for lr in study.lr_grid), start=1):
        key = (arm.key, lr_text(lr))
        if key in trained:
            trials[key] = trained[key]
            reused += 1
            log.info("[%d/%d] %s at lr %g: trained before (run %s), reused", i, n_runs, arm.key, lr, trained[key])
            continue
        cfg = _arm_config(study, arm, lr)
        run_id = None
        if key in unfinished:  # interrupted: continue it from its last finished epoch, in the same run
            log.info("[%d/%d] resuming %s at lr %g (run %s)", i, n_runs, arm.key, lr, unfinished[key])
            cfg.finetune.resume = unfinished[key]
            try:
                run_id = train(cfg, progress)
                resumed += 1
            except ConfigError as exc:  # its training state is gone, or it cannot be continued: train anew
                log.warning(
                    "run %s cannot be resumed (%s); training %s at lr %g anew", unfinished[key], exc, arm.key, lr
                )
                cfg.finetune.resume = None
        if run_id is None:
            log.info("[%d/%d] training %s at lr %g", i, n_runs, arm.key, lr)
            tags = {PARENT: parent, TAG_HASH: shash, TAG_NAME: study.name, TAG_ARM: arm.key, TAG_LR: lr_text(lr)}
            run_id = train(cfg, progress, tags=tags)
        tracking.set_run_tags(run_id, {TAG_TRAINED: "1"})
        trials[key] = run_id
    selected = [_select(study, arm, trials) for arm in study.arms]  # validation only: no test split opened yet
    patients: dict[tuple[float, int], int] = {}
    for a in selected:  # labelled training patients of each arm (its nested train fraction), for the learning curve
        subset = (a["arm"].train_fraction, a["arm"].seed)
        if subset not in patients:
            patients[subset] = int(load_cohort(manifest_dir, *subset).split("train")["subject_id"].nunique())
        a["n_train_patients"] = patients[subset]
    best = recommended(selected)
    arms = [_evaluate(study, a, a is best, out_dir, manifest_dir, progress, uri) for a in selected]
    fairness = _fairness(study, arms, trials, manifest_dir, mhash)
    return finish(study, arms, fairness, parent, shash, out_dir, uri, reused=reused, resumed=resumed)


def _arm_config(study: Study, arm: Arm, lr: float) -> Config:
    """The arm's config at `lr`, reading the manifest ingested once (no second ingest)."""
    cfg = copy.deepcopy(study.configs[arm.key][lr])
    cfg.data.source = ""  # the study ingested the base config's source once: every arm reads that manifest
    cfg.data.manifest = study.base.data.manifest
    return cfg


def _parent_run(study: Study, shash: str, mhash: str) -> str:
    """The study's parent run: the newest with this study hash, else a new one (tag kind = study)."""
    exp = tracking.experiment_id(study.base.experiment)
    if exp is not None:
        found = tracking.search_runs(exp, f"tags.kind = '{KIND}' and tags.{TAG_HASH} = '{shash}'", max_results=1)
        if found:
            log.info("resuming study run %s (study hash %s)", found[0]["run_id"], shash)
            return str(found[0]["run_id"])
    tags = {"kind": KIND, TAG_HASH: shash, TAG_NAME: study.name, "manifest_hash": mhash, "study_state": "running"}
    with tracking.start_run(study.base.experiment, run_name=f"study {study.name}", tags=tags) as run_id:
        d = study.describe()
        tracking.log_params(
            {
                "study.name": study.name,
                "study.axes": json.dumps(d["axes"]),
                "study.lr_grid": json.dumps(study.lr_grid),
                "study.reference": json.dumps(study.reference),
                "study.n_arms": len(study.arms),
                "study.hash": shash,
                "manifest_hash": mhash,
                **{f"base.{k}": v for k, v in study.base.flat().items()},
            }
        )
        tracking.log_artifact(study.path, "study")
        tracking.log_artifact(study.base_path, "study")
    return run_id


def _child_runs(experiment: str, shash: str) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], str]]:
    """This study hash's trainings: (arm key, lr) → the newest finished one, and → the newest interrupted one.

    A run is finished when tagged study_trained, or FINISHED with its training metrics logged (the
    study was stopped between the end of its training and the tag: the tag is set now); any other
    run (RUNNING after a kill, FAILED) is interrupted and is resumed with `train --resume`.
    """
    exp = tracking.experiment_id(experiment)
    if exp is None:
        return {}, {}
    found = tracking.search_runs(exp, f"tags.{TAG_HASH} = '{shash}'", max_results=5000)
    trained: dict[tuple[str, str], str] = {}
    unfinished: dict[tuple[str, str], str] = {}
    for r in found:  # newest first: the first seen of a key wins
        if r["tags"].get("kind") == KIND:
            continue
        key, run_id = (r["tags"].get(TAG_ARM, ""), r["tags"].get(TAG_LR, "")), str(r["run_id"])
        if r["tags"].get(TAG_TRAINED) != "1" and r["status"] == "FINISHED" and "epochs_run" in r["metrics"]:
            tracking.set_run_tags(run_id, {TAG_TRAINED: "1"})
            r["tags"][TAG_TRAINED] = "1"
        if r["tags"].get(TAG_TRAINED) == "1":
            trained.setdefault(key, run_id)
        else:
            unfinished.setdefault(key, run_id)
    return trained, {k: v for k, v in unfinished.items() if k not in trained}


def val_auroc_of(run: dict[str, Any]) -> float | None:
    """The validation AUROC of the model a run kept: the val_auroc of its best epoch (else its last)."""
    history = run["history"].get("val_auroc") or []
    if not history:
        return None
    best = run["metrics"].get("best_epoch")
    index = int(best) - 1 if best is not None and 1 <= int(best) <= len(history) else len(history) - 1
    value = float(history[index])
    return value if math.isfinite(value) else None


def select_lr(val: dict[float, float | None]) -> float:
    """The lr of the grid with the highest validation AUROC; ties (and missing values) go to the first listed."""
    return max(val, key=lambda lr: -math.inf if val[lr] is None else float(val[lr]))  # type: ignore[arg-type]


def _select(study: Study, arm: Arm, trials: dict[tuple[str, str], str]) -> dict[str, Any]:
    """Pick the arm's lr on validation (the kept epoch's val AUROC of each training); tag the roles."""
    runs = {lr: tracking.get_run(trials[(arm.key, lr_text(lr))]) for lr in study.lr_grid}
    val = {lr: val_auroc_of(r) for lr, r in runs.items()}
    lr = select_lr(val)
    for other, r in runs.items():
        tracking.set_run_tags(r["run_id"], {TAG_ROLE: "arm" if other == lr else "lr-trial"})
    return {
        "arm": arm,
        "label": study.label(arm),
        "run_id": runs[lr]["run_id"],
        "lr": lr,
        "val_auroc": val[lr],
        "val_auroc_by_lr": {lr_text(k): v for k, v in val.items()},
        "trial_runs": {lr_text(k): r["run_id"] for k, r in runs.items()},
    }


def recommended(selected: list[dict[str, Any]]) -> dict[str, Any]:
    """The selected arm with the best validation AUROC (the first of equals): known before any test is opened."""
    return max(selected, key=lambda a: -math.inf if a["val_auroc"] is None else float(a["val_auroc"]))


def _evaluate(
    study: Study, a: dict[str, Any], register: bool, out_dir: Path, manifest_dir: Path, progress: bool, uri: str
) -> dict[str, Any]:
    """Evaluate the arm's selected run once (unless it was), write and log its audit report.

    Only the recommended arm's model is registered (as the base config's `tracking.register_as`),
    so ``models:/NAME/latest`` is the study's recommendation, not whichever arm was evaluated last.
    """
    from pipeline.report import write_report

    arm, lr, run_id = a["arm"], a["lr"], a["run_id"]
    run = tracking.get_run(run_id)
    evaluated = run["tags"].get("stage") == "evaluated" and run["status"] == "FINISHED"
    cfg = _arm_config(study, arm, lr)
    if not register:
        cfg.tracking.register_as = None
    if evaluated:
        log.info("%s: lr %g selected on validation; evaluated before (run %s), reused", arm.key, lr, run_id)
    else:
        shown = "—" if a["val_auroc"] is None else f"{a['val_auroc']:.3f}"
        log.info("%s: lr %g selected on validation (AUROC %s); evaluating run %s on test", arm.key, lr, shown, run_id)
        evaluate(cfg, run_id, progress)
    report = out_dir / "arms" / f"{slug(arm)}.html"
    if tracking.get_run(run_id)["tags"].get(TAG_DONE) != "1" or not report.is_file():
        write_report(run_id, report, tracking_uri=uri, manifest_dir=manifest_dir)
        with tracking.start_run(cfg.experiment, run_id=run_id):
            tracking.log_artifact(report, "report")
        tracking.set_run_tags(run_id, {TAG_DONE: "1"})
    return {**a, "run": tracking.get_run(run_id), "report": report, "reused_evaluation": evaluated}


def slug(arm: Arm) -> str:
    """A file name for the arm: its key with every run of other characters made '-'."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", arm.key.replace("=", "-")).strip("-")


def _fairness(
    study: Study,
    arms: list[dict[str, Any]],
    trials: dict[tuple[str, str], str],
    manifest_dir: Path,
    mhash: str,
) -> dict[str, Any]:
    """What was held equal, checked from what the runs logged (no pseudonyms: hashes and counts only)."""
    import hashlib

    units: dict[str, str] = {}
    n_units = 0
    with tempfile.TemporaryDirectory(prefix="medxfer-study-") as tmp:
        for a in arms:
            path = tracking.download_artifacts(a["run_id"], "predictions/test.parquet", Path(tmp) / a["run_id"])
            ids = sorted(pd.read_parquet(path, columns=["image_id"])["image_id"].astype(str))
            units[a["run_id"]] = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
            n_units = len(ids)
    try:
        opened = json.loads((manifest_dir / TEST_LOG).read_text())
    except (OSError, ValueError):
        opened = {}
    split_ids = {a["run"]["tags"].get("test_split_id") for a in arms}
    runs_opened: list[str] = []
    for sid in split_ids:
        runs_opened += list((opened.get(sid) or {}).get("runs", []))
    every = sorted(set(trials.values()))
    budgets = {int(tracking.get_run(r)["params"]["finetune.epochs"]) for r in every}
    return {
        "manifest_hash": mhash,
        "test_split_ids": sorted(s for s in split_ids if s),
        "n_test_units": n_units,
        "test_units_sha256": sorted(set(units.values())),
        "same_test_units": len(set(units.values())) == 1 and len(split_ids) == 1,
        "epochs_budget": sorted(budgets),
        "same_epochs_budget": len(budgets) == 1,
        "lr_grid": study.lr_grid,
        "lr_selected_on": "val_auroc of each training's kept (best) epoch; test never read for the choice",
        "test_opened": {r: runs_opened.count(r) for r in every},
    }
