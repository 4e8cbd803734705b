"""Domain statistics: intensity and embedding statistics of prepared images, and their training-vs-archive check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader, Dataset

SMD_WARN = 0.5  # standardised mean difference above which the archive is called different from training


class Embedder:
    """Runs a packaged model (`adapt.CalibratedNet`) and captures pooled embeddings.

    The embedding is the output of ``model.net.features`` (captured by a forward hook when that
    module exists), mean-pooled over its spatial axes: (B, D) float32. Models without it give
    zero-width embeddings.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        autocast: Callable[[torch.device], Any] | None = None,
        input_shape: tuple[int, ...] | None = None,
    ):
        """Move `model` to `device` in eval mode and hook its features.

        Args:
            model: the packaged model; outputs probabilities (B, n_classes).
            device: where the forward passes run.
            autocast: context factory for the forward pass (e.g. `pipeline.finetune.autocast`);
                None runs in float32 (a disabled CPU autocast, as `pipeline.finetune.autocast` on CPU).
            input_shape: one prepared input (C, H, W) or (C, D, H, W); used to find the embedding
                width with a dummy forward when the network does not state ``num_features``.
        """
        self.model, self.device = model.eval().to(device), device
        self.autocast = autocast
        self._emb: torch.Tensor | None = None
        self._input_shape = input_shape
        features = getattr(getattr(model, "net", None), "features", None)
        self.dim = 0
        if isinstance(features, nn.Module):
            features.register_forward_hook(self._keep)
            self.dim = int(getattr(model.net, "num_features", 0)) or self._probe_dim()

    def _keep(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._emb = output

    def _probe_dim(self) -> int:
        if self._input_shape is None:
            return 0
        self.forward(torch.zeros(1, *self._input_shape))
        return int(self._emb.flatten(2).shape[1]) if self._emb is not None else 0

    def _context(self) -> Any:
        return self.autocast(self.device) if self.autocast is not None else torch.autocast("cpu", enabled=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and pooled embeddings of a prepared batch.

        Args:
            x: prepared float32 tensors (B, C, H, W) or (B, C, D, H, W).

        Returns:
            (probabilities (B, n_classes), embeddings (B, D)), float32 NumPy arrays.
        """
        self._emb = None
        with self._context():
            probs = self.model(x.to(self.device))
        emb = self._emb
        if emb is None:
            return probs.float().cpu().numpy(), np.zeros((len(x), self.dim), np.float32)
        if emb.ndim > 2:
            emb = emb.flatten(2).mean(-1)
        return probs.float().cpu().numpy(), emb.float().cpu().numpy()


class DomainStats:
    """Mergeable sums of per-unit intensity mean/std of prepared tensors and of pooled embeddings."""

    def __init__(self) -> None:
        self.n, self.s = 0, np.zeros(4)
        self.e1: np.ndarray | None = None
        self.e2: np.ndarray | None = None

    def add(self, mean: np.ndarray, std: np.ndarray, emb: np.ndarray) -> None:
        """Add units: per-unit intensity `mean` and `std` (N,) and embeddings `emb` (N, D)."""
        mean, std, emb = (np.asarray(a, dtype=np.float64) for a in (mean, std, emb))
        self.n += len(mean)
        self.s += [mean.sum(), (mean**2).sum(), std.sum(), (std**2).sum()]
        if emb.ndim == 2 and emb.shape[1]:
            self._add_emb(emb.sum(0), (emb**2).sum(0))

    def _add_emb(self, e1: np.ndarray, e2: np.ndarray) -> None:
        self.e1 = e1 if self.e1 is None else self.e1 + e1
        self.e2 = e2 if self.e2 is None else self.e2 + e2

    def merge(self, other: DomainStats) -> None:
        """Add the units summed in `other`."""
        self.n += other.n
        self.s = self.s + other.s
        if other.e1 is not None and other.e2 is not None:
            self._add_emb(other.e1, other.e2)

    def arrays(self) -> dict[str, np.ndarray]:
        """The sums as arrays for ``np.savez`` (`load` reads them back)."""
        empty = np.zeros(0)
        return {
            "n": np.array(self.n),
            "s": self.s,
            "e1": empty if self.e1 is None else self.e1,
            "e2": empty if self.e2 is None else self.e2,
        }

    @classmethod
    def load(cls, path: str | Path) -> DomainStats:
        """Read sums saved with ``np.savez(path, **stats.arrays())``."""
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
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 32,
    device: torch.device | None = None,
    autocast: Callable[[torch.device], Any] | None = None,
    desc: str | None = None,
) -> dict[str, Any]:
    """Training-set statistics to store as the model metadata key ``reference_stats``.

    Args:
        model: the packaged model (`adapt.CalibratedNet`); embeddings come from ``model.net.features``.
        dataset: yields prepared tensors, or tuples whose first item is one (e.g. PreparedDataset).
        batch_size: units per forward pass.
        device: where the model runs (default CPU; the model is moved there).
        autocast: context factory for the forward pass (see `Embedder`); None runs in float32.
        desc: label of a console progress bar over the batches; None shows none.

    Returns:
        `DomainStats.summary` of the dataset.
    """
    embedder = Embedder(model, device or torch.device("cpu"), autocast)
    stats = DomainStats()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with Progress(transient=True, disable=desc is None) as bar:
        task = bar.add_task(desc or "", total=len(loader))
        for batch in loader:
            x = batch[0] if isinstance(batch, list | tuple) else batch
            _, emb = embedder.forward(x)
            flat = x.flatten(1).double()
            stats.add(flat.mean(1).numpy(), flat.std(1).numpy(), emb)
            bar.advance(task)
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

    Args:
        reference: the model's ``reference_stats`` (None when it carries none: check skipped).
        archive: the scored units' `DomainStats.summary`.

    Returns:
        {"checked", "threshold", "warnings", "n_archive", ...}: the SMDs, or a "note" when skipped.
    """
    out: dict[str, Any] = {"checked": False, "threshold": SMD_WARN, "warnings": [], "n_archive": archive.get("n", 0)}
    if not reference:
        out["note"] = (
            "the model carries no reference_stats (training-set statistics): domain-shift check "
            "skipped; see pipeline.evaluate.reference_stats"
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
