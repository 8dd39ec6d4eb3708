"""MLflow helpers: one run per flow run; steps log into it by run id.

Default store: `sqlite:///mlflow.db` at the project root with artifacts in `mlartifacts/` beside it;
any tracking server through `MLFLOW_TRACKING_URI`. Browse with `mlflow ui --backend-store-uri
sqlite:///mlflow.db`.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from chat_doctor.core.files import file_lock

DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
_READY: set[str] = set()  # stores this process has opened


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def local_store(uri: str) -> Path | None:
    """The sqlite file of a local tracking store, or None for a tracking server."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def client():
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    store = local_store(uri)
    if store is None or uri in _READY:
        return mlflow.MlflowClient(uri)
    # Opening a sqlite store creates or migrates its tables (tracking and registry): two processes
    # doing it at once fail ("duplicate column name"), so the first opening in each process takes turns.
    with file_lock(store.with_name(store.name + ".open-lock")):
        mlflow_client = mlflow.MlflowClient(uri)
        mlflow_client.search_experiments(max_results=1)
        mlflow_client.search_registered_models(max_results=1)
    _READY.add(uri)
    return mlflow_client


def experiment_id(name: str) -> str:
    """The experiment's id, created with its artifacts beside the local store when it is new."""
    mlflow_client = client()
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = (Path.cwd() / ARTIFACTS_DIR).as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    """HEAD's commit, with `-dirty` when tracked files have uncommitted changes; `unknown` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.strip() + ("-dirty" if dirty.strip() else "")


def start_run(experiment: str, run_name: str, params: dict, tags: dict) -> str:
    """Create the flow run's MLflow run with the whole config as params; return its id."""
    from mlflow.entities import Param

    mlflow_client = client()
    run = mlflow_client.create_run(experiment_id(experiment), run_name=run_name, tags=tags)
    items = [Param(key, str(value)) for key, value in sorted(params.items())]
    for start in range(0, len(items), 100):  # the store takes at most 100 params a batch
        mlflow_client.log_batch(run.info.run_id, params=items[start : start + 100])
    mlflow_client.set_tag(run.info.run_id, "mlflow.source.git.commit", tags.get("git_commit", "unknown"))
    return run.info.run_id


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(key, float(value), now, step or 0) for key, value in metrics.items()])


def set_tags(run_id: str, tags: dict) -> None:
    from mlflow.entities import RunTag

    client().log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def run_link(run_id: str) -> str:
    """Where the run shows in the MLflow UI (a local store is served by `mlflow ui` on port 5000)."""
    base = tracking_uri() if tracking_uri().startswith("http") else "http://127.0.0.1:5000"
    run = client().get_run(run_id)
    return f"{base.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def log_artifact(run_id: str, path: str, artifact_path: str) -> None:
    client().log_artifact(run_id, path, artifact_path)


def log_table(run_id: str, rows: list[dict], artifact_file: str) -> None:
    """Rows as an MLflow table (shown in the run's Artifacts and Evaluation views)."""
    columns = {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
    client().log_table(run_id, data=columns, artifact_file=artifact_file)


def run_tags(run_id: str) -> dict[str, str]:
    return client().get_run(run_id).data.tags


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


def _runs_of(flow_run_id: str, status: str | None = None) -> list:
    mlflow_client = client()
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    query = f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    if status:
        query += f" and attributes.status = '{status}'"
    return mlflow_client.search_runs(experiments, filter_string=query)


def reopen_run(flow_run_id: str) -> str | None:
    """The MLflow run of an earlier attempt of this Prefect flow run, set RUNNING again; None if none."""
    runs = _runs_of(flow_run_id)
    if not runs:
        return None
    client().update_run(runs[0].info.run_id, status="RUNNING")
    return runs[0].info.run_id


def run_of_flow_run(flow_run_id: str) -> str | None:
    """The MLflow run of a Prefect flow run, or None."""
    runs = _runs_of(flow_run_id)
    return runs[0].info.run_id if runs else None


def fail_runs_of(flow_run_id: str) -> None:
    """Mark the MLflow runs of a failed Prefect flow run FAILED, so none looks finished."""
    for run in _runs_of(flow_run_id, status="RUNNING"):
        client().set_terminated(run.info.run_id, status="FAILED")


@contextmanager
def system_metrics(run_id: str | None, node: int | None = None) -> Iterator[None]:
    """MLflow's CPU/GPU/memory sampler (`system/*`, every 5 s) on the run while the block runs;
    `node` names the machine in a multi-node run. The run stays RUNNING: the flow's later steps end it."""
    if not run_id:
        yield
        return
    import mlflow

    client()  # sets the tracking URI
    mlflow.set_system_metrics_sampling_interval(5)
    mlflow.set_system_metrics_node_id(None if node is None else f"node-{node}")
    mlflow.start_run(run_id=run_id, log_system_metrics=True)
    try:
        yield
    finally:
        mlflow.end_run(status="RUNNING")
