"""Benchmark: files/s and MB/s of `medxfer ingest` against a bare `pydicom.dcmread(path).pixel_array` loop.

Run from the repository root:

    .venv/bin/python benchmarks/bench_ingest.py [--n 60] [--repeats 3] [--quick]

Archives: a synthetic chest CT cohort (`pipeline.synthetic` "ct3d", ~64 slices per patient) and the
greyscale `pydicom-data` images (693 CT, MR2, RG1/RG3 CR; US1 is colour, which ingest quarantines),
uncompressed (`*_UNCR`) and JPEG 2000 lossless (`*_J2KR`). Each is timed against a bare decode loop
over the same files, with 1 and 2 processes, best of `--repeats` interleaved rounds after warming
the page cache; one more ingest runs under cProfile. Writes reports/benchmarks/ingest.md and
ingest.json (`--quick`: tiny smoke run, written to a temporary folder unless --out is given).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing
import os
import platform
import pstats
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy: one core per process
    os.environ.setdefault(_var, "1")

import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.ingest import ingest  # noqa: E402
from pipeline.synthetic import make_cohort  # noqa: E402

IMAGES = ("693", "MR2", "RG1", "RG3")  # greyscale pydicom-data images
QUICK_IMAGES = ("693", "MR2")
PATHS = ("bare w=1", "ingest w=1", "bare w=2", "ingest w=2")
# (file suffix, function) of the ingest internals shown in the profile table
PROFILE_POINTS = [
    ("manifest.py", "_scan", "pass 1 `_scan`: read and check every header"),
    ("manifest.py", "_build", "pass 2 `_build`: decode, reorient, write NIfTI"),
    ("filereader.py", "dcmread", "  `pydicom.dcmread` (both passes)"),
    ("dicom.py", "_header_from", "  header fields + keyed-hash pseudonyms"),
    ("dicom.py", "_check_image", "  image/decoder checks"),
    ("dataset.py", "pixel_array", "  `Dataset.pixel_array`"),
    ("processing.py", "apply_modality_lut", "  rescale (`apply_modality_lut`)"),
    ("nifti.py", "finish_volume", "  RAS reorientation + int16 check"),
    ("nifti.py", "content_sha256", "  content sha256"),
    ("nifti.py", "nifti_bytes", "  NIfTI encoding"),
    ("io.py", "write_bytes", "  atomic write + fsync (all files)"),
    ("manifest.py", "_walk", "walk SOURCE"),
    ("labels.py", "join_labels", "labels join + splits"),
    ("cache.py", "save_cache", "incremental cache"),
    ("outputs.py", "write_outputs", "manifest, quarantine, report"),
]


# -------------------------------------------------------------------------------------------- inputs


def _pydicom_data(suffix: str, names: tuple[str, ...]) -> list[Path]:
    """`<name>_<suffix>.dcm` from the pydicom-data package (found through pydicom's data manager)."""
    found = []
    for name in names:
        path = get_testdata_file(f"{name}_{suffix}.dcm", download=False)
        if not path:
            raise SystemExit(f"{name}_{suffix}.dcm not found: pip install pydicom-data (MIT, offline wheel)")
        found.append(Path(str(path)))
    return found


def _copy_archive(files: list[Path], dest: Path) -> Path:
    """A fresh archive folder holding copies of `files` (one archive per set: 693_UNCR and 693_J2KR share a SOP UID)."""
    dest.mkdir(parents=True)
    for path in files:
        shutil.copy2(path, dest / path.name)
    return dest


def _archive_files(archive: Path) -> list[Path]:
    return sorted(p for p in archive.rglob("*") if p.is_file() and not p.name.startswith("."))


def _warm(paths: list[Path]) -> None:
    """Read every byte twice so that both paths start from the page cache."""
    for _ in range(2):
        for path in paths:
            path.read_bytes()


# ------------------------------------------------------------------------------------------- timing


def _bare(paths: list[str]) -> int:
    """The floor: parse each file and decode its pixels with pydicom; nothing else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in paths:
            pydicom.dcmread(path).pixel_array  # noqa: B018
    return len(paths)


def _bare_pool(paths: list[str], workers: int) -> int:
    """The bare loop over a spawn pool (pool start-up included, as in ingest): size-balanced chunks."""
    chunks: list[list[str]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for path in sorted(paths, key=lambda p: -os.path.getsize(p)):
        i = loads.index(min(loads))
        chunks[i].append(path)
        loads[i] += os.path.getsize(path)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return sum(pool.map(_bare, chunks))


def _child_ready(_: int) -> int:
    """A pool task that pays what an ingest worker pays first: importing the ingest modules."""
    import pipeline.ingest.manifest  # noqa: F401

    time.sleep(0.05)  # long enough that both workers get a task
    return os.getpid()


def _pool_startup(workers: int, repeats: int) -> float:
    """Best wall seconds to start a spawn pool whose workers import pipeline.ingest, and shut it down."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_child_ready, range(workers)))
        best = min(best, time.perf_counter() - start)
    return best


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process and of its finished child processes)."""

    def cpu() -> float:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + kids.ru_utime + kids.ru_stime

    wall, start = time.perf_counter(), cpu()
    out = fn()
    return out, time.perf_counter() - wall, cpu() - start


def _ingest_once(archive: Path, labels: Path | None, out: Path, key: Path, workers: int) -> Any:
    shutil.rmtree(out, ignore_errors=True)  # a fresh manifest: no unit is reused from the cache
    return ingest(archive, labels, out, key_file=key, workers=workers, progress=False)


def _measure(archive: Path, labels: Path | None, work: Path, repeats: int) -> dict[str, Any]:
    """Interleaved rounds of the four paths; best and median wall/CPU seconds of each."""
    paths = [str(p) for p in _archive_files(archive)]
    runs: dict[str, dict[str, list[float]]] = {p: {"wall": [], "cpu": []} for p in PATHS}
    results: dict[str, Any] = {}
    key, out = work / "keys" / "pseudonym.key", work / "manifest"
    for _ in range(repeats):
        for name in PATHS:
            workers = int(name[-1])
            if name.startswith("bare"):
                job = partial(_bare, paths) if workers == 1 else partial(_bare_pool, paths, workers)
            else:
                job = partial(_ingest_once, archive, labels, out, key, workers)
            result, wall, cpu = _timed(job)
            runs[name]["wall"].append(wall)
            runs[name]["cpu"].append(cpu)
            results[name] = result
    report = results["ingest w=1"].report
    return {
        "runs": runs,
        "units": report["units"],
        "quarantined": report["quarantined"]["files"],
        "quarantine_reasons": report["quarantined"]["by_reason"],
        "same_result_w2": results["ingest w=2"].report["manifest_sha256"] == report["manifest_sha256"],
    }


def _summarise(runs: dict[str, dict[str, list[float]]], n_files: int, n_bytes: int) -> dict[str, dict[str, float]]:
    rows = {}
    bare = {w: min(runs[f"bare w={w}"]["wall"]) for w in (1, 2)}
    bare_cpu = min(runs["bare w=1"]["cpu"])
    for name in PATHS:
        wall, cpu = min(runs[name]["wall"]), min(runs[name]["cpu"])
        rows[name] = {
            "best_wall_s": wall,
            "median_wall_s": statistics.median(runs[name]["wall"]),
            "best_cpu_s": cpu,
            "files_per_s": n_files / wall,
            "mb_per_s": n_bytes / 1e6 / wall,
            "ratio_to_bare_w1": wall / bare[1],
            "ratio_to_bare_same_w": wall / bare[int(name[-1])],
            "cpu_ratio_to_bare_w1": cpu / bare_cpu,
        }
    return rows


# ------------------------------------------------------------------------------------------ profile


def _profile(archive: Path, labels: Path | None, work: Path, n_files: int) -> dict[str, Any]:
    """One in-process ingest under cProfile: cumulative seconds and share of the chosen internals."""
    profiler = cProfile.Profile()
    out, key = work / "profiled", work / "keys" / "pseudonym.key"
    shutil.rmtree(out, ignore_errors=True)
    profiler.enable()
    ingest(archive, labels, out, key_file=key, workers=1, progress=False)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(tt for (_, _, tt, _, _) in stats.values())
    rows = []
    for suffix, func, label in PROFILE_POINTS:
        hits = [(nc, ct) for (file, _, fn), (_, nc, _, ct, _) in stats.items() if fn == func and file.endswith(suffix)]
        if hits:
            calls, cum = sum(h[0] for h in hits), sum(h[1] for h in hits)
            rows.append(
                {
                    "what": label,
                    "function": f"{suffix[:-3]}.{func}",
                    "calls": calls,
                    "calls_per_file": calls / n_files,
                    "cum_s": cum,
                    "share": cum / total,
                }
            )
    top = sorted(
        ((tt, f"{Path(file).name}:{fn}", nc) for (file, _, fn), (_, nc, tt, _, _) in stats.items()), reverse=True
    )[:10]
    return {
        "profiled_total_s": total,
        "points": rows,
        "top_tottime": [{"function": name, "tottime_s": tt, "calls": nc} for tt, name, nc in top],
    }


# ------------------------------------------------------------------------------------------- report


def _machine() -> dict[str, Any]:
    model = ""
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "gpu": "none (CPU-only machine)",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pydicom": pydicom.__version__,
        "threads_per_process": os.environ.get("OMP_NUM_THREADS"),
    }


def _table(sets: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| archive | files | MB | path | best wall s | files/s | MB/s | × bare w=1 (wall) | × bare w=1 (CPU) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in sets:
        for name, row in s["summary"].items():
            lines.append(
                f"| {s['name']} | {s['files']} | {s['mb']:.1f} | {name} | {row['best_wall_s']:.2f} | "
                f"{row['files_per_s']:.0f} | {row['mb_per_s']:.1f} | {row['ratio_to_bare_w1']:.2f} | "
                f"{row['cpu_ratio_to_bare_w1']:.2f} |"
            )
    return lines


def _findings(sets: list[dict[str, Any]]) -> list[str]:
    lines = []
    for s in sets:
        r = s["summary"]
        one, two = r["ingest w=1"], r["ingest w=2"]
        scale = one["best_wall_s"] / two["best_wall_s"]
        bare_scale = r["bare w=1"]["best_wall_s"] / r["bare w=2"]["best_wall_s"]
        verdict = "within" if one["ratio_to_bare_w1"] <= 1.5 else "above"
        quarantined = f" {json.dumps(s['quarantine_reasons'])}" if s["quarantined"] else ""
        lines.append(
            f"- **{s['name']}**: ingest (1 process) takes {one['ratio_to_bare_w1']:.2f}× (wall; "
            f"{one['cpu_ratio_to_bare_w1']:.2f}× in CPU time) the bare decode loop, {verdict} the 1.5× "
            f"aim{_short_note(r)}; 2 workers give {scale:.2g}× the 1-worker speed (the bare loop over 2 "
            f"processes {bare_scale:.2g}×; ingest w=2 / bare w=2 = {two['ratio_to_bare_same_w']:.2f}). "
            f"{s['units']} image units, {s['quarantined']} files quarantined{quarantined}; manifest "
            f"identical with 2 workers: {s['same_result_w2']}."
        )
    return lines


def _short_note(r: dict[str, dict[str, float]]) -> str:
    bare = r["bare w=1"]["best_wall_s"]
    return (
        (
            f" (the bare loop takes only {1000 * bare:.0f} ms here, so the ratio is ingest's own per-pixel work, "
            "writes and fixed per-run costs; wall time this short is noisy)"
        )
        if bare < 0.1
        else ""
    )


def _profile_lines(sets: list[dict[str, Any]]) -> list[str]:
    lines = []
    for s in sets:
        prof = s.get("profile")
        if not prof:
            continue
        lines += [
            "",
            f"**{s['name']}** (profiled ingest: {prof['profiled_total_s']:.1f} s)",
            "",
            "| where | calls | share of ingest time |",
            "|---|---:|---:|",
        ]
        lines += [f"| {p['what']} | {p['calls']} | {100 * p['share']:.0f}% |" for p in prof["points"]]
    return lines


def write_report(out: Path, sets: list[dict[str, Any]], machine: dict[str, Any], args: argparse.Namespace) -> None:
    """Write ingest.json (everything) and ingest.md (table, findings, profile, machine) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    blob = {"parameters": vars(args), "machine": machine, "sets": sets}
    (out / "ingest.json").write_text(json.dumps(blob, indent=2, default=str) + "\n")
    md = [
        "# Ingest throughput (`pipeline/ingest`)",
        "",
        f"Best of {args.repeats} interleaved rounds per path, page cache warmed first; every ingest writes a "
        "fresh manifest (no incremental reuse). *bare* = `pydicom.dcmread(path).pixel_array` over the same "
        "files; *ingest* = `ingest(...)` end to end (walk, header scan, grouping and slice sort, decode + "
        "rescale, RAS reorientation, NIfTI write with fsync, labels join, manifest/report). w=2 includes "
        "starting the spawn process pool. CPU = this process plus its finished child processes.",
        "",
        *_table(sets),
        "",
        "## What it means",
        "",
        *_findings(sets),
        "",
        *_explain(sets, machine),
        "",
        "## Where ingest spends its time (cProfile, 1 process)",
        "",
        "Shares are of the profiled run (cProfile inflates pure-Python code more than C decoders); "
        "indented rows are parts of the passes above them.",
        *_profile_lines(sets),
        "",
        "## Machine",
        "",
        f"- {machine['cpus']} CPU cores ({machine['cpu_model']}), **shared and loaded** by other jobs running "
        f"at the same time (load average {machine['load_average_start']} at the start, "
        f"{machine['load_average']} at the end): absolute rates are noisy, compare ratios within one run.",
        f"- {machine['gpu']}; one thread per process (OMP/OPENBLAS/MKL_NUM_THREADS=1).",
        f"- Starting a 2-process spawn pool whose workers import `pipeline.ingest` takes "
        f"{machine['pool_startup_w2_s']:.2f} s here (best of {args.repeats}); every w=2 row pays it once.",
        f"- Python {machine['python']}, pydicom {machine['pydicom']}, {machine['platform']}.",
        "",
        f"Reproduce: `.venv/bin/python benchmarks/bench_ingest.py --n {args.n} --repeats {args.repeats}` "
        "(raw numbers and every round in ingest.json).",
    ]
    (out / "ingest.md").write_text("\n".join(md) + "\n")


NEXT_STEPS = [
    "- (Done: one `dcmread` per plain uncompressed file; compressed, multi-frame and MONOCHROME1 files still "
    "take a second, full decode.) Most of what remains is the header scan: parsing and converting header "
    "values through pydicom; reading the few raw values grouping needs directly would cut it further.",
    "- A lighter header parse in the scan (pydicom `specific_tags` with the ~25 elements grouping needs) "
    "skips converting elements the scan never reads.",
    "- Big uncompressed images: fewer whole-array passes (float32 rescale, inversion, int16 round trip, "
    "a `tobytes` copy for the hash) and one fsync per run instead of one per NIfTI file.",
]


def _faster(s: dict[str, Any], kind: str) -> bool:
    return s["summary"][f"{kind} w=2"]["best_wall_s"] < s["summary"][f"{kind} w=1"]["best_wall_s"]


def _explain(sets: list[dict[str, Any]], machine: dict[str, Any]) -> list[str]:
    """The structural reasons behind the ratios (read from the profile) and what limits scaling here."""
    prof = next((s["profile"] for s in sets if s.get("profile")), None)
    reads = {p["function"]: p for p in prof["points"]}.get("filereader.dcmread") if prof else None
    first = sets[0]["summary"]["ingest w=1"]["cpu_ratio_to_bare_w1"]
    lines = []
    if reads:
        lines += [
            f"Why: ingest calls `dcmread` {reads['calls_per_file']:.1f} times per file (once in the header "
            "scan that groups and sorts series; plain uncompressed slices are then decoded from the pixel "
            "offset the scan recorded, without a second parse), the bare loop once. On "
            "small uncompressed slices the parse, not the pixel copy, is most of the cost: the second parse "
            "alone puts ingest near 2×, and converting the header fields it needs (plus keyed-hash "
            f"pseudonyms, image and decoder checks, rescaling) takes it to the measured {first:.1f}× (CPU). "
            "Where decoding dominates (JPEG 2000) the extra parse and the NIfTI write vanish in the decode "
            "time. On big uncompressed images the bare loop is about one memory copy (pydicom's native "
            "decode copies the bytes it read into an array), while ingest must also rescale to float32, "
            "invert MONOCHROME1, reorient, check for int16, hash, and write (and fsync) a NIfTI file of the "
            "same size: against that floor the 1.5× aim cannot be met while ingest writes its own images.",
            "",
        ]
    n_ingest, n_bare = sum(_faster(s, "ingest") for s in sets), sum(_faster(s, "bare") for s in sets)
    lines += [
        f"Scaling: on this machine 2 workers beat 1 on {n_ingest} of {len(sets)} archives, and the bare "
        f"loop split over 2 processes beat the 1-process loop on {n_bare} of {len(sets)}. With the 2 cores "
        f"already loaded (load average {machine['load_average_start'][0]}-{machine['load_average'][0]}), a "
        "second process gets little CPU, and each w=2 run first pays the pool start-up "
        f"({machine['pool_startup_w2_s']:.2f} s here: 2 spawned interpreters importing numpy, pydicom, "
        "nibabel, pandas). The w=2 / w=1 figures therefore say little about ingest's parallel design (its "
        "outputs are identical with 2 workers); measuring scaling needs an idle multi-core machine and an "
        "archive large enough to amortise start-up.",
        "",
        "Where the ratio could come down (not done in this change):",
        "",
        *NEXT_STEPS,
    ]
    return lines


# --------------------------------------------------------------------------------------------- main


def _sets(root: Path, args: argparse.Namespace) -> list[tuple[str, Path, Path | None]]:
    n = 4 if args.quick else args.n
    cohort = make_cohort(root / "ct3d", kind="ct3d", n=n, seed=0)
    images = QUICK_IMAGES if args.quick else IMAGES
    return [
        (f"synthetic ct3d (n={n} patients)", cohort.archive_dir, cohort.labels_csv),
        ("pydicom-data UNCR", _copy_archive(_pydicom_data("UNCR", images), root / "uncr"), None),
        ("pydicom-data J2KR", _copy_archive(_pydicom_data("J2KR", images), root / "j2kr"), None),
    ]


def main(argv: list[str] | None = None) -> int:
    """Build the archives, time every path, profile, write the report; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60, help="ct3d patients (2 series of 24-40 slices each)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best is kept")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (n=4, 2 images, 1 round)")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile run")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default reports/benchmarks)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="bench-ingest-quick-")) if args.quick else ROOT / "reports" / "benchmarks"
    )
    load_start = [round(v, 2) for v in os.getloadavg()]
    root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    sets: list[dict[str, Any]] = []
    try:
        for name, archive, labels in _sets(root, args):
            files = _archive_files(archive)
            n_bytes = sum(p.stat().st_size for p in files)
            _warm(files)
            work = root / f"work-{len(sets)}"
            measured = _measure(archive, labels, work, args.repeats)
            entry = {
                "name": name,
                "files": len(files),
                "mb": n_bytes / 1e6,
                **measured,
                "summary": _summarise(measured["runs"], len(files), n_bytes),
            }
            if not args.no_profile:
                entry["profile"] = _profile(archive, labels, work, len(files))
            sets.append(entry)
            print(
                f"{name}: " + ", ".join(f"{k} {v['best_wall_s']:.2f}s" for k, v in entry["summary"].items()), flush=True
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    machine = {**_machine(), "load_average_start": load_start, "pool_startup_w2_s": _pool_startup(2, args.repeats)}
    write_report(out, sets, machine, args)
    print(f"wrote {out / 'ingest.md'} and {out / 'ingest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
