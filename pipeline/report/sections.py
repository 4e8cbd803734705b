"""Turn a report context into the view the template renders: summary, cohort, data, model, training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from pipeline import __version__
from pipeline.report.fmt import (
    DASH,
    as_float,
    as_list,
    count,
    duration,
    figures,
    group,
    kv,
    note,
    num,
    section,
    table,
)
from pipeline.report.results import (
    calibration_section,
    performance_section,
    provenance_section,
    subgroups_section,
    transfer_section,
    warning_lines,
)

NA = "na"


@dataclass
class Facts:
    """The parts of a report context, each defaulting to empty when absent."""

    run_id: str = "unknown"
    experiment: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    adaptation: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)
    cohort: dict[str, Any] = field(default_factory=dict)
    ingest: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None
    context: dict[str, Any] = field(default_factory=dict)

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A config value by 'section.key': the logged config.json first, then the flat params."""
        node: Any = self.config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
        return self.params.get(dotted, default)

    @property
    def classes(self) -> list[str]:
        return [
            str(c)
            for c in (
                self.evaluation.get("classes")
                or as_list(self.params.get("classes"))
                or self.cohort.get("classes")
                or []
            )
        ]

    @property
    def evaluated(self) -> bool:
        return bool(self.evaluation) or "test_auroc" in self.metrics


def facts(context: dict[str, Any]) -> Facts:
    """Read a context defensively: every part may be missing or None."""

    def d(x: Any) -> dict[str, Any]:
        return x if isinstance(x, dict) else {}

    c = d(context)
    run = d(c.get("run"))

    return Facts(
        run_id=str(c.get("run_id") or run.get("run_id") or "unknown"),
        experiment=c.get("experiment"),
        params=d(run.get("params")),
        metrics=d(run.get("metrics")),
        tags=d(run.get("tags")),
        history=d(run.get("history")),
        run=d(run),
        config=d(c.get("config")),
        adaptation=d(c.get("adaptation")),
        training=d(c.get("training")),
        evaluation=d(c.get("evaluation")),
        figures=d(c.get("figures")),
        cohort=d(c.get("cohort")),
        ingest=d(c.get("ingest")),
        baseline=d(c.get("baseline")) or None,
        context=c,
    )


def build_view(context: dict[str, Any]) -> dict[str, Any]:
    """The template's variables: header, summary, sections (each a list of blocks) and warnings."""
    f = facts(context)
    try:
        warnings = warning_lines(f)
    except _SHAPE_ERRORS as exc:
        warnings = [{"level": "warn", "text": f"warnings could not be collected ({type(exc).__name__}: {exc})"}]
    builders: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
        ("summary", "Summary", lambda: summary_section(f, warnings)),
        ("cohort", "Cohort", lambda: cohort_section(f)),
        ("exclusions", "Exclusions", lambda: exclusions_section(f)),
        ("preprocessing", "Preprocessing", lambda: preprocessing_section(f)),
        ("model", "Model card", lambda: model_section(f)),
        ("training", "Training", lambda: training_section(f)),
        ("performance", "Test performance", lambda: performance_section(f)),
        ("calibration", "Calibration", lambda: calibration_section(f)),
        ("subgroups", "Subgroups", lambda: subgroups_section(f)),
        ("transfer", "Transfer gain", lambda: transfer_section(f)),
        ("provenance", "Provenance", lambda: provenance_section(f)),
    ]
    sections = [_guarded(sid, title, build) for sid, title, build in builders]
    sections.append(
        section(
            "warnings", "Warnings", [{"type": "warnings", "items": warnings}] if warnings else [note("No warnings.")]
        )
    )
    title = f"Audit report: {f.experiment or f.setting('experiment') or 'medxfer run'}"
    header = [
        ("run", f.run_id),
        ("experiment", f.experiment or f.setting("experiment") or DASH),
        ("trained", f.run.get("start_time") or DASH),
        ("generated", f.context.get("generated_at") or DASH),
        ("status", f.tags.get("stage") or f.run.get("status") or DASH),
    ]
    return {"title": title, "header": header, "sections": sections, "version": __version__}


# What malformed run data raises (a string where a list belongs, ...): a section says so, the report goes on.
_SHAPE_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError)


def _guarded(sid: str, title: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return build()
    except _SHAPE_ERRORS as exc:
        return section(
            sid,
            title,
            [
                note(
                    f"This section could not be rendered: the run's data for it is malformed "
                    f"({type(exc).__name__}: {exc}). The other sections are unaffected.",
                    "warn",
                )
            ],
        )


def headline(f: Facts) -> str | None:
    """'AUROC 0.87 (95% CI 0.80–0.93) on 72 test images from 72 patients', or None before evaluation."""
    m = f.metrics
    if as_float(m.get("test_auroc")) is None:
        return None
    text = f"AUROC {num(m['test_auroc'], 2)}"
    if as_float(m.get("test_auroc_ci_low")) is not None and as_float(m.get("test_auroc_ci_high")) is not None:
        text += f" (95% CI {num(m['test_auroc_ci_low'], 2)}–{num(m['test_auroc_ci_high'], 2)})"
    n_img = as_float(m.get("test_n_images")) or as_float(f.params.get("n_test"))
    if n_img is not None:
        text += f" on {count(n_img)} test images"
        if as_float(m.get("test_n_patients")) is not None:
            text += f" from {count(m['test_n_patients'])} patients"
    return text


def _task(f: Facts) -> str:
    classes = f.classes
    kind = "binary" if len(classes) == 2 else f"{len(classes)}-class" if classes else "classification"
    modality = (
        "/".join(
            str(r[0])
            for a in f.cohort.get("attributes", [])
            if a.get("name") == "modality"
            for r in a.get("rows", [])
            if r[0] != "missing"
        )
        or None
    )
    dims = f.setting("prepare.dims")
    what = " ".join(x for x in (modality, f"{dims.upper()}" if dims else None, "images") if x)
    text = f"{kind.capitalize()} classification of {what}" if classes else f"Classification of {what}"
    if classes:
        text += f"; classes {', '.join(classes)}" + (f" (positive: {classes[-1]})" if len(classes) == 2 else "")
    return text


def _model_line(f: Facts) -> str:
    weights = f.setting("model.weights", DASH)
    sha = f.adaptation.get("weights_sha256") or f.params.get("weights_sha256")
    parts = [
        str(f.setting("model.backbone", "unknown backbone")),
        f"{weights} weights" + (f" (sha256 {sha[:12]}…)" if sha and sha != "none" else ""),
        f"strategy {f.setting('finetune.strategy', DASH)}",
    ]
    reg = f.tags.get("registered_model")
    return " · ".join(parts) + (f" · registered as {reg}" if reg else "")


def _cards(f: Facts) -> list[dict[str, str]]:
    m = f.metrics
    cards = [
        (
            "AUROC",
            num(m.get("test_auroc"), 3),
            f"95% CI {num(m.get('test_auroc_ci_low'), 3)}–{num(m.get('test_auroc_ci_high'), 3)}",
        ),
        ("AUPRC", num(m.get("test_auprc"), 3), "test, positive class"),
        ("Sensitivity", num(m.get("test_sensitivity"), 3), _op_sub(f)),
        ("Specificity", num(m.get("test_specificity"), 3), _op_sub(f)),
        ("ECE", num(m.get("test_ece"), 3), f"calibrated; {num(m.get('test_ece_uncalibrated'), 3)} before"),
        ("Brier", num(m.get("test_brier"), 3), "calibrated; summed over classes, 0–2"),
    ]
    return [{"label": a, "value": b, "sub": c} for a, b, c in cards if b != DASH]


def _op_sub(f: Facts) -> str:
    ops = f.evaluation.get("operating_points") or []
    if ops and isinstance(ops[0], dict):
        return f"at {ops[0].get('rule')} threshold {num(ops[0].get('threshold'), 3)}"
    return "at the first operating point"


def verdicts(f: Facts) -> list[str]:
    """One-line findings for the summary (each a plain sentence)."""
    m, out = f.metrics, []
    line = headline(f)
    if line:
        out.append(line + ".")
    ops = [o for o in f.evaluation.get("operating_points") or [] if isinstance(o, dict)]
    for op in ops[:2]:
        t = op.get("test") or {}
        out.append(
            f"At the {op.get('rule')} operating point (threshold {num(op.get('threshold'), 3)}, fixed on "
            f"validation): sensitivity {num(t.get('sensitivity'), 2)}, specificity "
            f"{num(t.get('specificity'), 2)}, PPV {num(t.get('ppv'), 2)}, NPV {num(t.get('npv'), 2)} on test."
        )
    if as_float(m.get("test_ece")) is not None:
        how = (
            f"after temperature scaling (T = {num(m['temperature'], 2)})"
            if as_float(m.get("temperature"))
            else f"after {f.setting('evaluate.calibration', 'calibration')}"
        )
        bins = int(as_float(m.get("ece_n_bins")) or (f.evaluation.get("reliability") or {}).get("n_bins") or 15)
        out.append(
            f"Calibration: ECE {num(m['test_ece'], 3)} {how}, {num(m.get('test_ece_uncalibrated'), 3)} "
            f"before ({bins} equal-width confidence bins)."
        )
    if (
        f.baseline
        and as_float(f.baseline.get("metrics", {}).get("test_auroc")) is not None
        and as_float(m.get("test_auroc")) is not None
    ):
        base = float(f.baseline["metrics"]["test_auroc"])
        out.append(
            f"Transfer gain: AUROC {float(m['test_auroc']) - base:+.2f} over a from-scratch run ({num(base, 2)})."
        )
    rows = [r for r in f.evaluation.get("subgroups") or [] if isinstance(r, dict) and as_float(r.get("auroc"))]
    if rows:
        low = min(rows, key=lambda r: float(r["auroc"]))
        out.append(
            f"Lowest subgroup AUROC: {low.get('attribute')} = {low.get('value')}, {num(low['auroc'], 2)} "
            f"on {count(low.get('n'))} images."
        )
    return out


def summary_section(f: Facts, warnings: list[dict[str, str]]) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = [kv([("Task", _task(f)), ("Model", _model_line(f)), ("Data", _data_line(f))])]
    if f.evaluated:
        blocks.append({"type": "cards", "items": _cards(f)})
    else:
        blocks.append(
            note(
                "Test performance not available: this run has not been evaluated yet. Run "
                f"`medxfer evaluate CONFIG --run {f.run_id}`, then re-render the report.",
                NA,
            )
        )
    lines = verdicts(f)
    n_warn = sum(1 for w in warnings if w["level"] == "warn")
    if n_warn:
        lines.append(f"{n_warn} warning{'s' if n_warn > 1 else ''}: see the Warnings section.")
    blocks.append({"type": "list", "items": lines})
    return section("summary", "Summary", blocks)


def _data_line(f: Facts) -> str:
    n = {s: f.params.get(f"n_{s}") for s in ("train", "val", "test")}
    text = ", ".join(f"{count(v)} {s}" for s, v in n.items() if v is not None)
    return (text + " images (patient-level split)") if text else DASH


def cohort_section(f: Facts) -> dict[str, Any]:
    c = f.cohort
    if not c.get("by_split"):
        return section(
            "cohort",
            "Cohort",
            [note("Cohort counts not available: neither the manifest nor the run's splits.json could be read.", NA)],
        )
    classes = c.get("classes") or []
    blocks: list[dict[str, Any] | None] = [
        table(
            ["split", "images", "patients", *[f"class {k}" for k in classes]],
            [[r[0], *[count(v) for v in r[1:]]] for r in c["by_split"]],
            "Images and patients by split",
        )
    ]
    if c.get("source") == "splits.json":
        blocks.insert(
            0,
            note(
                "From the run's splits.json: the manifest folder was not available, so the "
                "breakdown by sex, age band, site and manufacturer is missing.",
                NA,
            ),
        )
    splits = c.get("splits") or []
    blocks.append(
        group(
            [
                table(
                    [a["name"].replace("_", " "), *splits, "total"],
                    [[r[0], *[count(v) for v in r[1:]]] for r in a.get("rows", [])],
                    f"Images by {a['name'].replace('_', ' ')} and split",
                )
                for a in c.get("attributes") or []
            ]
        )
    )
    return section(
        "cohort", "Cohort", blocks, "Counts come from the pseudonymised manifest; patients never span two splits."
    )


def exclusions_section(f: Facts) -> dict[str, Any]:
    g = f.ingest
    blocks: list[dict[str, Any] | None] = []
    tables: list[dict[str, Any] | None] = []
    if not g:
        return section(
            "exclusions",
            "Exclusions",
            [
                note(
                    "Exclusions not available: the manifest folder (quarantine.csv, ingest_report.json) was not found.",
                    NA,
                )
            ],
        )
    q = g.get("quarantine")
    if q is None:
        blocks.append(note("quarantine.csv not found in the manifest folder.", NA))
    elif q:
        rows = [[reason, count(n)] for reason, n in q.items()] + [["total", count(sum(q.values()))]]
        tables.append(table(["reason", "files"], rows, "Quarantined files by reason"))
    else:
        tables.append(table(["reason", "files"], [["none: no file was quarantined", "0"]], "Quarantined files"))
    if g.get("label_problems"):
        tables.append(
            table(
                ["problem", "rows", "labels.csv lines"],
                [[k, count(v.get("count")), _lines(v.get("lines") or [])] for k, v in g["label_problems"].items()],
                "Label problems by kind",
                [False, True, False],
            )
        )
    flagged = f.cohort.get("flagged") or g.get("unit_warnings")
    if flagged:
        tables.append(
            table(
                ["warning", "image units"],
                [[k, count(v)] for k, v in flagged.items()],
                f"Flagged series: {count(f.cohort.get('n_flagged') or sum(flagged.values()))} image "
                "units kept with warnings",
            )
        )
    if g.get("counts"):
        tables.append(
            table(
                ["ingest count", "value"],
                [[k, count(v)] for k, v in g["counts"].items()],
                "Counts from ingest_report.json",
            )
        )
    blocks.append(group(tables))
    if g.get("warnings"):
        blocks.append({"type": "list", "items": [f"Ingest: {w}" for w in g["warnings"]]})
    blocks.append(
        note(
            "Only counts are shown: file paths and details stay in quarantine.csv inside the manifest "
            "folder, because paths may carry identifiers."
        )
    )
    return section("exclusions", "Exclusions", blocks)


def _lines(lines: list[int]) -> str:
    return ", ".join(map(str, lines[:12])) + (f", … ({len(lines) - 12} more)" if len(lines) > 12 else "")


def preprocessing_section(f: Facts) -> dict[str, Any]:
    a = f.adaptation
    rows = [
        ("Dimensionality", f.setting("prepare.dims")),
        ("Intensity preset", f.setting("prepare.preset")),
        ("Output size", _dims(f.setting("prepare.size"))),
        ("Resampled spacing (mm)", _dims(f.setting("prepare.spacing")) or "native (not resampled)"),
        ("Slices as channels (2.5D)", f.setting("prepare.slices") if f.setting("prepare.dims") == "2.5d" else None),
        (
            "Normalisation (backbone's pretraining)",
            f"mean {_seq(a.get('mean'))}, std {_seq(a.get('std'))}" if a else None,
        ),
        ("Augmentation", _augment(f)),
        ("Prepare hash", f.tags.get("prepare_hash")),
    ]
    if not any(v for _, v in rows[:3]):
        return section("preprocessing", "Preprocessing", [note("Preprocessing settings not available.", NA)])
    return section("preprocessing", "Preprocessing", [kv(rows)])


def _dims(value: Any) -> str | None:
    items = as_list(value) if not isinstance(value, list | tuple) else list(value)
    return " × ".join(str(v) for v in items) if items else (str(value) if value not in (None, "", "None") else None)


def _seq(value: Any) -> str:
    items = value if isinstance(value, list | tuple) else [value]
    return ", ".join(num(v, 3).rstrip("0").rstrip(".") if as_float(v) is not None else str(v) for v in items)


def _augment(f: Facts) -> str:
    if str(f.setting("prepare.augment.enabled")).lower() not in ("true", "1"):
        return "off"
    parts = [
        f"rotate ±{f.setting('prepare.augment.rotate_deg')}°",
        f"scale ±{f.setting('prepare.augment.scale')}",
        f"intensity ±{f.setting('prepare.augment.intensity')}",
    ]
    if str(f.setting("prepare.augment.flip")).lower() in ("true", "1"):
        parts.append("left-right flip")
    return "on: " + ", ".join(parts)


def model_section(f: Facts) -> dict[str, Any]:
    a, t = f.adaptation, f.training
    if not a:
        return section("model", "Model card", [note("adaptation_summary.json not available for this run.", NA)])
    wfile = a.get("weights_file")
    missing, unexpected = a.get("missing_keys") or [], a.get("unexpected_keys") or []
    rows = [
        ("Backbone", a.get("backbone")),
        ("Weights", a.get("weights")),
        ("Weights file", PurePath(str(wfile)).name if wfile else "none (random initialisation)"),
        ("Weights sha256", a.get("weights_sha256") or "none"),
        (
            "Input",
            f"{a.get('in_channels')} channel(s), {str(a.get('dims', DASH)).upper()}, {_dims(a.get('input_size'))}",
        ),
        ("Channel adaptation", a.get("channel_method")),
        ("2D → 3D inflation", _inflation(a)),
        ("Global pooling", a.get("pool") or "avg"),
        ("Output classes", a.get("num_classes")),
        ("Weights not loaded (new layers)", f"{len(missing)}{_keys(missing)}"),
        ("File tensors not used", f"{len(unexpected)}{_keys(unexpected)}"),
        ("Parameters", f"{count(a.get('total_params'))} in total"),
        ("BatchNorm", f.setting("finetune.bn")),
        ("Strategy", f.setting("finetune.strategy")),
    ]
    blocks: list[dict[str, Any]] = [kv(rows)]
    phases = t.get("trainable_by_phase") or []
    total = as_float(a.get("total_params"))
    if phases:
        blocks.append(
            table(
                ["phase", "trainable parameters", "share of total"],
                [
                    [str(i + 1), count(n), f"{100 * float(n) / total:.1f}%" if total else DASH]
                    for i, n in enumerate(phases)
                ],
                "Trainable parameters per phase",
            )
        )
    weights = t.get("class_weights") or []
    if weights:
        names = f.classes if len(f.classes) == len(weights) else [str(i) for i in range(len(weights))]
        blocks.append(
            table(
                ["class", "loss weight"],
                [[n, num(w, 3)] for n, w in zip(names, weights, strict=True)],
                f"Class weights ({f.setting('finetune.class_weights', DASH)})",
            )
        )
    return section("model", "Model card", blocks)


def _inflation(a: dict[str, Any]) -> str:
    if not a.get("inflation"):
        return "not used"
    text = str(a["inflation"])
    if a.get("depth_padding"):
        text += f", {a['depth_padding']} padding along depth"
    if a.get("keep_depth"):
        text += f", first {a['keep_depth']} downsampling level(s) keep every slice"
    return text


def _keys(keys: list[str]) -> str:
    return f" ({', '.join(map(str, keys[:6]))}{', …' if len(keys) > 6 else ''})" if keys else ""


def training_section(f: Facts) -> dict[str, Any]:
    t, m = f.training, f.metrics
    if not t and "epochs_run" not in m:
        return section("training", "Training", [note("Training summary not available for this run.", NA)])
    # training_summary.json holds the loop's own history; MLflow's also has evaluate's step-0 values
    hist: dict[str, list[Any]] = t["history"] if isinstance(t.get("history"), dict) and t["history"] else f.history
    val = [float(v) for v in hist.get("val_auroc", []) if as_float(v) is not None]
    rate = [float(v) for v in hist.get("images_per_s", []) if as_float(v) is not None]
    best = as_float(m.get("best_epoch"))
    stopped = "stopped early" if as_float(m.get("stopped_early")) else "ran all epochs"
    es = "finetune.early_stopping"
    rows = [
        ("Epochs (configured / run)", f"{f.setting('finetune.epochs', DASH)} / {count(m.get('epochs_run'))}"),
        ("Best epoch", count(best + 1) if best is not None else None),
        ("Best validation AUROC", num(max(val), 3) if val else None),
        (
            "Early stopping",
            f"{f.setting(es + '.metric', DASH)}, patience {f.setting(es + '.patience', DASH)}; {stopped}",
        ),
        (
            "Optimiser",
            f"AdamW, lr {f.setting('finetune.lr', DASH)}, batch {f.setting('finetune.batch_size', DASH)}"
            f", layer decay {f.setting('finetune.layer_lr_decay', DASH)}",
        ),
        ("Training time", duration(m.get("train_seconds"))),
        ("Throughput", f"{sum(rate) / len(rate):.1f} images/s (mean)" if rate else None),
        ("Hardware", t.get("device")),
        ("Platform", t.get("platform")),
        ("PyTorch", t.get("torch")),
    ]
    blocks: list[dict[str, Any] | None] = [
        group([kv(rows), figures([("training_curves", "Loss and validation AUROC per epoch")], f.figures)])
    ]
    blocks.append(_history_table(hist, int(best or 0)))
    return section("training", "Training", blocks)


def _history_table(hist: dict[str, list[Any]], best: int) -> dict[str, Any] | None:
    """Per-epoch history; long runs show about ten epochs plus the first, the best and the last."""
    cols = [
        k for k in ("train_loss", "val_loss", "val_auroc", "lr", "trainable_params", "epoch_seconds") if hist.get(k)
    ]
    n = max((len(hist[k]) for k in cols), default=0)
    if not n:
        return None
    picks = sorted({0, n - 1, best, *range(0, n, max(1, n // 10))} & set(range(n)))
    rows = [[str(i + 1), *[_cell(k, hist[k][i] if i < len(hist[k]) else None) for k in cols]] for i in picks]
    shown = f" ({len(picks)} of {n} epochs shown, incl. first, best and last)" if len(picks) < n else ""
    return table(["epoch", *[k.replace("_", " ") for k in cols]], rows, "Per-epoch history" + shown)


def _cell(key: str, value: Any) -> str:
    if key == "trainable_params":
        return count(value)
    if key == "lr":
        return f"{float(value):.2e}" if as_float(value) is not None else DASH
    return num(value, 2 if key == "epoch_seconds" else 4)
