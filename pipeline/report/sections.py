"""Report sections on the data and the model: cohort, exclusions, preprocessing, model card, training."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from pipeline.report.facts import Facts
from pipeline.report.fmt import (
    DASH,
    NA,
    as_float,
    as_list,
    count,
    duration,
    figures,
    group,
    kv,
    note,
    num,
    para,
    section,
    table,
)


def cohort_section(f: Facts) -> dict[str, Any]:
    """The Cohort section: images and patients by split and class, then images by each subgroup attribute."""
    c = f.cohort
    if not c.get("by_split"):
        return section(
            "cohort",
            "Cohort",
            [note("Cohort counts not available: neither the manifest nor the run's splits.json could be read.", NA)],
        )
    classes = c.get("classes") or []
    prevalence = c.get("prevalence") if isinstance(c.get("prevalence"), dict) else {}
    head = ["split", "images", "patients", *[f"class {k}" for k in classes]]
    rows = [[r[0], *[count(v) for v in r[1:]]] for r in c["by_split"]]
    if prevalence:
        head.append(f"prevalence (patients with class {classes[-1]})")
        rows = [[*r, num(prevalence.get(r[0]), 3)] for r in rows]
    blocks: list[dict[str, Any] | None] = [table(head, rows, "Images and patients by split")]
    source = (f.ingest or {}).get("split_source")
    if source:
        how = {
            "keyed-hash": "assigned by ingest: a keyed hash of each patient, stratified by label, stable when "
            "patients are added",
            "labels.csv": "predefined: the split column of labels.csv",
        }.get(str(source), str(source))
        blocks.append(para(f"Splits {how}."))
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
    """The Exclusions section: quarantined files by reason, label problems, flagged series, ingest counts."""
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
    """The Preprocessing section: dims, intensity preset, size, spacing, normalisation, augmentation."""
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
    """The Model card: backbone, weights, input adaptation, unloaded keys, trainable parameters, class weights."""
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
        ("BatchNorm", None if f.setting("finetune.strategy") == "linear-probe" else f.setting("finetune.bn")),
        ("Strategy", f.setting("finetune.strategy")),
        ("lp-ft probe", _lpft_probe(f) if f.setting("finetune.strategy") == "lp-ft" else None),
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


def _configured_epochs(f: Facts) -> str:
    """`finetune.epochs`, with lp-ft's probe epochs in front ('3 probe + 10')."""
    epochs = f.setting("finetune.epochs", DASH)
    if f.setting("finetune.strategy") == "lp-ft":
        return f"{f.setting('finetune.lpft_probe_epochs', DASH)} probe + {epochs}"
    return str(epochs)


def _lpft_probe(f: Facts) -> str:
    """'3 epochs of the head alone at lr 0.01, then every layer at lr 0.001' (lp-ft's two phases)."""
    lr = f.setting("finetune.lr", DASH)
    probe_lr = f.setting("finetune.lpft_probe_lr") or f.setting("finetune.head_lr") or lr
    epochs = f.setting("finetune.lpft_probe_epochs", DASH)
    return f"up to {epochs} epochs of the head alone at lr {probe_lr}, then every layer from that head at lr {lr}"


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
    """The Training section: epochs, early stopping, optimiser, time, hardware, curves, per-epoch history."""
    t, m = f.training, f.metrics
    if not t and "epochs_run" not in m:
        return section("training", "Training", [note("Training summary not available for this run.", NA)])
    # training_summary.json holds the loop's own history; MLflow's also has evaluate's step-0 values
    hist: dict[str, list[Any]] = t["history"] if isinstance(t.get("history"), dict) and t["history"] else f.history
    val = [float(v) for v in hist.get("val_auroc", []) if as_float(v) is not None]
    rate = [float(v) for v in hist.get("images_per_s", []) if as_float(v) is not None]
    best = as_float(m.get("best_epoch"))
    probe = f.setting("finetune.strategy") == "linear-probe"  # only the head trains: no layer decay, no BatchNorm
    stopped = "stopped early" if as_float(m.get("stopped_early")) else "ran all epochs"
    es = "finetune.early_stopping"
    rows = [
        ("Epochs (configured / run)", f"{_configured_epochs(f)} / {count(m.get('epochs_run'))}"),
        ("Best epoch (of the evaluated model, numbered from 1)", count(best) if best is not None else None),
        ("Best validation AUROC", num(max(val), 3) if val else None),
        (
            "Early stopping",
            f"{f.setting(es + '.metric', DASH)}, patience {f.setting(es + '.patience', DASH)}; {stopped}",
        ),
        (
            "Optimiser",
            f"AdamW, lr {f.setting('finetune.lr', DASH)}, batch {f.setting('finetune.batch_size', DASH)}"
            + ("" if probe else f", layer decay {f.setting('finetune.layer_lr_decay', DASH)}"),
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
    blocks.append(_history_table(hist, int(best or 1) - 1))
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
