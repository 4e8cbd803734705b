"""Benchmark: a `medxfer study` on real chest X-rays (PneumoniaMNIST), next to MedMNIST v2's published numbers.

Run from the repository root (the data stays in ../shared/data/pneumoniamnist/, never in the repository):

    nice .venv/bin/python benchmarks/bench_pneumoniamnist.py                 # what reports/benchmarks/ shows
    nice .venv/bin/python benchmarks/bench_pneumoniamnist.py --seeds 0 1 2   # the issue's 3 seeds

Design. benchmarks/pneumoniamnist_archive.py writes the full train/val arrays as a hospital export
(one DICOM file per image, labels.csv with a `split` column): the official validation split is
`val` (used for lr selection, early stopping and calibration), a seeded, label-stratified 20 % of
train is `test` (opened once per arm), the rest `train`. One `medxfer study` (through
`pipeline.cli.main`, one manifest, one MLflow sqlite store) runs weights {imagenet, none,
transfusion} x strategy {linear-probe, finetune} on tf_efficientnet_lite0 at 64 px with the same
epoch budget and lr grid for every arm, ΔAUROC against each arm's from-scratch twin (clustered
DeLong). The main study uses `class_weights: none` with a uniform sampler; optional extra studies
(`--imbalance`) repeat the ImageNet arms with balanced class weights and with the weighted sampler on
the same manifest, so the same test units. Results: reports/benchmarks/pneumoniamnist.md + .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pneumoniamnist_archive import DataMissing, npz_path, write_archive  # noqa: E402

# MedMNIST v2 (Yang et al. 2023, Table 3), PneumoniaMNIST official test split, trained from scratch
PUBLISHED = [
    ("ResNet-18 (28)", 0.944, 0.854),
    ("ResNet-18 (224)", 0.956, 0.864),
    ("ResNet-50 (28)", 0.948, 0.854),
    ("ResNet-50 (224)", 0.962, 0.884),
]
IMBALANCE = {  # extra studies: the ImageNet arms again, with what a 10 %-minority training set may call for
    "balanced": {"class_weights": "balanced", "sampler": "uniform"},
    "weighted-sampler": {"class_weights": "none", "sampler": "weighted"},
}

BASE = """\
experiment: pneumoniamnist
data: {{source: {work}/cohort/archive, labels: {work}/cohort/labels.csv, manifest: {work}/manifest,
       key_file: {work}/pseudonym.key}}
prepare: {{dims: 2d, preset: xray, size: [{size}, {size}], cache_dir: {work}/cache}}
model: {{backbone: tf_efficientnet_lite0, weights: imagenet, in_channels: 1}}
finetune: {{strategy: linear-probe, epochs: {epochs}, batch_size: 64, device: {device}, class_weights: {cw},
           sampler: {sampler}, early_stopping: {{metric: val_auroc, patience: {patience}}}}}
evaluate: {{bootstrap: 1000, subgroups: [], calibration: auto}}
tracking: {{uri: "sqlite:///{work}/mlflow.db", register_as: null}}
"""


def write_study(
    work: Path, name: str, args: argparse.Namespace, weights: list[str], cw: str, sampler: str, strategies: list[str]
) -> Path:
    folder = work / f"study-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    base = BASE.format(
        work=work,
        size=args.size,
        epochs=args.epochs,
        device=args.device,
        cw=cw,
        sampler=sampler,
        patience=max(2, args.epochs),
    )
    (folder / "base.yaml").write_text(base)
    axes = {"weights": weights, "strategy": strategies, "seeds": args.seeds}
    body = f"name: {name}\nbase: base.yaml\naxes: {json.dumps(axes)}\nlr_grid: {json.dumps(args.lr_grid)}\n"
    (folder / "study.yaml").write_text(body)
    return folder / "study.yaml"


def run_study(path: Path, out: Path) -> tuple[dict[str, Any], float]:
    from pipeline.cli import main

    t0 = time.perf_counter()
    code = main(["-q", "study", str(path), "--out", str(out)])
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"medxfer study {path} exited {code}")
    return json.loads((out / "study.json").read_text()), seconds


def compare_with_main(main_result: dict[str, Any], result: dict[str, Any], work: Path) -> dict[str, Any]:
    """Paired ΔAUROC (clustered DeLong) of each arm against the main study's ImageNet arm of its strategy."""
    from pipeline.cli import main

    out = {}
    for row in result["arms"]:
        ref = next(r for r in main_result["arms"] if r["weights"] == "imagenet" and r["strategy"] == row["strategy"])
        folder = work / f"compare-{ref['run_id'][:8]}-{row['run_id'][:8]}"
        uri = f"sqlite:///{work}/mlflow.db"
        code = main(["-q", "compare", ref["run_id"], row["run_id"], "--tracking-uri", uri, "--out", str(folder)])
        if code == 0:
            out[row["run_id"]] = json.loads((folder / "comparison.json").read_text())["pairs"][0]["auroc"]
    return out


def _ci(row: dict[str, Any]) -> str:
    return f"{row['test_auroc']:.3f} ({row['test_auroc_ci_low']:.3f}–{row['test_auroc_ci_high']:.3f})"


def _delta(row: dict[str, Any]) -> str:
    d = row.get("delta_auroc")
    if not d:
        return "—"
    flag = " **negative transfer**" if row.get("negative_transfer") else ""
    return f"{d['diff']:+.3f} ({d['ci_low']:+.3f} to {d['ci_high']:+.3f}), p={d['p']:.3g}{flag}"


def table(rows: list[dict[str, Any]], vs: dict[str, Any] | None = None) -> list[str]:
    against = "ΔAUROC vs scratch (95% CI)" if vs is None else "ΔAUROC vs class_weights none, uniform sampler (95% CI)"
    lines = [
        f"| arm | lr | val AUROC | test AUROC (95% CI) | ECE | Brier | sens | spec | epochs | train s | {against} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {r['val_auroc']:.3f} | {_ci(r)} | {r['test_ece']:.3f} | "
            f"{r['test_brier']:.3f} | {r['test_sensitivity']:.3f} | {r['test_specificity']:.3f} | "
            f"{int(r['epochs_run'])}/{int(r['epochs_budget'])} | {r['train_seconds']:.0f} | "
            f"{_delta(r) if vs is None else _delta({'delta_auroc': vs.get(r['run_id'])})} |"
        )
    return lines


def report(results: dict[str, Any], command: str) -> str:
    main_result = results["studies"]["main"]
    fair = main_result["fairness"]
    counts = results["cohort"]
    lines = [
        "# PneumoniaMNIST: a transfer-learning study on real chest X-rays",
        "",
        "Reproduce (from the repository root, data in `../shared/data/pneumoniamnist/`):",
        "",
        f"    {command}",
        "",
        f"What ran: {results['what_ran']} Time: {results['total_seconds'] / 60:.1f} min in all ("
        + ", ".join(f"study {k} {v / 60:.1f} min" for k, v in results["study_seconds"].items())
        + f"; each study's first run: a rerun reuses its trainings) on {results['machine']}.",
        "",
        "Data: PneumoniaMNIST (MedMNIST v2, Yang et al. 2023, from Kermany et al. 2018; CC BY 4.0), 28×28 grey "
        "paediatric chest radiographs, written as one 8-bit MONOCHROME2 DX DICOM file per image (each image "
        "its own synthetic patient: MedMNIST has no patient ids) and ingested by `medxfer` with a predefined "
        f"split: train {counts['train']}, val {counts['val']} (the official validation split, complete: lr "
        f"selection, early stopping, calibration), test {counts['test']} (a seeded, label-stratified 20 % of "
        "the shared train split, held out; pneumonia is the positive class). Prevalence of normal: "
        f"{counts['normal_share']}.",
        "",
        f"Fairness (from study.json): {fair['n_test_units']} test units, the same for every arm: "
        f"{fair['same_test_units']}; epoch budget {fair['epochs_budget']}; lr grid {fair['lr_grid']} selected on "
        f"{fair['lr_selected_on']}.",
        "",
        f"## Arms (tf_efficientnet_lite0, {results.get('size', 64)} px, class_weights none, uniform sampler)",
        "",
        *table(main_result["arms"]),
        "",
        "sens/spec at each arm's frozen operating point (chosen on validation); ECE after the calibration "
        "`calibration: auto` kept (if any); ΔAUROC: arm − its from-scratch twin (same strategy), "
        "patient-clustered DeLong on the shared test units.",
        "",
        f"{main_result['recommendation']['line']}",
        "",
    ]
    for name, res in results["studies"].items():
        if name == "main":
            continue
        lines += [
            f"## Class imbalance: {name} ({IMBALANCE[name]})",
            "",
            "The ImageNet arms again, on the same manifest (so the same test units); ΔAUROC: this arm − the "
            "main study's `weights=imagenet` arm of the same strategy (class_weights none, uniform sampler), "
            "paired by `medxfer compare` (patient-clustered DeLong).",
            "",
            *table(res["arms"], res.get("vs_main", {})),
            "",
        ]
    lines += [
        "## Published MedMNIST v2 numbers (official test split; trained from scratch)",
        "",
        "| model (input px) | test AUC | test ACC |",
        "|---|---|---|",
        *[f"| {m} | {auc:.3f} | {acc:.3f} |" for m, auc, acc in PUBLISHED],
        "",
        "**The test splits differ.** Ours is a held-out 20 % of the training split available here (10 % "
        "normal, the prevalence of train); MedMNIST's is the official test split (624 images, 37.5 % normal), "
        "which is not in the shared data folder. A held-out part of the same distribution as train is "
        "easier than the official test set (the issue measured the demo recipe at 0.986 internal vs 0.946 "
        "official), so our AUROCs are not comparable to the published ones and must not be read as beating "
        "them. ACC is not reported here: we report sensitivity/specificity at the operating point frozen on "
        "validation.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/medxfer-pneumoniamnist"), help="archive, manifest, MLflow")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "pneumoniamnist")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--strategies", nargs="+", default=["linear-probe", "finetune"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--lr-grid", nargs="+", type=float, default=[1e-3])
    p.add_argument("--imbalance", nargs="*", default=[], choices=sorted(IMBALANCE))
    p.add_argument("--imbalance-strategies", nargs="+", default=["linear-probe"])
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        npz_path()
    except DataMissing as e:
        print(e, file=sys.stderr)
        return 1
    work = args.work.resolve()
    if not (work / "cohort" / "labels.csv").is_file():
        archive = write_archive(work / "cohort", test_fraction=0.2, seed=0)
        counts = {k: len(v) for k, v in archive.splits.items()}
        normal = {k: sum(archive.labels[p] == "normal" for p in v) for k, v in archive.splits.items()}
        (work / "cohort" / "counts.json").write_text(json.dumps({"counts": counts, "normal": normal}))
    info = json.loads((work / "cohort" / "counts.json").read_text())
    cohort = {
        **info["counts"],
        "normal_share": ", ".join(f"{k} {info['normal'][k] / info['counts'][k]:.1%}" for k in ("train", "val", "test")),
    }
    studies: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    plan = [("main", ["imagenet", "none", "transfusion"], "none", "uniform")]
    plan += [
        (name, ["imagenet"], IMBALANCE[name]["class_weights"], IMBALANCE[name]["sampler"]) for name in args.imbalance
    ]
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch threads {_threads()}"
    command = ("nice .venv/bin/python benchmarks/bench_pneumoniamnist.py " + " ".join(argv or sys.argv[1:])).strip()
    previous: dict[str, float] = {}
    if args.out.with_suffix(".json").is_file():
        previous = json.loads(args.out.with_suffix(".json").read_text()).get("study_seconds", {})
    for name, weights, cw, sampler in plan:  # the report is rewritten after each study: a cut-short run keeps its part
        strategies = args.strategies if name == "main" else args.imbalance_strategies
        path = write_study(work, name, args, weights, cw, sampler, strategies)
        studies[name], seconds[name] = run_study(path, work / f"out-{name}")
        n_trainings = len(studies[name]["arms"]) * len(args.lr_grid)
        if studies[name].get("reused_trainings") == n_trainings and name in previous:  # a rerun: keep the real cost
            seconds[name] = previous[name]
        if name != "main":
            studies[name]["vs_main"] = compare_with_main(studies["main"], studies[name], work)
        print(f"study {name}: {seconds[name]:.0f} s", file=sys.stderr)
        total = sum(seconds.values())
        done = [n for n in args.imbalance if n in studies]
        n_arms = sum(len(s["arms"]) for s in studies.values())
        what = (
            f"{n_arms} arms (main study: weights imagenet/none/transfusion × strategies {args.strategies}"
            f"{'; imbalance studies (ImageNet, ' + str(args.imbalance_strategies) + '): ' + ', '.join(done) if done else ''}"
            f"), seeds {args.seeds}, "
            f"{args.size} px, epoch budget {args.epochs} (early stopping on val AUROC), lr grid {args.lr_grid}, "
            f"device {args.device}; the issue asks for 3 seeds and lp-ft / gradual / 224 px arms: not run here."
        )
        results = {
            "what_ran": what,
            "machine": machine,
            "total_seconds": total,
            "study_seconds": seconds,
            "cohort": cohort,
            "published_medmnist_v2_official_test": [{"model": m, "auc": a, "acc": c} for m, a, c in PUBLISHED],
            "studies": studies,
            "command": command,
            "size": args.size,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        args.out.with_suffix(".md").write_text(report(results, command))
        print(f"wrote {args.out.with_suffix('.md')} ({total / 60:.1f} min)", file=sys.stderr)
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    raise SystemExit(main())
