"""AdaBN: re-estimate a model's BatchNorm statistics on the archive being scored (cached for resumed runs)."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.errors import DataError
from pipeline.io import load_tensors, write_bytes
from pipeline.records import Packaged
from pipeline.score.scorer import UnitDataset, collate_units


def adapt_batchnorm(
    model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | None = None
) -> tuple[int, int]:
    """AdaBN (Li et al. 2016): re-estimate every BatchNorm's running mean/var on target-domain batches.

    Statistics are reset and re-accumulated as the plain average over batches (momentum None);
    weights are unchanged and the model is left in eval mode.

    Args:
        model: the model to adapt (in place). batches: prepared target-domain tensors (B, C, ...).
        device: where to run (the model is moved there); None leaves it where it is.

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


def archive_bn_state(
    pkg: Packaged, units: list[dict], folder: Path, batch_size: int, workers: int, device: torch.device
) -> dict[str, Any]:
    """AdaBN on this archive's units (cached in the chunk folder so a resumed run reuses it).

    Returns:
        {"state": the adapted BatchNorm state dict (CPU tensors), "n_images", "n_layers"}; the
        state is loaded into ``pkg.model``.
    """
    path = folder / "adabn.pt"
    if path.exists():
        saved = load_tensors(path, "AdaBN state", f"delete {path}; it is re-estimated on the next run")
    else:
        loader = DataLoader(
            UnitDataset([u["path"] for u in units], pkg.spec),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate_units,
        )
        batches = (
            torch.stack([x for _, x, _, _ in items if x is not None])
            for items in loader
            if any(x is not None for _, x, _, _ in items)
        )
        n_images, n_layers = adapt_batchnorm(pkg.model, batches, device)
        names = {n for n, m in pkg.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        state = {k: v.cpu() for k, v in pkg.model.state_dict().items() if k.rsplit(".", 1)[0] in names}
        saved = {"state": state, "n_images": n_images, "n_layers": n_layers}
        buf = io.BytesIO()
        torch.save(saved, buf)
        write_bytes(path, buf.getvalue())
    pkg.model.load_state_dict(saved["state"], strict=False)
    return {"state": saved["state"], "n_images": int(saved["n_images"]), "n_layers": int(saved["n_layers"])}
