"""Tracking faults: a server that accepts connections but never answers, and a real server killed mid-training."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import disc_cohort, free_port, start_mlflow_server, stop_mlflow_server

from pipeline import tracking
from pipeline.cli import main
from pipeline.errors import TrackingError


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


def test_a_server_that_never_answers_fails_at_connect_in_seconds(silent_server):
    start = time.monotonic()
    with pytest.raises(TrackingError, match=r"accepts connections but did not answer within 5 s; nothing was started"):
        tracking.connect(silent_server)
    assert time.monotonic() - start < 30  # the probe's 5 s, not urllib3's 120 s x 7 retries


def test_a_command_against_a_silent_server_exits_1_with_the_fix(silent_server, tmp_path, capsys):
    assert main(["report", "--run", "0" * 32, "--tracking-uri", silent_server, "--out", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err
    assert f"MLflow server {silent_server} accepts connections but did not answer" in err and "Fix:" in err
    assert "Traceback" not in err and not (tmp_path / "r.html").exists()


def test_a_server_lost_inside_a_run_becomes_a_tracking_error_with_the_hint(tmp_path, monkeypatch):
    """Real server, killed while a run is open: the next call fails as a TrackingError naming run and hint."""
    port = free_port()
    proc = start_mlflow_server(tmp_path, port)
    for name in tracking.SERVER_BUDGET:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "45")  # a user's own setting is kept
    tracking.connect(f"http://127.0.0.1:{port}")
    # the retry budget: seconds per failing request, not MLflow's minutes
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "45"
    assert (os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]) == (
        "2",
        "1",
    )
    try:
        run = tracking.start_run("lost", on_lost=lambda run_id: f"kept here: {run_id}")
        with pytest.raises(TrackingError, match=r"stopped answering during run (\w+) .*kept here: \1") as caught:  # noqa: PT012
            with run as run_id:
                tracking.log_metrics({"a": 1.0}, step=1)
                stop_mlflow_server(proc, kill=True)
                tracking.log_metrics({"a": 2.0}, step=2)
        assert run_id in str(caught.value)
        assert tracking.server_lost(ValueError("x")) is None  # other errors pass through unchanged
    finally:
        if proc.poll() is None:
            stop_mlflow_server(proc, kill=True)


# --- a real `medxfer train` against a real server that is killed between epochs ---------------------


def _steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "epoch_seconds"))


@pytest.mark.slow  # two subprocess trainings of a small scratch EfficientNet and two server starts (~1-2 min)
def test_a_server_killed_mid_training_keeps_the_checkpoint_and_the_printed_resume_works(tmp_path):
    from mlflow.tracking import MlflowClient

    port, server_root = free_port(), tmp_path / "server"
    server_root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    config = tmp_path / "config.yaml"
    finetune = {
        "strategy": "finetune",
        "epochs": 40,
        "batch_size": 4,
        "lr": 1e-3,
        "device": "cpu",
        "early_stopping": {"metric": "val_loss", "patience": 40},
    }
    raw = disc_cohort(tmp_path, "killed-server", finetune, uri)
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    server = start_mlflow_server(server_root, port)
    train = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        tracking.connect(uri)
        client, run_id, deadline = MlflowClient(), None, time.time() + 300
        while time.time() < deadline and train.poll() is None:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            run_id = runs[0].info.run_id if runs else None
            if run_id and len(_steps(client, run_id)) >= 2:
                break
            time.sleep(0.2)
        assert run_id and train.poll() is None, "training ended before two epochs were logged"
        stop_mlflow_server(server, kill=True)
        _, err = train.communicate(timeout=180)  # fails in seconds, not urllib3's minutes
    finally:
        if train.poll() is None:
            train.kill()
        if server.poll() is None:
            stop_mlflow_server(server, kill=True)
    assert train.returncode == 1, err
    assert f"the MLflow server {uri} stopped answering during run {run_id}" in err and "Traceback" not in err
    ckpt = tmp_path / "manifest" / "checkpoints" / f"{run_id}.pt"
    assert ckpt.is_file() and f"The training state of the last finished epoch is kept at {ckpt}" in err
    printed = re.search(r"medxfer (train \S+ --resume \w+)", err).group(1)
    assert printed == f"train {shlex.quote(str(config))} --resume {run_id}"

    server = start_mlflow_server(server_root, port)  # the same store, restarted
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "-q", *shlex.split(printed)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == run_id
        tracking.connect(uri)
        run = tracking.get_run(run_id)
        assert run["status"] == "FINISHED" and int(run["tags"]["resumed_at_epoch"]) >= 2
        steps = _steps(MlflowClient(), run_id)
        assert steps == list(range(1, len(steps) + 1)) and len(steps) == int(run["metrics"]["epochs_run"])
        assert not ckpt.exists()  # removed once training is logged
    finally:
        stop_mlflow_server(server)
