"""A task for process-pool tests, in a module light enough for spawned workers to import quickly."""

from __future__ import annotations

import os


def twice_or_die(value: int, fatal: int) -> int:
    """2 × value; the worker process dies (as when killed for memory, or a codec aborts) on `fatal`."""
    if value == fatal:
        os._exit(3)
    return 2 * value
