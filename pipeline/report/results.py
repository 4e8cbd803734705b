"""Report sections on results and origin: test performance, calibration, subgroups, transfer, provenance."""

from __future__ import annotations

import json
from typing import Any

import yaml

from pipeline.evaluate import CONFOUNDED
from pipeline.report.compare import comparison_blocks
from pipeline.report.facts import Facts
from pipeline.report.fmt import (
    DASH,
    NA,
    as_float,
    as_floats,
    calibration_name,
    ci,
    count,
    duration,
    figures,
    group,
    kv,
    note,
    note_level,
    num,
    para,
    pre,
    rate_with_ci,
    section,
    signed_with_ci,
    table,
    with_ci,
)


def _not_evaluated(sid: str, title: str, f: Facts) -> dict[str, Any]:
    return section(
        sid,
        title,
        [
            note(
                f"Not available: run {f.run_id} has not been evaluated. Run `medxfer evaluate "
                f"CONFIG --run {f.run_id}` and re-render this report.",
                NA,
            )
        ],
    )


def performance_section(f: Facts) -> dict[str, Any]:
    """The Test performance section: discrimination metrics with CIs, operating points, ROC/PR/confusion figures."""
    if not f.evaluated:
        return _not_evaluated("performance", "Test performance", f)
    m, e = f.metrics, f.evaluation
    d = e.get("discrimination") or {}
    dep = d.get("deployed") if isinstance(d.get("deployed"), dict) else {}
    at = f"at the {dep.get('rule')} threshold {num(dep.get('threshold'))}" if dep else "arg-max"
    rows = [
        (
            "AUROC (95% CI, patient bootstrap)",
            with_ci(m.get("test_auroc"), m.get("test_auroc_ci_low"), m.get("test_auroc_ci_high")),
        ),
        ("AUPRC", num(m.get("test_auprc"))),
        *[
            (
                f"{name} ({at})",
                num(dep.get(key)) if dep else num(m.get(f"test_{key}")),
            )
            for name, key in (("Accuracy", "accuracy"), ("Balanced accuracy", "balanced_accuracy"), ("F1", "f1"))
        ],
        (
            "At the arg-max instead (P ≥ 0.5; not how the model decides)",
            f"accuracy {num(m.get('test_accuracy'))}, balanced accuracy {num(m.get('test_balanced_accuracy'))}, "
            f"F1 {num(m.get('test_f1'))}"
            if dep
            else None,
        ),
        ("Test images / patients", f"{count(m.get('test_n_images'))} / {count(m.get('test_n_patients'))}"),
        ("Bootstrap resamples", f.setting("evaluate.bootstrap")),
    ]
    blocks: list[dict[str, Any]] = [
        kv(rows),
        figures(
            [
                ("roc", "ROC curve (test) with operating points"),
                ("pr", "Precision–recall curve (test)"),
                ("confusion", f"Confusion matrix (test, {at})"),
            ],
            f.figures,
        ),
    ]
    ops = [o for o in e.get("operating_points") or [] if isinstance(o, dict)]
    if ops:
        head = [
            "rule",
            "threshold",
            "val sens",
            "val spec",
            "test sens",
            "test spec",
            "test PPV",
            "test NPV",
            "TP",
            "FP",
            "TN",
            "FN",
        ]
        rows_ = [
            [
                o.get("rule", DASH),
                num(o.get("threshold")),
                *[num((o.get("val") or {}).get(k)) for k in ("sensitivity", "specificity")],
                *[rate_with_ci(o.get("test"), k) for k in ("sensitivity", "specificity", "ppv", "npv")],
                *[count((o.get("test") or {}).get(k)) for k in ("tp", "fp", "tn", "fn")],
            ]
            for o in ops
        ]
        caption = "Operating points: thresholds chosen on validation, frozen for test; test rates with 95% CIs"
        blocks.append(table(head, rows_, caption + " (patient bootstrap)"))
    elif e:
        blocks.append(note("No operating points: they are defined for binary tasks only.", NA))
    cm = dep.get("confusion_matrix") if dep else d.get("confusion_matrix")
    if isinstance(cm, list) and cm:
        names = f.classes if len(f.classes) == len(cm) else [str(i) for i in range(len(cm))]
        blocks.append(
            table(
                ["true \\ predicted", *names],
                [[names[i], *[count(v) for v in row]] for i, row in enumerate(cm)],
                f"Confusion matrix counts ({at}: the decisions the registered model makes)"
                if dep
                else "Confusion matrix counts (arg-max)",
            )
        )
    for text in e.get("notes") or []:
        blocks.append(note(str(text), note_level(str(text))))
    return section("performance", "Test performance", blocks)


def calibration_section(f: Facts) -> dict[str, Any]:
    """The Calibration section: which calibration and why, the panel before/after with CIs, the reliability diagram."""
    if not f.evaluated:
        return _not_evaluated("calibration", "Calibration", f)
    m = f.metrics
    rel = f.evaluation.get("reliability") or {}
    n_bins = int(as_float(m.get("ece_n_bins")) or as_float(rel.get("n_bins")) or 15)
    choice = f.calibration
    fitted = calibration_name(choice.get("method"), m.get("temperature"))

    def cell(key: str, digits: int = 3) -> str:
        return with_ci(m.get(key), m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high"), digits)

    rows = [
        [
            "ECE",
            cell("test_ece_uncalibrated"),
            cell("test_ece"),
            signed_with_ci(m.get("test_ece_change"), m.get("test_ece_change_ci_low"), m.get("test_ece_change_ci_high")),
        ],
        [
            "Calibration slope (ideal 1)",
            cell("test_calibration_slope_uncalibrated", 2),
            cell("test_calibration_slope", 2),
            "",
        ],
        [
            "Calibration intercept (ideal 0)",
            cell("test_calibration_intercept_uncalibrated", 2),
            cell("test_calibration_intercept", 2),
            "",
        ],
        [
            "Brier score (0–1; multi-class: sum over classes, 0–2)",
            num(m.get("test_brier_uncalibrated")),
            num(m.get("test_brier")),
            "",
        ],
        ["NLL", num(m.get("test_nll_uncalibrated")), num(m.get("test_nll")), ""],
    ]
    requested = choice.get("requested")
    extra = [
        ("Requested (evaluate.calibration)", requested or DASH),
        ("Fitted on validation", fitted),
        ("Why", choice.get("reason")),
        ("Temperature T", num(m.get("temperature"), 3) if as_float(m.get("temperature")) else None),
        (
            "Validation images (smallest class)",
            f"{count(choice.get('n_val'))} ({count(choice.get('smallest_class'))})" if choice.get("n_val") else None,
        ),
        ("Bins", f"{n_bins} equal-width confidence bins (top label)"),
        ("Scaled Brier (after; 1 − Brier / Brier of the prevalence)", num(m.get("test_brier_scaled"))),
        ("MCE (after)", num(m.get("test_mce"))),
        ("Class-wise ECE (after)", num(m.get("test_classwise_ece"))),
    ]
    blocks = [
        group(
            [
                table(
                    ["metric", "before (softmax)", f"after: {fitted}", "change (after − before)"],
                    rows,
                    "Calibration panel on test: 95% CIs by patient bootstrap (same resamples before and after)",
                ),
                kv(extra),
            ]
        ),
        para(
            "Slope < 1 means the predictions are too extreme (overconfident), > 1 too moderate; intercept > 0 means "
            "risks are underestimated on average (Van Calster et al. 2019). A change in ECE whose CI includes 0 is "
            "within sampling error; only one whose CI lies above 0 is reported as calibration making ECE worse."
        ),
    ]
    fig = figures([("reliability", "Reliability diagram, before and after calibration")], f.figures)
    after = rel.get("after") or {}
    edges, counts = as_floats(after.get("edges")), as_floats(after.get("count"))
    conf, acc = as_floats(after.get("confidence")), as_floats(after.get("accuracy"))
    if counts and len(edges) == len(counts) + 1 and len(conf) == len(acc) == len(counts):
        body = [
            [
                f"{num(edges[i], 2)}–{num(edges[i + 1], 2)}",
                count(counts[i]),
                num(conf[i]),
                num(acc[i]),
                num(abs(acc[i] - conf[i]) if acc[i] is not None and conf[i] is not None else None),  # type: ignore[operator]
            ]
            for i in range(len(counts))
            if counts[i]
        ]
        blocks.append(
            group(
                [
                    fig,
                    table(
                        ["confidence bin", "images", "mean confidence", "accuracy", "gap"],
                        body,
                        f"Reliability bins after calibration (non-empty of {len(counts)})",
                    ),
                ]
            )
        )
    else:
        blocks.append(fig)
    return section("calibration", "Calibration", blocks)


def subgroups_section(f: Facts) -> dict[str, Any]:
    """The Subgroups section: test metrics per value of each configured subgroup attribute."""
    if not f.evaluated:
        return _not_evaluated("subgroups", "Subgroups", f)
    rows = [r for r in f.evaluation.get("subgroups") or [] if isinstance(r, dict)]
    if not rows:
        wanted = f.setting("evaluate.subgroups") or []
        return section(
            "subgroups",
            "Subgroups",
            [
                note(
                    f"No subgroup results (configured: {wanted or 'none'}); the "
                    "attributes may be absent from the manifest.",
                    NA,
                )
            ],
        )
    head = [
        "attribute",
        "group",
        "images",
        "patients",
        "positives",
        "prevalence",
        "AUROC",
        "95% CI",
        "sensitivity",
        "specificity",
        "flag",
    ]
    body = [
        [
            str(r.get("attribute")).replace("_", " "),
            r.get("value"),
            count(r.get("n")),
            count(r.get("n_patients")),
            count(r.get("n_pos")),
            num(r.get("prevalence"), 2),
            num(r.get("auroc")),
            ci(r.get("ci_low"), r.get("ci_high"), 3),
            num(r.get("sensitivity")),
            num(r.get("specificity")),
            "too\u00a0few" if r.get("too_few") else "",
        ]
        for r in rows
    ]
    n_few = sum(1 for r in rows if r.get("too_few"))
    blocks = [table(head, body, "Test-set subgroups; sensitivity and specificity at the first operating point")]
    text = (
        "CIs resample patients. Groups with fewer than 10 positives or negatives are flagged \u201ctoo few\u201d "
        "and get no AUROC; differences between small groups are not evidence of bias, nor of its absence."
    )
    blocks.append(
        note(text if not n_few else f"{n_few} group(s) flagged as too small. {text}", "warn" if n_few else "info")
    )
    blocks += [note(str(t)) for t in f.evaluation.get("notes") or [] if CONFOUNDED in str(t)]
    return section("subgroups", "Subgroups", blocks)


def transfer_section(f: Facts) -> dict[str, Any]:
    """The Transfer gain section: this run against the experiment's from-scratch run, or how to make one."""
    if str(f.setting("model.weights")) == "none":
        return section(
            "transfer",
            "Transfer gain",
            [
                note(
                    "This run is itself trained from scratch (model.weights = "
                    "none): it is the baseline for pretrained runs of this "
                    "experiment."
                )
            ],
        )
    b = f.baseline
    if not b:
        how = (
            "# copy the config, set model.weights: none (and finetune.strategy: finetune: a linear probe\n"
            "# on random features measures nothing), keep experiment and tracking.uri, then:\n"
            "medxfer run config-scratch.yaml\n"
            f"medxfer report --run {f.run_id} --out report.html   # the gain then appears here"
        )
        return section(
            "transfer",
            "Transfer gain",
            [
                note(
                    "No from-scratch run (model.weights = none) found in this "
                    "experiment, so the gain from ImageNet pretraining is not "
                    "measured.",
                    NA,
                ),
                pre(how, "How to produce one"),
            ],
        )
    m, bm = f.metrics, b.get("metrics") or {}
    rows = []
    for name, key, digits in (
        ("test AUROC", "test_auroc", 3),
        ("test AUPRC", "test_auprc", 3),
        ("sensitivity", "test_sensitivity", 3),
        ("specificity", "test_specificity", 3),
        ("ECE", "test_ece", 3),
        ("Brier", "test_brier", 3),
    ):
        a, z = as_float(m.get(key)), as_float(bm.get(key))
        rows.append(
            [name, num(a, digits), num(z, digits), f"{a - z:+.{digits}f}" if a is not None and z is not None else DASH]
        )
    rows.insert(
        1,
        [
            "AUROC 95% CI",
            ci(m.get("test_auroc_ci_low"), m.get("test_auroc_ci_high"), 3),
            ci(bm.get("test_auroc_ci_low"), bm.get("test_auroc_ci_high"), 3),
            "",
        ],
    )
    rows += [
        ["epochs run", count(m.get("epochs_run")), count(bm.get("epochs_run")), ""],
        ["training time", duration(m.get("train_seconds")), duration(bm.get("train_seconds")), ""],
    ]
    blocks = [
        table(
            ["metric", "this run", "from scratch", "difference"],
            rows,
            f"This run vs from-scratch run {b.get('run_id')}",
        )
    ]
    if (b.get("tags") or {}).get("manifest_hash") != f.tags.get("manifest_hash"):
        blocks.append(
            note("The from-scratch run used a different manifest: the comparison is not like for like.", "warn")
        )
    if "test_auroc" not in bm:
        blocks.append(note("The from-scratch run has not been evaluated yet.", NA))
    blocks += comparison_blocks(f.context.get("comparison"))
    return section("transfer", "Transfer gain", blocks)


def provenance_section(f: Facts) -> dict[str, Any]:
    """The Provenance section: code, data and weight hashes, package versions, config, reproduce command."""
    t, c = f.tags, f.context
    hash_now = f.cohort.get("manifest_hash")
    mhash = t.get("manifest_hash")
    rows = [
        ("MLflow run", f.run_id),
        ("Experiment", f"{f.experiment or DASH} (id {f.run.get('experiment_id', DASH)})"),
        ("Tracking store", c.get("tracking_uri")),
        ("Run status", f.run.get("status")),
        ("Model URI", t.get("model_uri")),
        ("Registered model (name/version)", t.get("registered_model")),
        ("Git commit", t.get("git_commit")),
        ("Config hash", t.get("config_hash")),
        (
            "Manifest hash",
            (mhash or DASH)
            + (
                ""
                if not hash_now
                else " (matches the manifest read for this report)"
                if hash_now == mhash
                else f" (manifest now {hash_now}: changed since)"
            ),
        ),
        ("Prepare hash", t.get("prepare_hash")),
        ("Weights sha256", t.get("weights_sha256")),
    ]
    blocks: list[dict[str, Any]] = [kv(rows)]
    logged = {}
    reqs = c.get("requirements")
    for req in reqs if isinstance(reqs, list) else []:
        name, _, ver = str(req).partition("==")
        logged[name.strip().lower()] = ver.strip() or str(req)
    env: dict[str, Any] = c["environment"] if isinstance(c.get("environment"), dict) else {}
    names = list(dict.fromkeys([*logged, *env]))
    if names:
        blocks.append(
            table(
                ["package", "logged with the model", "this report's environment"],
                [[n, logged.get(n, DASH), env.get(n, DASH)] for n in names],
                "Package versions",
                [False, False, False],
            )
        )
    blocks.append(pre(_reproduce(f), "Reproduce this run"))
    if f.config:
        blocks.append(
            pre(
                yaml.dump(
                    json.loads(json.dumps(f.config, default=str)),
                    Dumper=_ConfigDumper,
                    sort_keys=False,
                    default_flow_style=False,
                    width=100,
                ),
                f"Config (the run's config.json as YAML; hash {t.get('config_hash', DASH)})",
            )
        )
    else:
        blocks.append(note("config.json not available for this run.", NA))
    return section("provenance", "Provenance", blocks)


class _ConfigDumper(yaml.SafeDumper):
    """YAML as people write configs: nested mappings in block style, lists inline ([224, 224])."""


_ConfigDumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _reproduce(f: Facts) -> str:
    """Commands that re-run this run on another machine: the same commit, the logged config, your own paths.

    Paths of the machine the run came from are not repeated: the config's paths are replaced with
    placeholders in capitals (ARCHIVE, LABELS_CSV, KEY_FILE) that the reader fills in; every other
    setting comes from the logged config.json as it is.
    """
    commit = f.tags.get("git_commit")
    uri = f.context.get("tracking_uri") or "sqlite:///mlflow.db"
    lines = [
        "# 1. the same code, in a venv of its own (no activation needed)",
        f"git checkout {commit}" if commit and commit != "unknown" else "# commit unknown: same medxfer version",
        "python3.11 -m venv .venv && .venv/bin/pip install -e .",
        f"# 2. this run's config as logged (store: {uri}; elsewhere, the address of that store)",
        f"MLFLOW_TRACKING_URI={uri} .venv/bin/python -m mlflow artifacts download \\",
        f"    --run-id {f.run_id} --artifact-path config.json --dst-path repro",
        "# 3. run it on the same archive and labels with the same key file (the key fixes the split);",
        "#    ARCHIVE, LABELS_CSV and KEY_FILE are placeholders for your paths",
        ".venv/bin/medxfer run repro/config.json --set data.source=ARCHIVE --set data.labels=LABELS_CSV \\",
        "    --set data.key_file=KEY_FILE --set data.manifest=repro/manifest --set prepare.cache_dir=repro/cache \\",
        "    --set tracking.uri=sqlite:///repro/mlflow.db --report repro/report.html",
    ]
    return "\n".join(lines)
