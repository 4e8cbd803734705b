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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int, wait_s: float = 90):
    """A real `mlflow server` (sqlite backend under `root`, local artifacts) on 127.0.0.1:`port`; returns the process.

    The same `root` and `port` restart the same server. Fails the test when it does not come up.
    It runs in a session of its own: `stop_mlflow_server` ends it with its worker processes.
    """
    import socket
    import subprocess
    import time

    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += [
        "--backend-store-uri",
        f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    proc = subprocess.Popen(
        [*cmd, "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + wait_s
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                pytest.fail("mlflow server exited at start")
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"mlflow server did not start within {wait_s:.0f} s")


def stop_mlflow_server(proc, kill: bool = False) -> None:
    """End a `start_mlflow_server` process and its workers (SIGKILL with `kill`: a crash, nothing flushed)."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
    proc.wait(timeout=30)


def disc_cohort(root: Path, experiment: str, finetune: dict, uri: str, n: int = 20) -> dict:
    """A small 2D NIfTI cohort under `root` (label 1 carries a bright disc; one folder per patient) and its config.

    Returns the raw config dict: a scratch tf_efficientnet_lite0 at 32 px with `finetune` and the store `uri`.
    """
    import numpy as np
    from dicom_factory import write_nifti

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    disc = ((yy - 20) ** 2 + (xx - 20) ** 2 < 64).astype(np.float32)
    rows = ["patient_id,label"]
    for i in range(n):
        image = rng.normal(100, 20, (40, 40)).astype(np.float32) + 120 * (i % 2) * disc
        write_nifti(root / "archive" / f"p{i:02d}" / "cxr.nii", image, np.eye(4))
        rows.append(f"p{i:02d},{i % 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return {
        "experiment": experiment,
        "data": {
            "source": str(root / "archive"),
            "labels": str(root / "labels.csv"),
            "manifest": str(root / "manifest"),
            "key_file": str(fixed_key(root / "key")),
            "split": {"val": 0.3, "test": 0.2, "seed": 0},
        },
        "prepare": {"dims": "2d", "preset": "xray", "size": [32, 32], "cache_dir": str(root / "cache")},
        "model": {"backbone": "tf_efficientnet_lite0", "weights": "none", "in_channels": 1},
        "finetune": finetune,
        "tracking": {"uri": uri},
    }
