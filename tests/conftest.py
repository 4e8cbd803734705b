"""Shared fixtures: one small end-to-end demo run per test session (real DICOM, MONAI, MLflow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _quiet_threads():
    """Two CPU cores: keep torch from oversubscribing them."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> dict:
    """`medxfer demo` on a small cohort, run once: {"root", "run_id", "metrics", "report", "uri"}.

    Uses the real pipeline end to end (synthetic DICOM → ingest → prepare → ImageNet backbone →
    linear probe → temperature scaling → MLflow sqlite store → registered model → HTML report).
    """
    from pipeline.run import demo

    root = tmp_path_factory.mktemp("demo")
    result = demo(root, n=120, seed=1)
    result["root"] = Path(root)
    result["uri"] = f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"
    return result


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
