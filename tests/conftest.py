"""Shared fixtures: one small end-to-end demo run per test session (real DICOM, MONAI, MLflow)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _quiet_threads():
    """Two CPU cores: keep torch from oversubscribing them."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> dict:
    """`medxfer demo` on a small cohort, run once: {"root", "run_id", "metrics", "report", "uri", "stdout", "log"}.

    Uses the real pipeline end to end (synthetic DICOM → ingest → prepare → ImageNet backbone →
    linear probe → temperature scaling → MLflow sqlite store → registered model → HTML report).
    """
    from pipeline import tracking
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("demo")
    printed, logged, logger = io.StringIO(), logging.StreamHandler(io.StringIO()), logging.getLogger("medxfer")
    level = logger.level
    logger.addHandler(logged)  # the console lines the CLI logs (stderr)
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(printed):  # the CLI, as the README's Quick start runs it
            assert main(["demo", "--out", str(root), "--n", "120", "--seed", "1"]) == 0
    finally:
        logger.removeHandler(logged)
        logger.setLevel(level)
    stdout = printed.getvalue()
    sys.stdout.write(stdout)
    uri = f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"
    run_id = re.search(r"\(run ([0-9a-f]{32})\)", stdout).group(1)
    tracking.connect(uri, existing=True)
    metrics = tracking.get_run(run_id)["metrics"]
    report = str(root / "report.html")
    return {
        "root": Path(root),
        "run_id": run_id,
        "metrics": metrics,
        "report": report,
        "uri": uri,
        "stdout": stdout,
        "log": logged.stream.getvalue(),
    }


# A fixed pseudonym key for tests whose small cohorts need both classes in every split: splits
# are keyed hashes, so a fresh random key would make such a fixture fail now and then.
TEST_KEY_HEX = "5a" * 32


def fixed_key(path: str | Path) -> Path:
    """Write the fixed test key (mode 0600) at `path` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TEST_KEY_HEX + "\n")
    os.chmod(path, 0o600)
    return path
