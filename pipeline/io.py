"""Writing files: atomic writes (the one way medxfer writes a file), JSON-safe values, content fingerprints.

A crash, ``kill -9`` or full disk never leaves half a file under the target name: readers see the
old file or the new one. The fsync policy lives here and nowhere else:

* ``durable=True`` (results, manifests, checkpoints, reports): the temp file's data is fsynced
  before the rename, so a power cut cannot leave a renamed but empty file.
* ``durable=False`` (caches that are recomputed when missing or unreadable): rename only.

Temp files are named ``.<name>.tmp-<pid>-<random>`` so that `is_temp` recognises leftovers of a
killed writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import DataError

if TYPE_CHECKING:
    from torch import nn

TEMP_MARK = ".tmp-"


def is_temp(path: str | Path) -> bool:
    """True for a temp file left by `atomic_path` (a writer killed before its rename)."""
    name = Path(path).name
    return name.startswith(".") and TEMP_MARK in name


@contextlib.contextmanager
def atomic_path(path: str | Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path beside `path` to write to; rename it over `path` when the block succeeds.

    The parent folder is created. When the block raises, the temp file is removed and `path` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str, *, durable: bool = True) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"), durable=durable)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays to Python, tuples to lists, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def state_sha256(module: nn.Module) -> str:
    """Hex sha256 of a module's state dict (every name and tensor, in order): its weights' identity."""
    import torch  # torch is heavy; only callers that hold a module pay for it

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_tensors(path: str | Path, what: str, fix: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU: tensors and plain values only, never code.

    Every torch file medxfer reads goes through here. A file that holds other Python objects (a
    pickle whose loading would run code) or is not a torch file at all is refused unread.

    Args:
        path: the file. what: what it should be, for the message ("training checkpoint").
        fix: the message's "Fix: ..." sentence.

    Raises:
        DataError: naming the file, what it should be and the fix.
    """
    import pickle
    import re
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a foreign file
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", str(exc), re.S)
        why = found.group(1).strip()[:200] if found else type(exc).__name__
        if "global" in why.lower():  # it names a class or function to call: what a code payload does
            raise DataError(
                f"{path}: not a {what}: it holds Python objects other than tensors ({why}); medxfer reads "
                f"tensors only, so nothing in it was loaded or run. Fix: {fix}"
            ) from exc
        raise DataError(f"{path}: not a readable {what} ({why}); nothing in it was loaded or run. Fix: {fix}") from exc
    except Exception as exc:  # zip/EOF/format errors: the same to the user
        raise DataError(f"{path}: not a readable {what} ({type(exc).__name__}: {str(exc)[:200]}). Fix: {fix}") from exc
