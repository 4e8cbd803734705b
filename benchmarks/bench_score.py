"""Benchmark: scans/s of `medxfer score` against a bare loop (load NIfTI, prepare, forward) on one archive.

Run from the repository root:

    .venv/bin/python benchmarks/bench_score.py [--n 32] [--repeats 7] [--size 224]

Writes reports/benchmarks/score.md and score.json. The archive is a synthetic chest X-ray cohort
(`pipeline.synthetic`), the model a randomly initialised tf_efficientnet_lite0 (2D, 1 channel):
the speed does not depend on the weights. Both sides use the same model, prepare spec, batch
size and torch thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import tracking  # noqa: E402
from pipeline.adapt import CalibratedNet, build_model  # noqa: E402
from pipeline.ingest import load_manifest  # noqa: E402
from pipeline.prepare import build_transform, make_spec, prepare_image  # noqa: E402
from pipeline.run import log_packaged  # noqa: E402
from pipeline.score import score  # noqa: E402
from pipeline.synthetic import make_cohort  # noqa: E402


def _model(root: Path, size: int) -> tuple[str, str, torch.nn.Module, object]:
    uri = tracking.connect(f"sqlite:///{root / 'mlflow.db'}")
    torch.manual_seed(0)
    net, summary = build_model("tf_efficientnet_lite0", "none", num_classes=2, in_channels=1, dims="2d")
    spec = make_spec("2d", "xray", [size, size], {"mean": summary.mean, "std": summary.std})
    meta = {
        "prepare": spec.as_dict(),
        "classes": ["0", "1"],
        "temperature": 1.0,
        "operating_point": {"rule": "youden", "threshold": 0.5},
    }
    packaged = CalibratedNet(net, 1.0)
    with tracking.start_run("bench-score"):
        info = log_packaged(packaged, np.zeros((1, 1, size, size), np.float32), meta, "bench")
    return uri, f"models:/bench/{info['version']}", packaged.eval(), spec


def _timed(fn, *args, **kwargs) -> tuple[object, float, float]:  # type: ignore[no-untyped-def]
    """(result, wall seconds, CPU seconds of this process, all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _bare(paths: list[str], spec: object, model: torch.nn.Module, batch_size: int) -> int:
    """The floor: load each NIfTI, prepare it, run the model in batches; nothing else."""
    transform = build_transform(spec)  # type: ignore[arg-type]
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            model(torch.stack([prepare_image(p, spec, transform) for p in paths[i : i + batch_size]]))  # type: ignore[arg-type]
    return len(paths)


def run(n: int, repeats: int, size: int, batch_size: int) -> dict:
    """Cold score once, then `repeats` interleaved rounds of (re-score, bare loop); wall and CPU time."""
    root = Path(tempfile.mkdtemp(prefix="bench-score-"))
    rates: dict[str, list[float]] = {
        "score_warm": [],
        "bare": [],
        "score_warm_cpu": [],
        "bare_cpu": [],
        "score_engine": [],
    }
    fixed: list[float] = []
    try:
        cohort = make_cohort(root / "cohort", kind="cxr2d", n=n, seed=0)
        uri, model_uri, model, spec = _model(root, size)
        out, work = root / "pred.parquet", root / "pred.parquet.work"
        common = {"tracking_uri": uri, "key_file": root / "key", "batch_size": batch_size, "progress": False}
        first, wall, cpu = _timed(score, model_uri, cohort.archive_dir, out, **common)
        cold = {"score_cold": first["n_ok"] / wall, "score_cold_cpu": first["n_ok"] / cpu}  # type: ignore[index]
        paths = [str(work / "manifest" / p) for p in load_manifest(work / "manifest")["image_path"]]
        for _ in range(repeats):
            shutil.rmtree(work / "chunks")  # keep the ingested images, rescore everything
            r, wall, cpu = _timed(score, model_uri, cohort.archive_dir, out, **common)
            rates["score_warm"].append(r["n_ok"] / wall)  # type: ignore[index]
            rates["score_warm_cpu"].append(r["n_ok"] / cpu)  # type: ignore[index]
            _, noop, _ = _timed(score, model_uri, cohort.archive_dir, out, **common)  # every chunk committed
            fixed.append(noop)
            rates["score_engine"].append(r["n_ok"] / max(wall - noop, 1e-9))  # type: ignore[index]
            _, wall, cpu = _timed(_bare, paths, spec, model, batch_size)
            rates["bare"].append(len(paths) / wall)
            rates["bare_cpu"].append(len(paths) / cpu)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = {k: max(v) for k, v in rates.items()}  # best of N: the least disturbed run (as timeit does)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "n_units": len(paths),
        "n_ok": first["n_ok"],
        "size": size,
        "batch_size": batch_size,  # type: ignore[index]
        "repeats": repeats,
        "scans_per_s": rates,
        **cold,
        "best": best,
        "median": med,
        "fixed_overhead_s": fixed,
        "fixed_overhead_s_best": min(fixed),
        "ratio_engine_to_bare": best["score_engine"] / best["bare"],
        "ratio_warm_to_bare": best["score_warm"] / best["bare"],
        "ratio_warm_to_bare_median": med["score_warm"] / med["bare"],
        "ratio_warm_to_bare_cpu": best["score_warm_cpu"] / best["bare_cpu"],
        "ratio_cold_to_bare": cold["score_cold"] / best["bare"],
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }


def write_report(res: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "score.json").write_text(json.dumps(res, indent=2) + "\n")
    best, med = res["best"], res["median"]
    rows = [
        ("bare loop (load NIfTI → prepare → forward)", best["bare"], med["bare"], best["bare_cpu"], "1.00"),
        (
            "`score`, ingest cached (re-score)",
            best["score_warm"],
            med["score_warm"],
            best["score_warm_cpu"],
            f"{res['ratio_warm_to_bare']:.2f} (median {res['ratio_warm_to_bare_median']:.2f}, CPU "
            f"{res['ratio_warm_to_bare_cpu']:.2f})",
        ),
        (
            "`score` minus its fixed per-run cost (engine alone)",
            best["score_engine"],
            med["score_engine"],
            float("nan"),
            f"{res['ratio_engine_to_bare']:.2f}",
        ),
        (
            "`score`, first run (DICOM ingest included)",
            res["score_cold"],
            res["score_cold"],
            res["score_cold_cpu"],
            f"{res['ratio_cold_to_bare']:.2f}",
        ),
    ]
    table = "\n".join(
        f"| {name} | {b:.2f} | {m:.2f} | {'–' if c != c else f'{c:.2f}'} | {r} |" for name, b, m, c, r in rows
    )
    text = f"""# Batch scoring throughput (`pipeline/score/`)

Archive: synthetic chest X-ray cohort, {res["n_units"]} image units ({res["n_ok"]} scored); model
tf_efficientnet_lite0 (random init; speed does not depend on weights), 2D, 1 channel,
{res["size"]}×{res["size"]}, batch size {res["batch_size"]}, local engine, `workers=0`. {res["repeats"]}
interleaved rounds of (re-score, bare loop); "best" is the fastest round (the least disturbed by
other jobs, as `timeit` reports), "median" the middle one; the first run happens once. "Scans per
CPU-second" divides by the CPU time of the process (all threads).

| path | scans/s, best | scans/s, median | scans per CPU-second, best | ratio to bare loop (best) |
|---|---:|---:|---:|---|
{table}

Machine: {res["cpu_count"]} CPU cores shared with other jobs (load average at the end
{res["load_average"][0]:.1f}), torch {res["torch"]} on {res["torch_threads"]} threads, **no GPU**
(CUDA available: {res["cuda"]}), so the bf16 autocast path was not exercised; {res["platform"]}.

Fixed cost of one `score` call (measured by re-running it when every chunk is already
committed): {res["fixed_overhead_s_best"]:.2f} s best, {statistics.median(res["fixed_overhead_s"]):.2f} s median. It does not grow
with the archive, so on real archives the ratio tends to the "engine alone" row.

What the ratio measures: `score` adds, per run, loading the model from MLflow, the incremental
ingest pass (a stat of every archive file against its cache), the chunk plan, per-unit failure
handling, embedding/intensity statistics for the domain-shift check, atomic chunk commits
(Parquet + stats) and the final table and metrics JSON. The bare loop does none of that. The
first run (once per process) also pays one-time costs: decoding every DICOM file into the work
folder, importing mlflow.pytorch and the oneDNN warm-up of the first forward passes. Numbers on a shared 2-core
machine are noisy: compare ratios, not absolute rates. Reproduce with
`.venv/bin/python benchmarks/bench_score.py` (raw numbers in score.json).
"""
    path = folder / "score.md"
    path.write_text(text)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32, help="patients in the synthetic cohort (default 32)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--size", type=int, default=224, help="prepared image size (default 224)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "reports" / "benchmarks"))
    a = p.parse_args()
    res = run(a.n, a.repeats, a.size, a.batch_size)
    print(
        json.dumps(
            {k: v for k, v in res.items() if "ratio" in k or k in ("best", "median", "fixed_overhead_s")}, indent=2
        )
    )
    print(write_report(res, Path(a.out)))


if __name__ == "__main__":
    main()
