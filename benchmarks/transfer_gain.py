"""Benchmark: test AUROC of ImageNet-initialised vs from-scratch networks on growing synthetic cohorts, 2D and 3D.

Run from the repository root:

    .venv/bin/python benchmarks/transfer_gain.py            # the real thing (~25 min CPU on 2 cores)
    .venv/bin/python benchmarks/transfer_gain.py --quick    # a smoke version (~2 min)

Design. One synthetic cohort per dims (`cxr2d` for 2D, `ct3d` for 3D) is generated and ingested
once; one image unit per patient is kept (a CT study holds two reconstructions of one scan). A fixed, stratified set of patients is held out as the test set
for every run, so AUROCs are comparable across cohort sizes. For each seed the remaining patients
are shuffled and the first N form the cohort of N patients (nested: 50 ⊂ 100 ⊂ 200 ⊂ 400), split
80/20 (stratified, by patient) into train and val. On each cohort both arms train the same
tf_efficientnet_lite0 with the same recipe and budget (strategy `finetune`, same epochs, batch,
learning rate, schedule, seed) and differ only in `model.weights`: `imagenet` (the bundled file)
or `none` (random initialisation). Runs go through the pipeline's own API (`pipeline.run.train`
+ `evaluate`) into one sqlite MLflow store under the work folder. Results: the table (mean ± sd
of test AUROC over seeds, and the paired gain imagenet − scratch) in
reports/benchmarks/transfer_gain.md + .json, and a plot transfer_gain.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.adapt import build_model  # noqa: E402
from pipeline.config import from_dict  # noqa: E402
from pipeline.ingest import ingest, load_manifest  # noqa: E402
from pipeline.prepare import PreparedDataset, make_spec  # noqa: E402
from pipeline.run import evaluate, train  # noqa: E402
from pipeline.synthetic import make_cohort  # noqa: E402

INITS = ("imagenet", "none")
FULL: dict[str, Any] = {
    "sizes": [50, 100, 200, 400],
    "seeds": 3,
    "2d": {
        "kind": "cxr2d",
        "n_test": 200,
        "epochs": 3,
        "prepare": {"dims": "2d", "preset": "xray", "size": [128, 128]},
    },
    "3d": {
        "kind": "ct3d",
        "n_test": 100,
        "epochs": 4,
        "prepare": {"dims": "3d", "preset": "ct-lung", "size": [16, 48, 48]},
    },
}
QUICK: dict[str, Any] = {
    "sizes": [24, 48],
    "seeds": 1,
    "2d": {"kind": "cxr2d", "n_test": 24, "epochs": 1, "prepare": {"dims": "2d", "preset": "xray", "size": [64, 64]}},
    "3d": {
        "kind": "ct3d",
        "n_test": 16,
        "epochs": 1,
        "prepare": {"dims": "3d", "preset": "ct-lung", "size": [16, 32, 32]},
    },
}
RECIPE = {
    "strategy": "finetune",
    "batch_size": 16,
    "lr": 1.0e-3,
    "layer_lr_decay": 1.0,
    "weight_decay": 1.0e-4,
    "class_weights": "balanced",
    "device": "cpu",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke version (2 sizes, 1 seed, tiny images)")
    p.add_argument("--dims", nargs="+", choices=["2d", "3d"], default=["2d", "3d"])
    p.add_argument("--sizes", nargs="+", type=int, help="cohort sizes in patients (default 50 100 200 400)")
    p.add_argument("--seeds", type=int, help="seeds per size and arm (default 3)")
    p.add_argument("--epochs-2d", type=int, help="epochs of every 2D run (default 3)")
    p.add_argument("--epochs-3d", type=int, help="epochs of every 3D run (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    p.add_argument(
        "--work",
        type=Path,
        default=ROOT / ".benchmarks" / "transfer_gain",
        help="cohorts, manifests, prepare cache and the MLflow store (reused between runs)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output prefix (default reports/benchmarks/transfer_gain, or WORK/transfer_gain_quick with --quick)",
    )
    p.add_argument(
        "--render", action="store_true", help="rewrite the .md and .png from an existing OUT.json (no training)"
    )
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark settings: FULL or QUICK, with command-line overrides."""
    s = json.loads(json.dumps(QUICK if args.quick else FULL))
    s["sizes"] = sorted(args.sizes or s["sizes"])
    s["seeds"] = args.seeds or s["seeds"]
    for dims, epochs in (("2d", args.epochs_2d), ("3d", args.epochs_3d)):
        s[dims]["epochs"] = epochs or s[dims]["epochs"]
    s["dims"] = list(args.dims)
    s["recipe"] = RECIPE
    return s


def pool_manifest(work: Path, dims: str, kind: str, n: int) -> pd.DataFrame:
    """Generate and ingest a cohort of `n` patients once (reused when already there); one unit per patient."""
    root = work / dims
    marker = root / "cohort" / "synthetic.json"
    manifest = root / "manifest"
    fresh = (
        marker.exists()
        and json.loads(marker.read_text()).get("n_patients") == n
        and (manifest / "manifest.parquet").exists()
    )
    if not fresh:
        cohort = make_cohort(root / "cohort", kind=kind, n=n, seed=2024, progress=True)
        ingest(
            cohort.archive_dir,
            cohort.labels_csv,
            manifest,
            key_file=root / "pseudonym.key",
            val=0.0,
            test=0.0,
            seed=0,
            progress=True,
        )
    frame = load_manifest(manifest)
    frame = frame[frame["label"].astype(str) != ""]
    # one unit per patient (CT: two reconstructions of one scan), chosen by pseudonym: equal cost per patient
    frame = frame.sort_values(["series_id", "image_id"]).groupby("subject_id", sort=False).head(1)
    return frame.reset_index(drop=True)


def patient_labels(frame: pd.DataFrame) -> pd.Series:
    """One label per patient (subject_id → label), in sorted subject order."""
    return frame.groupby("subject_id")["label"].first().astype(str).sort_index()


def cohort_splits(labels: pd.Series, n_test: int, sizes: list[int], seed: int) -> dict[int, dict[str, str]]:
    """{N: {subject_id: split}}: a fixed test set (same for every seed) plus nested cohorts of N patients.

    The test set is drawn with seed 0 for every seed; the cohort of N is the first N of the
    remaining patients shuffled with `seed`, split 80/20 into train/val stratified by label.
    """
    pool, test = train_test_split(labels.index.to_numpy(), test_size=n_test, stratify=labels.to_numpy(), random_state=0)
    order = np.random.default_rng(seed).permutation(sorted(pool))
    out = {}
    for n in sizes:
        chosen = order[:n]
        tr, va = train_test_split(chosen, test_size=0.2, stratify=labels[chosen].to_numpy(), random_state=seed)
        out[n] = {**{s: "train" for s in tr}, **{s: "val" for s in va}, **{s: "test" for s in test}}
    return out


def write_sub_manifest(frame: pd.DataFrame, splits: dict[str, str], full_dir: Path, out_dir: Path) -> Path:
    """A manifest folder holding only `splits`' patients (with those splits); images link to the full one."""
    sub = frame[frame["subject_id"].isin(splits)].copy()
    sub["split"] = sub["subject_id"].map(splits)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "manifest.parquet.tmp"
    sub.to_parquet(tmp, index=False)
    tmp.replace(out_dir / "manifest.parquet")
    link = out_dir / "images"
    if not link.exists():
        link.symlink_to(full_dir / "images", target_is_directory=True)
    return out_dir


def one_run(s: dict[str, Any], dims: str, manifest: Path, init: str, seed: int, work: Path) -> dict[str, Any]:
    """Train + evaluate one arm on one cohort through the pipeline API; returns its result row."""
    d = s[dims]
    raw = {
        "experiment": f"transfer-gain-{dims}",
        "data": {"manifest": str(manifest)},
        "prepare": {**d["prepare"], "cache_dir": str(work / "cache")},
        "model": {"backbone": "tf_efficientnet_lite0", "weights": init},
        "finetune": {
            **s["recipe"],
            "epochs": d["epochs"],
            "seed": seed,
            "early_stopping": {"metric": "val_auroc", "patience": d["epochs"]},
        },
        "evaluate": {"bootstrap": 200, "subgroups": []},
        "tracking": {"uri": f"sqlite:///{(work / 'mlflow.db').resolve()}"},
    }
    cfg = from_dict(raw)
    torch.manual_seed(seed)  # train() builds the model before seeding: seed the random initialisation here
    wall, cpu = time.perf_counter(), time.process_time()
    run_id = train(cfg, progress=False)
    metrics = evaluate(cfg, run_id, progress=False)
    return {
        "dims": dims,
        "init": init,
        "seed": seed,
        "run_id": run_id,
        "test_auroc": metrics["test_auroc"],
        "test_auroc_ci_low": metrics.get("test_auroc_ci_low"),
        "test_auroc_ci_high": metrics.get("test_auroc_ci_high"),
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
    }


def run_dims(s: dict[str, Any], dims: str, work: Path) -> list[dict[str, Any]]:
    """Every (size, seed, init) run of one dims; cohorts are shared by both arms of a seed (paired)."""
    d = s[dims]
    frame = pool_manifest(work, dims, d["kind"], max(s["sizes"]) + d["n_test"])
    labels = patient_labels(frame)
    rows = []
    for seed in range(s["seeds"]):
        for n, splits in cohort_splits(labels, d["n_test"], s["sizes"], seed).items():
            sub = write_sub_manifest(frame, splits, work / dims / "manifest", work / dims / "cohorts" / f"n{n}-s{seed}")
            n_units = frame["subject_id"].map(splits).value_counts().to_dict()
            for init in INITS:
                row = one_run(s, dims, sub, init, seed, work)
                row.update(
                    n_patients=n,
                    n_train_units=n_units.get("train", 0),
                    n_val_units=n_units.get("val", 0),
                    n_test_units=n_units.get("test", 0),
                )
                rows.append(row)
                print(
                    f"{dims} n={n:4d} seed={seed} {init:8s} test AUROC {row['test_auroc']:.3f} "
                    f"({row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} s CPU)",
                    flush=True,
                )
    return rows


def init_features(s: dict[str, Any], dims: str, work: Path, n: int = 16) -> dict[str, dict[str, float]]:
    """Pooled features of the ImageNet network *before training* on n units, with BatchNorm in eval mode
    (its ImageNet running statistics: what a linear probe and validation see) and in train mode (batch
    statistics: what fine-tuning sees). Returns {mode: {"mean_abs", "sd_across_units"}}."""
    d = s[dims]
    frame = pool_manifest(work, dims, d["kind"], max(s["sizes"]) + d["n_test"]).head(n)
    model, summary = build_model("tf_efficientnet_lite0", "imagenet", dims=d["prepare"]["dims"])
    spec = make_spec(
        d["prepare"]["dims"],
        d["prepare"]["preset"],
        d["prepare"]["size"],
        {"mean": summary.mean, "std": summary.std, "interpolation": "bicubic"},
    )
    ds = PreparedDataset(
        [str(work / dims / "manifest" / p) for p in frame["image_path"]],
        frame["content_sha256"].tolist(),
        [0] * len(frame),
        spec,
        work / "cache",
    )
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    out = {}
    for mode in ("eval", "train"):
        getattr(model, mode)()
        with torch.no_grad():
            f = model.features(x)
        out[mode] = {"mean_abs": float(f.abs().mean()), "sd_across_units": float(f.std(dim=0).mean())}
    return out


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dims, size): mean ± sd test AUROC of each arm, and the paired gain imagenet − scratch."""
    frame = pd.DataFrame(rows)
    out = []
    for (dims, n), g in frame.groupby(["dims", "n_patients"], sort=True):
        arms = {init: g[g["init"] == init].set_index("seed")["test_auroc"] for init in INITS}
        gain = (arms["imagenet"] - arms["none"]).dropna()
        out.append(
            {
                "dims": dims,
                "n_patients": int(n),
                "n_seeds": len(gain),
                "imagenet_mean": float(arms["imagenet"].mean()),
                "imagenet_sd": _sd(arms["imagenet"]),
                "scratch_mean": float(arms["none"].mean()),
                "scratch_sd": _sd(arms["none"]),
                "gain_mean": float(gain.mean()),
                "gain_sd": _sd(gain),
                "imagenet_wins": int((gain > 0).sum()),
            }
        )
    return out


def _sd(values: pd.Series) -> float:
    return float(statistics.stdev(values)) if len(values) > 1 else float("nan")


def plot(summary: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path) -> None:
    """Test AUROC vs cohort size, one panel per dims: mean ± sd per arm, single seeds as dots."""
    dims_list = sorted({r["dims"] for r in summary})
    fig = Figure(figsize=(5.2 * len(dims_list), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    for i, dims in enumerate(dims_list):
        ax = fig.add_subplot(1, len(dims_list), i + 1)
        rs = [r for r in summary if r["dims"] == dims]
        for init, key, color, label in (
            ("imagenet", "imagenet", "tab:blue", "ImageNet init"),
            ("none", "scratch", "tab:orange", "from scratch"),
        ):
            x = [r["n_patients"] for r in rs]
            ax.errorbar(
                x,
                [r[f"{key}_mean"] for r in rs],
                yerr=[np.nan_to_num(r[f"{key}_sd"]) for r in rs],
                marker="o",
                capsize=4,
                color=color,
                label=label,
            )
            pts = [(r["n_patients"], r["test_auroc"]) for r in rows if r["dims"] == dims and r["init"] == init]
            ax.scatter(*zip(*pts, strict=True), s=12, alpha=0.35, color=color)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_ylim(0.3, 1.0)
        ax.set(
            xlabel="patients in the training cohort (train + val)",
            ylabel="test AUROC",
            title=f"{dims.upper()} ({'cxr2d' if dims == '2d' else 'ct3d'})",
        )
        ax.legend(loc="lower right")
    fig.savefig(path, dpi=110)


def _pm(mean: float, sd: float) -> str:
    return f"{mean:.3f}" if np.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def _reading(summary: list[dict[str, Any]]) -> list[str]:
    """Plain statements drawn from the numbers (no adjectives the numbers do not support)."""
    lines = []
    for dims in sorted({r["dims"] for r in summary}):
        rs = [r for r in summary if r["dims"] == dims]
        wins, pairs = sum(r["imagenet_wins"] for r in rs), sum(r["n_seeds"] for r in rs)
        by_size = ", ".join(f"{r['gain_mean']:+.3f} at {r['n_patients']}" for r in rs)
        clear = [
            str(r["n_patients"])
            for r in rs
            if r["n_seeds"] > 1 and r["gain_mean"] - 2 * r["gain_sd"] / np.sqrt(r["n_seeds"]) > 0
        ]
        best_i = max(rs, key=lambda r: r["imagenet_mean"])
        best_s = max(rs, key=lambda r: r["scratch_mean"])
        lines.append(
            f"- **{dims.upper()}**: ImageNet initialisation beat random initialisation in {wins} of {pairs} paired "
            f"runs. Mean gain by cohort size: {by_size}. The mean gain exceeds 2 standard errors of the paired "
            f"differences at: {', '.join(clear) if clear else 'no size'}. Best mean AUROC: ImageNet "
            f"{best_i['imagenet_mean']:.3f} (n={best_i['n_patients']}), scratch {best_s['scratch_mean']:.3f} "
            f"(n={best_s['n_patients']})."
        )
        if best_i["imagenet_mean"] < 0.65 and best_s["scratch_mean"] < 0.65:
            lines.append(
                f"  Neither arm learns the {dims.upper()} task reliably within this budget (no mean AUROC "
                "reaches 0.65), so this gain is not distinguishable from zero."
            )
        elif best_s["scratch_mean"] < 0.6:
            lines.append(
                "  From scratch stays near chance at every size: within this budget it has not started "
                "to learn, so the gain is the whole of what the ImageNet arm learned, not a comparison "
                "of two trained models; it grows with the cohort because only the ImageNet arm uses "
                "the extra data."
            )
    return lines


def _features_lines(meta: dict[str, Any]) -> list[str]:
    """What the ImageNet network computes before any training (the starting point fine-tuning gets)."""
    lines = []
    for dims, f in meta.get("init_features", {}).items():
        ev, tr = f["eval"], f["train"]
        lines.append(
            f"- {dims.upper()} ImageNet network before training, pooled features of 16 units: mean |f| "
            f"{ev['mean_abs']:.2g}, sd across units {ev['sd_across_units']:.2g} with BatchNorm running "
            f"statistics (eval mode); {tr['mean_abs']:.2g} and {tr['sd_across_units']:.2g} with batch "
            "statistics (train mode)."
        )
    return lines


def write_markdown(
    s: dict[str, Any], summary: list[dict[str, Any]], rows: list[dict[str, Any]], meta: dict[str, Any], path: Path
) -> None:
    """The results table, the settings, and what the numbers mean (and do not)."""
    table = [
        "| dims | patients | ImageNet init | from scratch | gain (ImageNet − scratch) | ImageNet better |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        gain = f"{r['gain_mean']:+.3f}" + ("" if np.isnan(r["gain_sd"]) else f" ± {r['gain_sd']:.3f}")
        table.append(
            f"| {r['dims']} | {r['n_patients']} | {_pm(r['imagenet_mean'], r['imagenet_sd'])} | "
            f"{_pm(r['scratch_mean'], r['scratch_sd'])} | {gain} | {r['imagenet_wins']}/{r['n_seeds']} |"
        )
    dims_lines = [
        f"- {d.upper()}: `{s[d]['kind']}` cohort, prepare {json.dumps(s[d]['prepare'])}, "
        f"{s[d]['epochs']} epochs, fixed test set of {s[d]['n_test']} patients "
        f"({rows_of(rows, d)[0]['n_test_units'] if rows_of(rows, d) else '?'} image units)"
        for d in s["dims"]
    ]
    budget = ", ".join(f"{d.upper()} {s[d]['epochs']} epochs" for d in s["dims"])
    text = "\n".join(
        [
            "# Transfer gain: ImageNet initialisation vs training from scratch",
            "",
            f"Generated by `benchmarks/transfer_gain.py{' --quick' if meta['quick'] else ''}` on {meta['date']} "
            f"({meta['platform']}, torch {meta['torch']}, {meta['threads']} thread(s), {meta['cpus']} CPUs). "
            f"{len(rows)} runs in {meta['wall_s'] / 60:.1f} min wall, {meta['cpu_s'] / 60:.1f} min CPU."
            + (f" {meta['note']}." if meta.get("note") else ""),
            "",
            "Test AUROC, mean ± sd over seeds; the gain is the mean ± sd of the paired per-seed differences "
            "(same cohort, same split, same seed, only `model.weights` differs).",
            "",
            *table,
            "",
            "![test AUROC vs cohort size](transfer_gain.png)" if not meta["quick"] else "",
            "",
            "## Setup",
            "",
            "- Backbone `tf_efficientnet_lite0`; arm A `model.weights: imagenet` (the bundled TF-Lite ImageNet "
            "file), arm B `model.weights: none` (random initialisation, seeded). Both arms: strategy `finetune` "
            f"(every layer trains), AdamW lr {s['recipe']['lr']} for every layer, batch {s['recipe']['batch_size']}, "
            "cosine schedule with warm-up, balanced class weights, the checkpoint of the best val AUROC kept, no early stop: "
            "the same budget in epochs and optimizer steps.",
            "- Cohort of N patients = N patients for train + val (80/20, stratified, patient-level), drawn nested "
            f"({' ⊂ '.join(map(str, s['sizes']))}) from one generated cohort with a per-seed shuffle; the test "
            "patients are the same for every size, seed and arm. One image unit per patient.",
            *dims_lines,
            "- Seeds vary the drawn cohort, its train/val split, the random initialisation, the head and the data order.",
            "",
            "## What it means",
            "",
            *_reading(summary),
            "",
            f"- This is the gain at a small fixed training budget ({budget}) on a CPU. Training from scratch "
            "usually needs many more epochs than fine-tuning, so part of the measured gain is faster convergence; "
            "whether it persists with a longer budget is not measured here.",
            "- The data are synthetic (`pipeline.synthetic`): a faint round opacity on radiographs, a small solid "
            "nodule in CT. The size of the gain on real scans can differ; what the benchmark shows is that the "
            "pipeline measures it fairly (paired seeds, a fixed test set, one recipe), not its clinical size.",
            *_features_lines(meta),
            f"- With {s['seeds']} seed(s), a standard deviation is itself uncertain; differences below about one sd "
            "are noise. Per-run test AUROCs with 95% bootstrap CIs (patients resampled) are in the .json file, "
            f"and every run is in the MLflow store {meta['mlflow_store']}.",
            "",
        ]
    )
    path.write_text(text)


def rows_of(rows: list[dict[str, Any]], dims: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["dims"] == dims]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    torch.set_num_threads(args.threads)
    s = settings(args)
    work = args.work.resolve() / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (
        work / "transfer_gain_quick" if args.quick else ROOT / "reports" / "benchmarks" / "transfer_gain"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.render:
        saved = json.loads(Path(f"{out}.json").read_text())
        s, meta, rows = saved["settings"], saved["meta"], saved["runs"]
    else:
        wall, cpu = time.perf_counter(), time.process_time()
        rows = [row for dims in s["dims"] for row in run_dims(s, dims, work)]
        meta = {
            "quick": args.quick,
            "date": time.strftime("%Y-%m-%d"),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu,
            "mlflow_store": f"sqlite:///{work / 'mlflow.db'}",
        }
    meta.setdefault("init_features", {dims: init_features(s, dims, work) for dims in s["dims"]})
    summary = summarise(rows)
    Path(f"{out}.json").write_text(
        json.dumps({"settings": s, "meta": meta, "summary": summary, "runs": rows}, indent=2, default=float) + "\n"
    )
    plot(summary, rows, Path(f"{out}.png"))
    write_markdown(s, summary, rows, meta, Path(f"{out}.md"))
    print(f"wrote {out}.md, .json, .png ({meta['wall_s'] / 60:.1f} min wall, {meta['cpu_s'] / 60:.1f} min CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
