"""Step `start-tracking`: the flow run's MLflow run, with the whole config as params.

Reads every params section (logged as params). Output: the MLflow run id, which later steps log
into: created once per Prefect flow run and reopened when Prefect retries it. When the flow run
fails or crashes, `fail_tracking` marks its MLflow run FAILED, so none looks finished.
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_link_artifact
from prefect.runtime import flow_run

from chat_doctor.config import Config, flatten, redact
from chat_doctor.core.logs import get_logger
from chat_doctor.tracking.mlflow_runs import fail_runs_of, git_commit, reopen_run, run_link, start_run, tracking_uri

logger = get_logger(__name__)


def run_start_tracking(
    cfg: Config, flow_run_id: str, flow_run_name: str, extra_tags: dict[str, str] | None = None
) -> str:
    """`extra_tags`: e.g. a sweep's (`mlflow.parentRunId` nests the run under the sweep's in the MLflow UI)."""
    tags = {"git_commit": git_commit(), "prefect.flow_run_id": flow_run_id, "base_model": cfg.model.base}
    tags.update(extra_tags or {})
    run_id = reopen_run(flow_run_id) or start_run(cfg.registry.experiment, flow_run_name, flatten(cfg), tags)
    logger.info("MLflow run %s at %s", run_id, redact(tracking_uri()))  # a server URL may carry a password
    return run_id


@task(name="start-tracking")
def start_tracking(cfg: Config, tags: dict[str, str] | None = None) -> str:
    """The flow run's MLflow run: created once, reopened when Prefect retries the flow run."""
    run_id = run_start_tracking(cfg, str(flow_run.id), str(flow_run.name), tags)
    create_link_artifact(
        key="mlflow-run",
        link=run_link(run_id),
        link_text=f"MLflow run {run_id}",
        description="Params, metrics per step and the registered adapter (`make mlflow-ui` serves the local store)",
    )
    return run_id


def fail_tracking(flow, flow_run, state) -> None:  # a flow's on_failure / on_crashed hook: Prefect passes these
    fail_runs_of(str(flow_run.id))
