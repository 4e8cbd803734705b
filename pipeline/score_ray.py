"""Scoring engines: the shared per-batch Scorer, the local DataLoader loop, the Ray Data engine, AdaBN, domain stats."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline import tracking
from pipeline.errors import DataError
from pipeline.finetune import autocast
from pipeline.io import state_sha256
from pipeline.prepare import (
    CT_WINDOWS,
    PRESET_MODALITIES,
    PrepareSpec,
    build_transform,
    prepare_image,
    spec_from_dict,
)

log = logging.getLogger("medxfer")

SMD_WARN = 0.5  # standardised mean difference above which the archive is called different from training
Item = tuple[int, "torch.Tensor | None", str, str]  # (unit index, prepared tensor or None, reason, detail)


class Packaged:
    """A loaded packaged model and what scoring reads from its medxfer metadata."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], uri: str):
        self.model, self.meta, self.uri = model.eval(), meta, uri
        self.spec: PrepareSpec = spec_from_dict(meta["prepare"])
        self.classes = [str(c) for c in meta["classes"]]
        threshold = (meta.get("operating_point") or {}).get("threshold")
        self.threshold = None if threshold is None else float(threshold)
        self.reference = meta.get("reference_stats")
        self.fingerprint = state_sha256(model)
        self.version = _version(uri, self.fingerprint)
        preset = self.spec.preset
        default = {"CT"} if preset in CT_WINDOWS else PRESET_MODALITIES.get(preset, set())
        self.modalities = {str(m) for m in meta.get("modalities") or default}

    @property
    def prob_columns(self) -> list[str]:
        return ["prob"] if len(self.classes) == 2 else [f"prob_{c}" for c in self.classes]


def load_packaged(model_uri: str) -> Packaged:
    """Load a model logged by `tracking.log_model` and check its medxfer metadata.

    Raises:
        TrackingError: the URI cannot be loaded. DataError: the model has no medxfer metadata.
    """
    model, meta = tracking.load_model(model_uri)
    missing = [k for k in ("prepare", "classes") if not meta.get(k)]
    if missing:
        raise DataError(
            f"model {model_uri} carries no medxfer metadata {missing} (found keys {sorted(meta)}); "
            "it was not packaged by `medxfer evaluate`. Fix: score a model logged with "
            "tracking.log_model(..., metadata={'prepare': ..., 'classes': ...})"
        )
    return Packaged(model, meta, model_uri)


def _version(uri: str, fingerprint: str) -> str:
    """Registry version when the URI names one (models:/NAME/3), else the weights fingerprint."""
    parts = uri.rstrip("/").split("/")
    if uri.startswith("models:/") and parts[-1].isdigit():
        return parts[-1]
    return f"sha256:{fingerprint[:12]}"


def prepare_unit(path: str, spec: PrepareSpec, transform: Any) -> tuple[torch.Tensor | None, str, str]:
    """(tensor, "", "") or (None, "prepare-error", detail) for one unit; never raises on bad data."""
    try:
        x = prepare_image(path, spec, transform)
    except DataError as exc:
        return None, "prepare-error", str(exc).replace(f"{path}: ", "").splitlines()[0][:300]
    if not torch.isfinite(x).all():
        return None, "prepare-error", "the prepared tensor holds NaN or inf values (an empty or constant image?)"
    return x, "", ""


class UnitDataset(Dataset):
    """Image units by index → `Item`; the transform is built lazily, once per DataLoader worker."""

    def __init__(self, paths: list[str], spec: PrepareSpec):
        self.paths, self.spec = list(paths), spec
        self._transform: Any = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item:
        if self._transform is None:
            self._transform = build_transform(self.spec)
        return (i, *prepare_unit(self.paths[i], self.spec, self._transform))


def collate_units(items: list[Item]) -> list[Item]:
    """Keep a batch as a list: failed units (None tensors) travel with the good ones."""
    return list(items)


class Scorer:
    """Runs a packaged model (`tracking.CalibratedNet`) on prepared batches: probabilities, pooled
    embeddings (captured from ``model.net.features`` when it exists) and intensity statistics."""

    def __init__(self, model: nn.Module, spec: PrepareSpec | None, device: torch.device, n_classes: int):
        self.model, self.spec, self.device, self.n_classes = model.eval().to(device), spec, device, n_classes
        self._emb: torch.Tensor | None = None
        self.transform = build_transform(spec) if spec is not None else None
        features = getattr(getattr(model, "net", None), "features", None)
        self.dim = 0
        if isinstance(features, nn.Module):
            features.register_forward_hook(self._keep)
            self.dim = int(getattr(model.net, "num_features", 0)) or self._probe_dim()

    def prepare(self, path: str) -> tuple[torch.Tensor | None, str, str]:
        """Prepare one unit with the model's spec (see `prepare_unit`)."""
        if self.spec is None:
            raise DataError("Scorer.prepare: this Scorer was built without the model's prepare spec")
        return prepare_unit(path, self.spec, self.transform)

    def _keep(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._emb = output

    def _probe_dim(self) -> int:
        if self.spec is None:
            return 0
        self.forward(torch.zeros(1, self.spec.channels, *self.spec.size))
        return int(self._emb.flatten(2).shape[1]) if self._emb is not None else 0

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities (B, C) and pooled embeddings (B, D) of a prepared batch."""
        self._emb = None
        with autocast(self.device):
            probs = self.model(x.to(self.device))
        emb = self._emb
        if emb is None:
            return probs.float().cpu().numpy(), np.zeros((len(x), self.dim), np.float32)
        if emb.ndim > 2:
            emb = emb.flatten(2).mean(-1)
        return probs.float().cpu().numpy(), emb.float().cpu().numpy()

    def score_items(self, items: list[Item]) -> dict[str, np.ndarray]:
        """Per-unit arrays for a batch: idx, probs (NaN when failed), emb, mean, std, reason, detail."""
        n = len(items)
        probs, emb = np.full((n, self.n_classes), np.nan, np.float32), np.zeros((n, self.dim), np.float32)
        mean, std = np.full(n, np.nan), np.full(n, np.nan)
        reasons, details = [it[2] for it in items], [it[3] for it in items]
        ok = [j for j, it in enumerate(items) if it[1] is not None]
        if ok:
            x = torch.stack([t for t in (items[j][1] for j in ok) if t is not None])
            try:
                probs[ok], e = self.forward(x)
                if e.shape[1] == self.dim:
                    emb[ok] = e
                flat = x.flatten(1).double()
                mean[ok], std[ok] = flat.mean(1).numpy(), flat.std(1).numpy()
            except (RuntimeError, DataError) as exc:  # a batch the model cannot run: rows, not a crash
                for j in ok:
                    reasons[j], details[j] = "inference-error", str(exc).splitlines()[0][:300]
        return {
            "idx": np.array([it[0] for it in items], dtype=np.int64),
            "probs": probs,
            "emb": emb,
            "mean": mean,
            "std": std,
            "reason": np.array(reasons, dtype=str),
            "detail": np.array(details, dtype=str),
        }


def run_local(
    scorer: Scorer,
    paths: list[str],
    batches: list[list[int]],
    sink: Callable[[dict[str, np.ndarray]], None],
    workers: int = 0,
) -> None:
    """Local engine: a streaming DataLoader (prepare in `workers` processes) feeding batched inference."""
    if scorer.spec is None:
        raise DataError("run_local: the Scorer needs the model's prepare spec")
    loader = DataLoader(
        UnitDataset(paths, scorer.spec),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_units,
        prefetch_factor=2 if workers else None,
    )
    for items in loader:
        sink(scorer.score_items(items))


def adapt_batchnorm(
    model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | None = None
) -> tuple[int, int]:
    """AdaBN (Li et al. 2016): re-estimate every BatchNorm's running mean/var on target-domain batches.

    Statistics are reset and re-accumulated as the plain average over batches (momentum None);
    weights are unchanged and the model is left in eval mode.

    Returns:
        (images seen, BatchNorm layers adapted).

    Raises:
        DataError: no batch was given (the previous statistics are restored).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if device is not None:
        model.to(device)
    saved = [(m.momentum, {k: v.clone() for k, v in m.state_dict().items()}) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    n = 0
    with torch.no_grad():
        for x in batches:
            model(x.to(device) if device is not None else x)
            n += len(x)
    for m, (momentum, state) in zip(bns, saved, strict=True):
        m.momentum = momentum
        m.eval()
        if n == 0:
            m.load_state_dict(state)
    if n == 0:
        raise DataError(
            "adapt_bn: no image unit of the archive could be prepared, so BatchNorm statistics "
            "cannot be re-estimated; fix the failures listed in the output or drop --adapt-bn"
        )
    return n, len(bns)


class DomainStats:
    """Mergeable sums of per-unit intensity mean/std of prepared tensors and of pooled embeddings."""

    def __init__(self) -> None:
        self.n, self.s = 0, np.zeros(4)
        self.e1: np.ndarray | None = None
        self.e2: np.ndarray | None = None

    def add(self, mean: np.ndarray, std: np.ndarray, emb: np.ndarray) -> None:
        mean, std, emb = (np.asarray(a, dtype=np.float64) for a in (mean, std, emb))
        self.n += len(mean)
        self.s += [mean.sum(), (mean**2).sum(), std.sum(), (std**2).sum()]
        if emb.ndim == 2 and emb.shape[1]:
            self._add_emb(emb.sum(0), (emb**2).sum(0))

    def _add_emb(self, e1: np.ndarray, e2: np.ndarray) -> None:
        self.e1 = e1 if self.e1 is None else self.e1 + e1
        self.e2 = e2 if self.e2 is None else self.e2 + e2

    def merge(self, other: DomainStats) -> None:
        self.n += other.n
        self.s = self.s + other.s
        if other.e1 is not None and other.e2 is not None:
            self._add_emb(other.e1, other.e2)

    def arrays(self) -> dict[str, np.ndarray]:
        empty = np.zeros(0)
        return {
            "n": np.array(self.n),
            "s": self.s,
            "e1": empty if self.e1 is None else self.e1,
            "e2": empty if self.e2 is None else self.e2,
        }

    @classmethod
    def load(cls, path: str | Path) -> DomainStats:
        with np.load(path) as z:
            out = cls()
            out.n, out.s = int(z["n"]), z["s"].copy()
            if z["e1"].size:
                out.e1, out.e2 = z["e1"].copy(), z["e2"].copy()
        return out

    def summary(self) -> dict[str, Any]:
        """{"n", "intensity_mean": [mean, sd], "intensity_std": [mean, sd], "embedding_mean", "embedding_sd"}:
        the schema of the model metadata key ``reference_stats``."""

        def mean_sd(s1: Any, s2: Any) -> tuple[Any, Any]:
            m = s1 / max(self.n, 1)
            var = (s2 - self.n * m**2) / (self.n - 1) if self.n > 1 else s2 * 0.0
            return m, np.sqrt(np.maximum(var, 0.0))

        out: dict[str, Any] = {"n": self.n}
        out["intensity_mean"] = [float(v) for v in mean_sd(self.s[0], self.s[1])]
        out["intensity_std"] = [float(v) for v in mean_sd(self.s[2], self.s[3])]
        if self.e1 is not None:
            m, sd = mean_sd(self.e1, self.e2)
            out["embedding_mean"], out["embedding_sd"] = m.tolist(), sd.tolist()
        return out


def reference_stats(
    model: nn.Module, dataset: Dataset, batch_size: int = 32, device: torch.device | None = None
) -> dict[str, Any]:
    """Training-set statistics to store as the model metadata key ``reference_stats``.

    `dataset` yields prepared tensors, or tuples whose first item is one (e.g. PreparedDataset).
    """
    scorer = Scorer(model, None, device or torch.device("cpu"), n_classes=0)
    stats = DomainStats()
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x = batch[0] if isinstance(batch, list | tuple) else batch
        _, emb = scorer.forward(x)
        flat = x.flatten(1).double()
        stats.add(flat.mean(1).numpy(), flat.std(1).numpy(), emb)
    return stats.summary()


def _smd(a: list[float], r: list[float]) -> float:
    """Standardised mean difference (a − r) / pooled SD of two [mean, sd] pairs."""
    pooled = np.sqrt((a[1] ** 2 + r[1] ** 2) / 2.0)
    return float((a[0] - r[0]) / max(pooled, 1e-6))


def compare_domain(reference: dict[str, Any] | None, archive: dict[str, Any]) -> dict[str, Any]:
    """Compare the archive's statistics (DomainStats.summary) with the model's training-set ones.

    Intensity: SMD of the per-unit mean and of the per-unit SD of prepared tensors. Embeddings:
    the root-mean-square over features of the per-feature SMD, with the sampling noise of two
    samples of sizes n_a, n_r (expected RMS² ≈ 1/n_a + 1/n_r) subtracted. Each above `SMD_WARN`
    gives a warning.
    """
    out: dict[str, Any] = {"checked": False, "threshold": SMD_WARN, "warnings": [], "n_archive": archive.get("n", 0)}
    if not reference:
        out["note"] = (
            "the model carries no reference_stats (training-set statistics): domain-shift check "
            "skipped; see pipeline.score_ray.reference_stats"
        )
        return out
    if not archive.get("n"):
        out["note"] = "no unit was scored: domain-shift check skipped"
        return out
    out.update(checked=True, n_reference=int(reference.get("n", 0)))
    for key, what in (("intensity_mean", "mean"), ("intensity_std", "spread (SD)")):
        smd = _smd(archive[key], reference[key])
        out[f"{key}_smd"] = smd
        if abs(smd) > SMD_WARN:
            out["warnings"].append(
                f"intensity {what} of the prepared images differs from training: {archive[key][0]:.3f} vs "
                f"{reference[key][0]:.3f} (SMD {smd:+.2f}); check modality, preset/windowing and scanner"
            )
    out.update(_embedding_shift(reference, archive))
    if out.get("embedding_rms_smd_corrected", 0.0) > SMD_WARN:
        out["warnings"].append(
            f"image features differ from training (RMS SMD {out['embedding_rms_smd_corrected']:.2f} over "
            f"{out['n_features']} features, noise-corrected); predictions may be unreliable: validate on "
            "labelled local data or try --adapt-bn"
        )
    return out


def _embedding_shift(reference: dict[str, Any], archive: dict[str, Any]) -> dict[str, Any]:
    if "embedding_mean" not in reference or "embedding_mean" not in archive:
        return {"embedding_note": "embeddings unavailable (model without net.features, or old reference_stats)"}
    ma, sa = np.asarray(archive["embedding_mean"]), np.asarray(archive["embedding_sd"])
    mr, sr = np.asarray(reference["embedding_mean"]), np.asarray(reference["embedding_sd"])
    if ma.shape != mr.shape:
        return {"embedding_note": f"embedding sizes differ ({ma.size} vs {mr.size} in reference_stats)"}
    pooled = np.sqrt((sa**2 + sr**2) / 2.0)
    keep = pooled > 1e-8
    smd = (ma[keep] - mr[keep]) / pooled[keep]
    raw = float(np.sqrt(np.mean(smd**2))) if smd.size else 0.0
    noise = 1.0 / max(int(archive["n"]), 1) + 1.0 / max(int(reference.get("n", 0)), 1)
    return {
        "n_features": int(keep.sum()),
        "embedding_rms_smd": raw,
        "embedding_rms_smd_corrected": float(np.sqrt(max(raw**2 - noise, 0.0))),
    }


# ------------------------------------------------------------------------------------------- Ray engine


def ray_runtime_env() -> dict[str, Any]:
    """Runtime env that makes this checkout importable in local Ray workers (an installed medxfer needs none)."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


class ModelActor:
    """Ray Data callable class: loads the packaged model once per actor, then scores rows that each
    hold one batch of units (``{"units": JSON [[idx, path], ...]}``, the local engine's batches)."""

    def __init__(self, model_uri: str, tracking_uri: str, bn_state: dict[str, torch.Tensor] | None = None):
        tracking.connect(tracking_uri)
        pkg = load_packaged(model_uri)
        if bn_state:
            pkg.model.load_state_dict(bn_state, strict=False)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.scorer = Scorer(pkg.model, pkg.spec, device, len(pkg.classes))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for units in batch["units"]:
            items = [(int(i), *self.scorer.prepare(str(p))) for i, p in json.loads(str(units))]
            results.append(self.scorer.score_items(items))
        return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


def run_ray(
    pkg: Any,
    units: list[dict],
    batches: list[list[int]],
    sink: Callable[[dict[str, np.ndarray]], None],
    *,
    address: str | None,
    workers: int,
    tracking_uri: str,
    bn_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Ray engine: ``ray.data.from_items(rows).map_batches(ModelActor, ...)``; results go to `sink`.

    Each row is one batch of `batches` (the local engine's batches), so both engines run the
    model on the same batch compositions: with the same torch thread count their probabilities
    are bit-identical, otherwise equal to float32 rounding (~1e-7).

    Cluster use::

        ray start --head --port 6379 --ray-client-server-port 10001      # on the head node
        ray start --address HEAD:6379                                     # on each worker node
        medxfer score --engine ray --address ray://HEAD:10001 \\
            --model models:/cxr-demo/latest --tracking-uri http://MLFLOW:5000 \\
            /shared/archive --out /shared/scores/predictions.parquet

    Every node needs the same medxfer (and torch) installed, and must see the same paths: the
    output folder (its ``<out>.work/manifest/images`` is what actors read; put it on a shared
    filesystem) and the model (use an MLflow server URI, or a model path / sqlite store on the
    shared filesystem). One actor per GPU when the cluster has GPUs (``num_gpus=1``, bf16
    autocast), else one per CPU; ``--workers N`` sets the actor count. Ingest, chunk commits and
    the final table run on the driver, so a killed driver resumes like the local engine. Without
    ``--address`` a local Ray is started (and stopped); ``--address auto`` joins a running one.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address,
            runtime_env=ray_runtime_env() if address is None else None,
            include_dashboard=False,
            log_to_driver=False,
        )
    elif address:
        log.info("score: Ray is already initialised in this process; --address %s ignored", address)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        size = workers or gpus or max(1, int(resources.get("CPU", 1)))
        rows = [{"units": json.dumps([[i, units[i]["path"]] for i in batch])} for batch in batches]
        ds = ray.data.from_items(rows).map_batches(
            ModelActor,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=1,
            num_gpus=1 if gpus else 0,
            fn_constructor_kwargs={"model_uri": pkg.uri, "tracking_uri": tracking_uri, "bn_state": bn_state},
        )
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            sink(out)
    finally:
        if started:
            ray.shutdown()
