"""MLflow tracking: the only module that imports mlflow. Store checks, runs, metrics, models."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel as PythonModel  # the base of the pyfunc flavour's model class
from mlflow.tracking import MlflowClient

from pipeline.errors import DataError, TrackingError

DEFAULT_URI = "sqlite:///mlflow.db"
PROBE_TIMEOUT_S = 5.0
# A server that stops answering fails a request in about a minute, not MLflow's default ~15 (120 s x 7
# retries with backoff); the environment's own values win. Each attempt waits at most the timeout.
SERVER_BUDGET = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
log = logging.getLogger("medxfer")


def resolve_uri(uri: str | None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def connect(uri: str | None, existing: bool = False) -> str:
    """Point MLflow at `uri` and fail fast (before any training) when it cannot be used.

    Args:
        uri: the tracking URI (None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).
        existing: the command only reads the store (score, report, compare): a sqlite file that
            does not exist is an error naming it, and is not created as a side effect.
    """
    uri = resolve_uri(uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        host, port = parsed.hostname or "localhost", parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=3).close()
        except OSError as exc:
            raise TrackingError(
                f"MLflow server {uri} is unreachable ({exc.strerror or exc}); start it "
                f"(`mlflow server --host {host} --port {port}`) or set tracking.uri to a sqlite file, "
                "e.g. sqlite:///mlflow.db"
            ) from exc
        _probe(uri)
        for name, value in SERVER_BUDGET.items():
            os.environ.setdefault(name, value)
    elif parsed.scheme == "sqlite":
        db = Path(uri.replace("sqlite:///", "", 1))
        if not db.parent.exists():
            raise TrackingError(f"tracking.uri {uri}: folder {db.parent} does not exist; create it or change the URI")
        if existing and not db.is_file():
            raise TrackingError(
                f"there is no MLflow store at {db.resolve()} (tracking URI {uri}); nothing was created. "
                "Fix: name the store that holds the run or model with --tracking-uri (the demo's is "
                "--tracking-uri sqlite:///medxfer-demo/mlflow.db) or set MLFLOW_TRACKING_URI"
            )
    mlflow.set_tracking_uri(uri)
    return uri


def current_uri() -> str:
    return mlflow.get_tracking_uri()


def _probe(uri: str) -> None:
    """Fail in seconds when a server accepts connections but does not answer HTTP (stuck, wrong service)."""
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answered (an auth proxy, an older server without /health): MLflow's own errors say more
    except (TimeoutError, urllib.error.URLError) as exc:
        reason = getattr(exc, "reason", exc)
        if not isinstance(reason, TimeoutError):
            return  # TLS or proxy trouble: the server answered something; MLflow reports it
        raise TrackingError(
            f"MLflow server {uri} accepts connections but did not answer within {PROBE_TIMEOUT_S:.0f} s; "
            "nothing was started. Fix: check that the server is an MLflow server and not stuck "
            "(restart it), or set tracking.uri to a sqlite file, e.g. sqlite:///mlflow.db"
        ) from exc


def server_lost(exc: BaseException) -> str | None:
    """The reason, when `exc` is MLflow or requests giving up on an unreachable or silent server."""
    import requests

    if isinstance(exc, requests.exceptions.RequestException):
        return type(exc).__name__
    if isinstance(exc, mlflow.exceptions.MlflowException) and str(exc).startswith("API request to"):
        cause = exc.__cause__ or exc.__context__
        return type(cause).__name__ if cause is not None else "no answer"
    return None


@contextmanager
def start_run(
    experiment: str,
    run_name: str | None = None,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    on_lost: Callable[[str], str] | None = None,
) -> Iterator[str]:
    """Start (or resume, with `run_id`) a run in `experiment`; yields the run id.

    The run ends FINISHED, or FAILED when the body raises. When the tracking server stops answering
    inside the body, the error becomes a TrackingError that says so, followed by `on_lost(run_id)`
    (what was kept locally and how to go on); ending the run is then tried once and may leave it
    RUNNING on the server, which `--resume` accepts.
    """
    if run_id is None:
        _ensure_experiment(experiment)
    run = mlflow.start_run(run_id=run_id, run_name=run_name, tags=tags)
    try:
        yield run.info.run_id
    except BaseException as exc:
        try:
            mlflow.end_run("FAILED")
        except Exception as end_exc:  # the server is gone: the run stays RUNNING there
            log.debug("could not mark run %s FAILED: %s", run.info.run_id, end_exc)
        lost = server_lost(exc)
        if lost is None:
            raise
        hint = f" {on_lost(run.info.run_id)}" if on_lost else ""
        raise TrackingError(
            f"the MLflow server {mlflow.get_tracking_uri()} stopped answering during run {run.info.run_id} "
            f"({lost}).{hint}"
        ) from exc
    mlflow.end_run()


def _ensure_experiment(name: str) -> None:
    """Create the experiment on first use; with a sqlite store, artifacts go next to the database."""
    uri = mlflow.get_tracking_uri()
    if mlflow.get_experiment_by_name(name) is None and uri.startswith("sqlite:///"):
        root = Path(uri.replace("sqlite:///", "", 1)).resolve().parent / "mlartifacts"
        mlflow.create_experiment(name, artifact_location=root.as_uri())
    mlflow.set_experiment(name)


def log_params(params: dict[str, Any]) -> None:
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    clean = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
    mlflow.log_metrics(clean, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_artifacts(folder: str | Path, artifact_path: str | None = None) -> None:
    """Log every file of `folder` under `artifact_path`."""
    mlflow.log_artifacts(str(folder), artifact_path=artifact_path)


def log_json(obj: Any, artifact_file: str) -> None:
    mlflow.log_dict(obj, artifact_file)


def log_figure(fig: Any, artifact_file: str) -> None:
    mlflow.log_figure(fig, artifact_file)


SHA256_TAG = "medxfer_sha256"  # on a logged model and its registered versions: the package files' sha256
PACKAGE = "package"  # the pyfunc artifact holding the medxfer package (model.json + weights.safetensors)


def log_model(
    package: str | Path,
    code: str | Path,
    input_example: np.ndarray,
    output_example: np.ndarray,
    metadata: dict[str, Any],
    sha256: dict[str, str],
    register_as: str | None = None,
) -> dict[str, Any]:
    """Log a medxfer model package as an MLflow pyfunc model ("models from code": nothing pickled) and register it.

    The pyfunc's only artifact is the package folder (`pipeline.adapt.package`); `code` is the
    model's code file (`pipeline.run.packaging.PYFUNC_CODE`), which rebuilds the network from that
    package when `mlflow.pyfunc.load_model` runs it. `sha256` (what `write_package` returned) is
    recorded as the tag `SHA256_TAG` of the logged model and of the registered version, in the
    tracking store, where `download_model` reads it back.

    Returns:
        {"model_uri", "registered_name", "version"}.
    """
    signature = mlflow.models.infer_signature(input_example, output_example)
    record = json.dumps(sha256, sort_keys=True)
    with warnings.catch_warnings():  # the signature comes from the example, not from type hints
        warnings.filterwarnings("ignore", message=r".*[Tt]ype hint", category=UserWarning)
        info = _log_pyfunc(package, code, input_example, signature, metadata, record)
    out: dict[str, Any] = {"model_uri": info.model_uri, "registered_name": None, "version": None}
    if register_as:
        version = mlflow.register_model(info.model_uri, register_as, tags={SHA256_TAG: record})
        out.update(registered_name=register_as, version=version.version)
    return out


def _log_pyfunc(
    package: str | Path, code: str | Path, example: np.ndarray, signature: Any, metadata: dict[str, Any], record: str
) -> Any:
    """`mlflow.pyfunc.log_model` from code: the code file, the package as its artifact, the record as a tag."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(code),
        artifacts={PACKAGE: str(package)},
        signature=signature,
        input_example=example,
        metadata={"medxfer": metadata},
        pip_requirements=_requirements(),
        tags={SHA256_TAG: record},
    )


def set_pyfunc_model(model: PythonModel) -> None:
    """Declare the model of an MLflow "models from code" file (`mlflow.models.set_model`)."""
    mlflow.models.set_model(model)


def _requirements() -> list[str]:
    """Pinned requirements for the logged model (avoids MLflow's slow dependency inference)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "timm", "mlflow", "numpy", "safetensors")]


def download_model(model_uri: str, dst: str | Path) -> tuple[Path, str | None, str]:
    """Download the medxfer package of a logged model, and read its sha256 record from the tracking store.

    Nothing downloaded is loaded or run here. The record comes from the tracking store, never from
    the artifacts: the registered version's tag `SHA256_TAG` (``models:/NAME/VERSION``, ``latest``,
    ``@alias``), else its logged model's; the logged model's (``models:/m-ID``, ``runs:/ID/model``).

    Args:
        model_uri: ``models:/NAME/VERSION|latest``, ``models:/NAME@alias``, ``models:/m-ID``,
            ``runs:/RUN_ID/model`` or a local folder (an MLflow model folder or a package folder).
        dst: an empty folder the caller owns (and removes).

    Returns:
        (the package folder, the record: a JSON object of sha256 per file, or None for a local
        folder, which has no record; where the record came from, for messages).

    Raises:
        TrackingError: the URI cannot be resolved or downloaded.
        DataError: the model holds no medxfer package, or the store holds no record of it.
    """
    if "://" not in model_uri and ":/" not in model_uri:  # a local folder
        root = Path(model_uri)
        folder = root if (root / "model.json").is_file() else root / "artifacts" / PACKAGE
        return _package_folder(folder, model_uri), None, f"no record (local folder {model_uri})"
    try:
        record, source, uri = _record(model_uri)
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except (TrackingError, DataError):
        raise
    except Exception as exc:  # MlflowException, OSError: name the URI and the fix
        raise TrackingError(
            f"cannot load model {model_uri}: {exc}. Use models:/NAME/VERSION, "
            "models:/NAME/latest, runs:/RUN_ID/model or a local model folder"
        ) from exc
    if record is None:
        raise DataError(
            f"model {model_uri} has no {SHA256_TAG} record in the tracking store ({source}), so its files "
            "cannot be verified and are not loaded. Fix: score a model packaged by `medxfer evaluate`, "
            "or evaluate the run again to package and register it"
        )
    return _package_folder(root / "artifacts" / PACKAGE, model_uri), record, source


def _package_folder(folder: Path, model_uri: str) -> Path:
    if not (folder / "model.json").is_file():
        raise DataError(
            f"model {model_uri} holds no medxfer package ({folder.name}/model.json): it is not a model packaged "
            "by `medxfer evaluate`, or one an earlier medxfer packaged as a pickle, which medxfer no longer "
            "loads (unpickling runs code). Fix: evaluate the training run again to package it as data"
        )
    return folder


def _record(model_uri: str) -> tuple[str | None, str, str]:
    """(the sha256 record, where it came from, the URI to download) of a model URI."""
    client = MlflowClient()
    if model_uri.startswith("runs:/"):
        run_id = model_uri[len("runs:/") :].split("/")[0]
        info = mlflow.models.get_model_info(model_uri)  # the MLmodel file names its logged model ...
        logged = client.get_logged_model(info.model_id) if info.model_id else None
        if logged is None or logged.source_run_id != run_id:  # ... which must be this run's
            return None, f"run {run_id}", model_uri
        return logged.tags.get(SHA256_TAG), f"tag {SHA256_TAG} of logged model {logged.model_id}", model_uri
    if not model_uri.startswith("models:/"):
        return None, f"no logged model (URI {model_uri})", model_uri
    rest = model_uri[len("models:/") :].rstrip("/")
    if rest.startswith("m-") and "/" not in rest:
        logged = client.get_logged_model(rest)
        return logged.tags.get(SHA256_TAG), f"tag {SHA256_TAG} of logged model {rest}", model_uri
    name, _, version = rest.partition("/")
    if "@" in name:
        name, _, alias = name.partition("@")
        mv = client.get_model_version_by_alias(name, alias)
    elif version in ("", "latest"):
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise TrackingError(f"registered model {name!r} has no versions in {mlflow.get_tracking_uri()}")
        mv = max(versions, key=lambda v: int(v.version))
    else:
        mv = client.get_model_version(name, version)
    source = f"tag {SHA256_TAG} of registered model {name} version {mv.version}"
    record = mv.tags.get(SHA256_TAG)
    if record is None and mv.model_id:  # registered by hand: the logged model's record
        record = client.get_logged_model(mv.model_id).tags.get(SHA256_TAG)
        source = f"tag {SHA256_TAG} of logged model {mv.model_id}"
    return record, source, f"models:/{name}/{mv.version}"


def check_registered(model_uri: str) -> None:
    """For ``models:/NAME/...``: fail with the store searched and the models it holds when NAME is not there.

    Raises:
        TrackingError: NAME is not a registered model of the current store.
    """
    if not model_uri.startswith("models:/"):
        return
    name = model_uri[len("models:/") :].split("/")[0].split("@")[0]
    try:
        names = sorted(m.name for m in MlflowClient().search_registered_models(max_results=1000))
    except Exception as exc:
        raise TrackingError(f"cannot list the registered models of {mlflow.get_tracking_uri()}: {exc}") from exc
    if name not in names:
        held = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "") if names else "none"
        raise TrackingError(
            f"no registered model {name!r} in the MLflow store {mlflow.get_tracking_uri()} "
            f"(registered models there: {held}). Fix: pass the store that holds it with --tracking-uri "
            "(or set MLFLOW_TRACKING_URI), or use one of the models listed"
        )


def get_run(run_id: str) -> dict[str, Any]:
    """Params, metrics, tags and the metric histories of a run (for the report)."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        raise TrackingError(f"run {run_id} not found in {mlflow.get_tracking_uri()}: {exc}") from exc
    history = {
        key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        for key in run.data.metrics
    }
    return {
        "run_id": run_id,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
        "history": history,
        "experiment_id": run.info.experiment_id,
        "artifact_uri": run.info.artifact_uri,
        "status": run.info.status,
    }


def download_artifacts(run_id: str, path: str, dst: str | Path) -> Path:
    """Download one artifact file or folder of a run into the folder `dst` (the caller owns and
    removes it: a default temporary folder left a 14 MB checkpoint behind per evaluation).

    Raises:
        TrackingError: the run or the artifact is not in the store.
    """
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))
    except Exception as exc:  # MlflowException, OSError: name the run and the artifact
        raise TrackingError(
            f"cannot download artifact {path} of run {run_id} from {mlflow.get_tracking_uri()}: {exc}. Fix: check "
            "the run id and --tracking-uri; an artifact removed from the store has to be re-created by re-running "
            "the command that logged it"
        ) from exc


def git_commit() -> str:
    """The current git commit of the working directory, or 'unknown'."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def search_runs(experiment_id: str, filter_string: str = "", max_results: int = 50) -> list[dict[str, Any]]:
    """Runs of one experiment matching an MLflow filter, newest first (for the report's baseline).

    Each run is a dict like `get_run` returns, without `history`; a bad filter or store raises
    TrackingError naming the filter.
    """
    try:
        runs = MlflowClient().search_runs(
            [experiment_id],
            filter_string=filter_string,
            max_results=max_results,
            order_by=["attributes.start_time DESC"],
        )
    except Exception as exc:
        raise TrackingError(f"cannot search experiment {experiment_id} with filter {filter_string!r}: {exc}") from exc
    return [
        {
            "run_id": r.info.run_id,
            "params": dict(r.data.params),
            "metrics": dict(r.data.metrics),
            "tags": dict(r.data.tags),
            "experiment_id": r.info.experiment_id,
            "status": r.info.status,
            "start_time": r.info.start_time,
            "artifact_uri": r.info.artifact_uri,
        }
        for r in runs
    ]


def experiment_name(experiment_id: str) -> str | None:
    """The name of an experiment, or None when it cannot be read."""
    try:
        return MlflowClient().get_experiment(experiment_id).name
    except Exception:  # a report must not fail for want of a label
        return None


def experiment_id(name: str) -> str | None:
    """The id of the experiment called `name`, or None when the store has none by that name."""
    found = mlflow.get_experiment_by_name(name)
    return found.experiment_id if found is not None else None


def set_run_tags(run_id: str, tags: dict[str, Any]) -> None:
    """Set tags on a run that need not be active (e.g. a study's child run after it ended)."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def list_artifacts(run_id: str, path: str | None = None) -> list[str]:
    """The artifact paths of a run directly under `path` (files and folders)."""
    return [f.path for f in MlflowClient().list_artifacts(run_id, path)]
