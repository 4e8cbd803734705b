"""Small exception hierarchy: every message says what failed, where, expected vs actual, and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MedxferError(Exception):
    """Base class. `exit_code` is what the CLI returns: 2 usage/config, 1 data."""

    exit_code = 1


class ConfigError(MedxferError):
    """A config file, CLI argument or option value is wrong (exit 2)."""

    exit_code = 2


class DataError(MedxferError):
    """Input data is missing, unreadable or inconsistent (exit 1)."""

    exit_code = 1


class WeightsNotFoundError(ConfigError):
    """Pretrained weights could not be resolved from local files."""


class BusyError(MedxferError):
    """Another process is writing the same manifest folder or score output (exit 1; see `io.exclusive`)."""

    exit_code = 1


class TrackingError(MedxferError):
    """The MLflow tracking store cannot be reached or used."""

    exit_code = 1


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
