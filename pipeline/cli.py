"""Command line: argument parsing only; each command calls one function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from pipeline import __version__
from pipeline.errors import MedxferError
from pipeline.records import MAX_VOXELS

EPILOG = "Exit codes: 0 success, 1 data error, 2 bad usage or config. Add --debug for a traceback."


def _cmd_demo(a: argparse.Namespace) -> int:
    from pipeline.run import demo

    demo(a.out, n=a.n, seed=a.seed)
    return 0


def _cmd_synth(a: argparse.Namespace) -> int:
    from pipeline.synthetic import make_cohort

    c = make_cohort(a.out, kind=a.kind, n=a.n, seed=a.seed, positive_fraction=a.positive_fraction, progress=True)
    print(
        f"wrote {c.n_files} files for {c.n_patients} patients ({c.n_positive} positive) to {c.archive_dir}; "
        f"labels in {c.labels_csv}"
    )
    return 0


def _cmd_ingest(a: argparse.Namespace) -> int:
    from pipeline.ingest import ingest

    r = ingest(
        a.source,
        a.labels,
        a.out,
        key_file=a.key_file,
        val=a.val,
        test=a.test,
        seed=a.seed,
        strict=a.strict,
        workers=a.workers,
        max_voxels=a.max_voxels,
        progress=True,
        subgroups=a.subgroup or (),
    )
    units = f"{r.n_units} image unit{'s' if r.n_units != 1 else ''}"
    print(f"{units}, {r.n_quarantined} file(s) in quarantine.csv → {r.manifest_dir}")
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from pipeline.config import load_config

    overrides = _overrides(a.set)
    if a.resume:
        overrides.setdefault("finetune", {})["resume"] = a.resume
    cfg = load_config(a.config, overrides)  # before torch and mlflow load: a bad config fails in a second
    from pipeline.run import train

    run_id = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line, not one per process
        print(run_id)
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from pipeline.config import load_config

    cfg = load_config(a.config)  # before torch and mlflow load
    from pipeline.run import evaluate

    metrics = evaluate(cfg, a.run)
    for key in ("test_auroc", "test_auroc_ci_low", "test_auroc_ci_high", "test_ece", "temperature"):
        if key in metrics:
            print(f"{key}: {metrics[key]:.4f}")
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    from pipeline.report import write_report

    print(write_report(a.run, a.out, tracking_uri=a.tracking_uri))
    return 0


def _cmd_compare(a: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError

    ids = [r.strip() for r in a.runs]
    if len(ids) < 2 or not all(ids):  # before mlflow loads: a usage error fails at once
        raise ConfigError(
            f"compare needs at least 2 run ids, got {len([i for i in ids if i])}. "
            "Fix: medxfer compare RUN_A RUN_B [RUN_C ...] (the first is the reference)"
        )
    if a.bootstrap < 0:
        raise ConfigError(f"--bootstrap {a.bootstrap}: expected 0 (DeLong only) or more resamples, e.g. 1000")
    from pipeline.compare import compare_runs, console_table, ensure_out, log_comparison

    out = ensure_out(a.out, ids)
    comp = compare_runs(ids, a.tracking_uri, n_boot=a.bootstrap, seed=a.seed)
    files = log_comparison(comp, out)
    print(console_table(comp))
    print(f"  comparison: {files['html']} (JSON: {files['json']}); MLflow run {comp.mlflow_run_id}")
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    from pipeline.config import load_config

    cfg = load_config(a.config, _overrides(a.set))  # before torch and mlflow load
    from pipeline.run import run
    from pipeline.run.demo import headline

    out = run(cfg, report=a.report)
    print(f"run {out['run_id']}: {headline(out['run_id'], out['metrics'])}")
    print(f"  report: {out['report']}")
    return 0


def _cmd_study(a: argparse.Namespace) -> int:
    from pipeline.study import load_study

    study = load_study(a.study)  # the whole study file and every arm's config, before torch and mlflow load
    if a.dry_run:
        print(f"study {study.name}: {len(study.arms)} arms x {len(study.lr_grid)} learning rates {study.lr_grid}")
        for arm in study.arms:
            ref = study.reference_of(arm)
            print(f"  {study.label(arm)}" + (f"   (reference: {study.label(ref)})" if ref else ""))
        return 0
    if a.out and os.path.exists(a.out) and not os.path.isdir(a.out):
        from pipeline.errors import ConfigError

        raise ConfigError(f"--out {a.out}: is a file; expected a folder for study.json, study.html and arms/")
    from pipeline.study.results import console_table
    from pipeline.study.runner import run_study

    result = run_study(study, a.out)
    print(console_table(result))
    files = result["files"]
    print(f"  study: {files['html']} (JSON: {files['json']}); MLflow run {result['mlflow_parent_run_id']}")
    return 0


PATH_KEYS = ("data.source", "data.labels", "data.manifest", "data.key_file", "prepare.cache_dir", "model.weights_dir")


def _overrides(pairs: Sequence[str] | None) -> dict:
    """`--set SECTION.KEY=VALUE` pairs as a nested dict (values read as YAML); paths relative to the working folder.

    Raises:
        ConfigError: a pair without `=` or without a dotted key.
    """
    import yaml

    from pipeline.errors import ConfigError

    out: dict = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {pair!r}: expected SECTION.KEY=VALUE, e.g. --set finetune.lr=0.001")
        value = yaml.safe_load(text) if text.strip() else None
        if key.strip() in PATH_KEYS and isinstance(value, str) and "://" not in value:
            value = os.path.abspath(os.path.expanduser(value))
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _cmd_score(a: argparse.Namespace) -> int:
    if a.prevalence is not None:  # checked before torch and MLflow load
        from pipeline.stats import check_prevalence

        check_prevalence(a.prevalence)
    from pipeline.score import score

    out = score(
        a.model,
        a.source,
        a.out,
        engine=a.engine,
        tracking_uri=a.tracking_uri,
        labels=a.labels,
        address=a.address,
        batch_size=a.batch_size,
        adapt_bn=a.adapt_bn,
        key_file=a.key_file,
        prevalence=a.prevalence,
    )
    print(f"scored {out['n_ok']} units, {out['n_failed']} failures → {a.out} (summary: {out['metrics_file']})")
    if out["n_failed"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(out["failed_by_reason"].items()))
        print(f"  failures by reason: {reasons}; what each is about: {out['failures_file']}")
    if out.get("prior_shift"):
        ps = out["prior_shift"]
        print(
            f"  prior shift: probabilities moved from the training prevalence {ps['train_prevalence']:.3f} to the "
            f"stated {ps['prevalence']:.3f} (assumed, not measured); decisions at the frozen threshold on them"
        )
    if out.get("external_validation") is not None:
        print(_external_line(out["external_validation"]))
    if out["n_ok"] == 0:
        print(
            f"medxfer score: error: no unit of {a.source} could be scored ({out['n_failed']} failures); "
            f"Fix: see the reasons above and {out['failures_file']}, or score with a model that fits these images",
            file=sys.stderr,
        )
        return 1
    return 0


def _external_line(ev: dict) -> str:
    """One console line of external-validation metrics (as in <out>.metrics.json)."""
    if ev.get("auroc") is None:
        notes = "; ".join(ev.get("notes") or []) or "no labelled unit"
        return f"  external validation on {ev.get('n', 0)} labelled units: {notes}"
    low, high = ev.get("auroc_ci") or (None, None)
    ci = f"95% CI {low:.3f}–{high:.3f}" if low is not None and high is not None else "no CI"
    line = (
        f"  external validation on {ev['n']} labelled units: AUROC {ev['auroc']:.3f} ({ci}), "
        f"ECE {ev['ece']:.3f}, Brier {ev['brier']:.3f}"
    )
    if ev.get("ece_unadjusted") is not None:
        line += f" (prior-shifted; unadjusted ECE {ev['ece_unadjusted']:.3f}, Brier {ev['brier_unadjusted']:.3f})"
    op = ev.get("at_operating_point") or {}
    if op.get("sensitivity") is not None and op.get("specificity") is not None:
        line += f"; at its frozen threshold sensitivity {op['sensitivity']:.3f}, specificity {op['specificity']:.3f}"
    return line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medxfer", description="Medical-imaging transfer learning pipeline.", epilog=EPILOG
    )
    p.add_argument("--version", action="version", version=f"medxfer {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="less logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG)
        sp.set_defaults(func=fn)
        return sp

    sp = add("demo", _cmd_demo, "generate a synthetic chest X-ray cohort and run the whole pipeline on it")
    sp.add_argument("--out", default="medxfer-demo", help="output folder (default ./medxfer-demo)")
    sp.add_argument("--n", type=int, default=240, help="patients in the cohort (default 240)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the generated cohort (default 0)")

    sp = add("synth", _cmd_synth, "write a synthetic DICOM cohort with a known answer, plus labels.csv")
    sp.add_argument("--out", required=True, help="output folder (archive/ and labels.csv go here)")
    sp.add_argument("--kind", default="cxr2d", help="cxr2d (chest X-ray, 2D) or ct3d (chest CT, 3D)")
    sp.add_argument("--n", type=int, default=200, help="number of patients (default 200)")
    sp.add_argument("--seed", type=int, default=0, help="seed: the same seed writes the same cohort (default 0)")
    sp.add_argument(
        "--positive-fraction", type=float, default=0.3, help="share of patients with the finding (default 0.3)"
    )

    sp = add("ingest", _cmd_ingest, "turn a DICOM/NIfTI archive into a pseudonymised manifest")
    sp.add_argument("source", help="archive folder")
    sp.add_argument("--labels", help="labels.csv: patient_id,label[,sex,age,site,...]")
    sp.add_argument("--out", required=True, help="manifest folder, e.g. data_manifests/NAME")
    sp.add_argument("--key-file", help="pseudonym key (default $MEDXFER_KEY_FILE or ~/.medxfer/pseudonym.key)")
    sp.add_argument("--val", type=float, default=0.15, help="share of patients in the validation split (default 0.15)")
    sp.add_argument("--test", type=float, default=0.15, help="share of patients in the test split (default 0.15)")
    sp.add_argument(
        "--seed",
        type=int,
        default=0,
        help="split seed; with the same key file the same patients land in the same split (default 0)",
    )
    sp.add_argument("--strict", action="store_true", help="fail if any file is quarantined")
    sp.add_argument("--workers", type=int, default=1, help="processes decoding files in parallel (default 1)")
    sp.add_argument(
        "--max-voxels",
        type=int,
        default=MAX_VOXELS,
        help="quarantine (too-large, unread) any file or image unit declaring more voxels, rows × columns × "
        f"frames (default {MAX_VOXELS:,}, above any clinical image; data.max_voxels in a config)",
    )
    sp.add_argument(
        "--subgroup",
        action="append",
        metavar="COLUMN",
        help="a labels.csv column to carry to the manifest as a subgroup (repeatable); sex, age (as age_band) "
        "and site are carried by default, every other column (free text, comments) is left out",
    )

    sp = add(
        "train",
        _cmd_train,
        "prepare + adapt + fine-tune; prints the MLflow run id. Multi-GPU: "
        "torchrun --nproc-per-node N -m pipeline train CONFIG (finetune.batch_size is the global batch)",
    )
    sp.add_argument("config", help="experiment YAML (see configs/)")
    _add_set(sp)
    sp.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue an interrupted run from its last finished epoch (same MLflow run; needs the same config)",
    )

    sp = add("evaluate", _cmd_evaluate, "calibrate, measure on the test split, log and register the model")
    sp.add_argument("config", help="the experiment YAML the run was trained with")
    sp.add_argument("--run", required=True, help="MLflow run id printed by `train`")

    sp = add("report", _cmd_report, "write the HTML audit report of a run")
    sp.add_argument("--run", required=True, help="MLflow run id")
    sp.add_argument("--out", required=True, help="report file, e.g. reports/NAME.html")
    sp.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")

    sp = add(
        "compare",
        _cmd_compare,
        "paired, patient-clustered comparison of evaluated runs on the same test units: ΔAUROC (clustered "
        "DeLong and paired bootstrap), ΔBrier, ΔECE, ΔNLL, sensitivity/specificity at each run's frozen threshold",
    )
    sp.add_argument(
        "runs", nargs="+", metavar="RUN_ID", help="two or more evaluated MLflow runs; the first is the reference"
    )
    sp.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    sp.add_argument(
        "--out", help="folder for comparison.json and comparison.html (default medxfer-reports/compare-<run ids>)"
    )
    sp.add_argument("--bootstrap", type=int, default=1000, help="paired-bootstrap resamples of patients (default 1000)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")

    sp = add("run", _cmd_run, "ingest, train, evaluate and report for one config")
    sp.add_argument("config", help="experiment YAML (see configs/), or a run's logged config.json")
    _add_set(sp)
    sp.add_argument("--report", help="report file (default medxfer-reports/<experiment>-<run>.html)")

    sp = add(
        "study",
        _cmd_study,
        "the transfer-learning experiment: arms over weights, strategy, backbone, prepare.dims, train_fraction and "
        "seeds from one base config, one manifest and split, each arm's lr chosen on validation, test opened once "
        "per arm, paired ΔAUROC against the reference arm; resumable (run the same command again)",
    )
    sp.add_argument("study", help="study YAML (see configs/study-cxr-demo.yaml)")
    sp.add_argument("--out", help="folder for study.json, study.html and arms/ (default medxfer-reports/study-<name>)")
    sp.add_argument("--dry-run", action="store_true", help="validate the study file and list its arms; train nothing")

    sp = add("score", _cmd_score, "score an archive with a registered model")
    sp.add_argument("source", help="archive folder")
    sp.add_argument(
        "--model", required=True, help="models:/NAME/VERSION, models:/NAME/latest, runs:/ID/model or a path"
    )
    sp.add_argument("--out", required=True, help="predictions.parquet")
    sp.add_argument(
        "--engine", default="local", help="local (default) or ray; engines are registered in pipeline/score/engines.py"
    )
    sp.add_argument("--labels", help="labels.csv for external validation")
    sp.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    sp.add_argument(
        "--address", help="Ray cluster for --engine ray, e.g. ray://HEAD:10001 or auto (default: start a local Ray)"
    )
    sp.add_argument("--batch-size", type=int, default=16, help="image units per forward pass (default 16)")
    sp.add_argument(
        "--adapt-bn",
        action="store_true",
        help="re-estimate BatchNorm statistics on this archive before scoring (AdaBN)",
    )
    sp.add_argument("--key-file", help="pseudonym key (default $MEDXFER_KEY_FILE or ~/.medxfer/pseudonym.key)")
    sp.add_argument(
        "--prevalence",
        type=float,
        metavar="P",
        help="binary models: the positive share this site expects, in (0, 1); probabilities are moved from the "
        "training prevalence to it (an assumption; AUROC unchanged) and prob_unadjusted keeps the model's own",
    )
    return p


def _add_set(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set finetune.lr=0.001 --set data.source=/archive; "
        "paths are relative to the working folder",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `medxfer` and `python -m pipeline`; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow sets its own level on import
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout is medxfer's (train: the run id)
    try:
        return args.func(args)
    except MedxferError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"medxfer {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a full disk in a command without its own clean-up (train, report, ...)
        from pipeline.io import disk_full_message, is_disk_full

        if not is_disk_full(exc):
            raise
        if args.debug:
            traceback.print_exc()
        target = exc.filename or getattr(args, "out", None)  # the file being written, else the command's --out
        where = os.path.abspath(target) if target else "its output folder"
        done = "Manifests, checkpoints and reports already written are intact (each goes to a temp file, then renamed)."
        message = disk_full_message(args.command, where, exc, done=done)
        print(f"medxfer {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"medxfer {args.command}: interrupted; files already written are intact", file=sys.stderr)
        return 130
    except Exception as exc:  # a tracking server that went away outside a run (downloads, registry lookups)
        tracking = sys.modules.get("pipeline.tracking")
        lost = tracking.server_lost(exc) if tracking is not None else None
        if tracking is None or lost is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(
            f"medxfer {args.command}: error: the MLflow server {tracking.current_uri()} stopped answering "
            f"({lost}); nothing local was removed. Fix: restart the server, then run the "
            "same command again",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
