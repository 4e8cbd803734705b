"""Writing files: atomic writes (the one way medxfer writes a file), JSON-safe values, content fingerprints.

A crash, ``kill -9`` or full disk never leaves half a file under the target name: readers see the
old file or the new one. The fsync policy lives here and nowhere else:

* ``durable=True`` (results, manifests, checkpoints, reports): the temp file's data is fsynced
  before the rename, so a power cut cannot leave a renamed but empty file.
* ``durable=False`` (caches that are recomputed when missing or unreadable): rename only.

Temp files are named ``.<name>.tmp-<pid>-<random>`` so that `is_temp` recognises leftovers of a
killed writer.

One writer per output folder: `exclusive` holds an ``fcntl.flock`` on a lock file and refuses at
once (BusyError naming the holder's PID) when another process holds it. The kernel releases a
flock when its holder exits, ``kill -9`` included, so a lock left by a killed run is simply taken
by the next one; the PID written into the lock file is for the message only, and the file is never
removed (a remover could let two writers lock two different files). On NFS, Linux maps flock to
byte-range locks shared through the NFS lock manager.

A full disk (ENOSPC, EDQUOT) is recognised by `is_disk_full` and explained by `disk_full_message`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import BusyError, DataError, MedxferError

if TYPE_CHECKING:
    from torch import nn

TEMP_MARK = ".tmp-"
LOCK_NAME = ".medxfer.lock"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


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


@contextlib.contextmanager
def exclusive(lock_file: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created, with its folder, if missing) for the block.

    Args:
        lock_file: The lock file, e.g. ``<manifest>/.medxfer.lock`` (`LOCK_NAME`).
        what: What it protects, for the message, e.g. "manifest folder /data/m".

    Raises:
        BusyError: At once (no waiting) when another process holds the lock; the message names
            the PID and host the holder wrote into the lock file.
        MedxferError: When the filesystem supports no locks.
    """
    path = Path(lock_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise BusyError(_busy_message(fd, path, what)) from exc
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            raise MedxferError(
                f"cannot lock {path} ({os.strerror(exc.errno)}): the filesystem of the {what} supports no file "
                "locks, so two runs could overwrite each other there. Fix: write it to a local disk or to an NFS "
                "mount with locking enabled"
            ) from exc
        holder = f"PID {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
        with contextlib.suppress(OSError):  # on a full disk the lock holds without its note
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder + "\n").encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no stale PID for the next reader
    finally:
        os.close(fd)  # releases the lock


def _busy_message(fd: int, path: Path, what: str) -> str:
    try:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        holder = ""
    who = f"another medxfer process ({holder})" if holder else "another medxfer process (its PID is not written yet)"
    return (
        f"the {what} is in use by {who}; two runs writing it at once overwrite each other's files (manifest "
        "rows end up pointing at deleted images), so this run stops before writing anything. Fix: wait for that "
        "run to finish (or stop it), or write to another folder. A killed run releases its lock by itself: "
        f"{path.name} needs no deleting"
    )


def is_disk_full(exc: BaseException) -> bool:
    """True for an OSError that says the disk or the user's quota is full (ENOSPC, EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def free_bytes(folder: str | Path) -> int | None:
    """Free bytes on the filesystem of `folder` (or of its nearest existing parent); None when unknown."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def megabytes(n: int) -> str:
    """Bytes as "12.3 MB" (MB = 10^6 bytes, as df -H and file managers show)."""
    return f"{n / 1e6:.1f} MB"


def disk_full_message(
    what: str, folder: str | Path, exc: OSError, need: str = "", done: str = "", free_then: int | None = None
) -> str:
    """One paragraph for a full disk: what stopped, which folder, free (and needed) space, what was undone, the fix.

    Args:
        what: The command, e.g. "ingest".
        folder: The output folder being written.
        exc: The OSError (ENOSPC or EDQUOT).
        need: How much space the run needs, when known, e.g. "its 40.2 MB of images need as much".
        done: What was cleaned up and what is intact, e.g. "The 12 images this run wrote were removed."
        free_then: Free bytes when the write failed (measured before any clean-up), when known.
    """
    free = free_bytes(folder) if Path(folder).is_absolute() else None
    space = "free space unknown" if free is None else f"{megabytes(free)} free there now"
    if free_then is not None and free is not None and free != free_then:
        space = f"{megabytes(free_then)} free when it stopped, {megabytes(free)} after the clean-up"
    if need:
        space += f"; {need}"
    cause = "the disk quota is used up" if exc.errno == errno.EDQUOT else "the disk is full"
    return (
        f"{what} stopped: {cause} where it writes {folder} ({space}). {done + ' ' if done else ''}"
        "Fix: free space on that disk (or raise the quota), or write to a disk with room (another --out), "
        "then run the same command again"
    )


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
