"""The `finetune/default` deployment, served as `make demo` serves it, run and retried with the
Prefect CLI, with overrides passed as a deployment parameter, logging to an MLflow tracking server.

One served deployment (faults armed: a SIGKILL mid-registration, once per run folder) for bad
parameters, a run killed mid-registration and a run whose tracking server dies during `register`,
each followed by `prefect flow-run retry`. The `full` tier adds a retry after a failed training
step, a SIGKILL mid-checkpoint and real rows as `evaluate.source`, each through a deployment."""

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from bench.processes import task_states
from chat_doctor.core import faults
from chat_doctor.tracking.mlflow_runs import tracking_uri
from tests.conftest import QUICK_EVAL, REAL_ROWS, data_folders, experiment_params, needs_real_rows, new_project
from tests.served import (
    MlflowServer,
    flow_run_id_of,
    flow_run_state,
    retry_and_wait,
    run_deployment,
    served_deployment,
    wait_until_final,
)

pytestmark = pytest.mark.slow
MODEL = "chat-doctor-adapter"
PLANTED = "hf_" + "Zq7" * 10  # shaped like a hub token; must never be echoed
QUICK = {"train.max_steps": 4, "train.save_steps": 2, "train.logging_steps": 1, **QUICK_EVAL}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_model_dir, prefect_server):
    """A project, its MLflow server and the served deployment: (project root, CLI env, server)."""
    root = new_project(tmp_path_factory.mktemp("deployment") / "project", tiny_model_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        server = MlflowServer(root)
        patch.setenv("MLFLOW_TRACKING_URI", server.url)
        patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not minutes
        patch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        server.start()
        try:
            with served_deployment(prefect_server, **faults.env(kill_in_register="after-version")) as env:
                yield root, env, server
        finally:
            server.kill()


@pytest.fixture
def deployed(deployment, monkeypatch):
    root, _, server = deployment
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    return deployment


def registry_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chat_doctor.serving.cli", *args], capture_output=True, text=True)


def aliases(client) -> dict[str, int]:
    return {alias: int(version) for alias, version in client.get_registered_model(MODEL).aliases.items()}


def versions(client) -> list[tuple[int, str]]:
    found = client.search_model_versions(f"name = '{MODEL}'")
    return sorted((int(v.version), v.tags.get("registration", "")) for v in found)


def mlflow_run_of(client, flow_run_id: str):
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    return run


def not_redone(flow_run_id: str) -> None:
    """After `prefect flow-run retry`: what finished the first time comes from Prefect's cache."""
    states = task_states(flow_run_id)
    assert states["data"] == "Cached", states
    assert (states["train"], states["merge"], states["evaluate"]) == ("Cached",) * 3, states
    assert states["register"] == "Completed"


# Bad deployment parameters are refused before training: tests/test_concurrency.py (make test).
# Full tier (make test ran 10:13 on a fresh clone with it). In make test: registration's all-or-nothing
# rollback (tests/test_model.py) and a failed step retried by Prefect (the shared run's OOM at step 7).
@pytest.mark.full
def test_registration_faults_are_cleaned_up_by_flow_run_retry(deployed, tmp_path):
    """A run with overrides, SIGKILLed between creating its version and completing it, then retried;
    then a second run whose MLflow server is killed while `register` runs, started again and retried.
    Each retry takes what finished from Prefect's cache and leaves one complete version, nothing
    half-written."""
    root, env, server = deployed
    source = tmp_path / "my_rows.jsonl"
    rows = (root / "data/raw/synthetic_healthcaremagic.jsonl").read_text().splitlines()[:120]
    source.write_text("\n".join(rows) + "\n")
    overrides = {"data.source": str(source), "data.rows": 100, **QUICK}
    client = mlflow.MlflowClient(tracking_uri())

    # 1. Killed mid-registration: the runner marks the run Crashed, the flow's hook fails its MLflow run.
    first = run_deployment(env, overrides)
    flow_run_id = flow_run_id_of(first.stdout)
    assert flow_run_state(flow_run_id).name == "Crashed", first.stdout[-3000:]
    run = mlflow_run_of(client, flow_run_id)
    deadline = time.time() + 60
    while client.get_run(run.info.run_id).info.status != "FAILED":  # by the flow's on_crashed hook
        assert time.time() < deadline, client.get_run(run.info.run_id).info.status
        time.sleep(1)
    assert versions(client) == [(1, "incomplete")]
    assert aliases(client) == {}
    assert "INCOMPLETE registration (retry its flow run)" in registry_cli("list").stdout
    refused = registry_cli("show", "1")
    assert refused.returncode != 0 and "v1: its registration was cut short" in refused.stderr
    state = retry_and_wait(env, flow_run_id)
    assert state.is_completed(), state.message
    assert versions(client) == [(2, "complete")]  # v1 deleted by the retry, v2 registered once
    assert aliases(client) == {"candidate": 2, "champion": 2}
    not_redone(flow_run_id)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    params = client.get_run(run.info.run_id).data.params
    assert params["data.source"] == str(source) and params["train.max_steps"] == "4"
    tags = client.get_run(run.info.run_id).data.tags
    processed, _ = data_folders(tags)
    report = json.loads((processed / "report.json").read_text())
    assert (report["source_rows"], report["train_rows"]) == (120, 90)
    # The data overrides went to the run's DVC experiment (`dvc exp run -S`), not the workspace.
    written = experiment_params(tags)["data"]
    assert (written["source"], written["rows"]) == (str(source), 100)
    assert "source" not in (yaml.safe_load(Path("params.yaml").read_text())["data"] or {})

    # 2. The tracking server killed while `register` runs (the same run folder: no kill this time).
    started = run_deployment(env, overrides, watch=False)
    assert started.returncode == 0, started.stdout + started.stderr
    flow_run_id = flow_run_id_of(started.stdout)
    deadline = time.time() + 600
    while task_states(flow_run_id).get("register") != "Running":
        assert time.time() < deadline and not flow_run_state(flow_run_id).is_final(), "register never ran"
        time.sleep(0.3)
    server.kill()
    state = wait_until_final(flow_run_id)
    assert state.is_failed(), state.name
    server.start()
    assert [v for v in versions(client) if v[1] == "complete"] == [(2, "complete")]
    run = mlflow_run_of(client, flow_run_id)
    assert run.info.status == "RUNNING"  # the failure hook could not reach the store either
    state = retry_and_wait(env, flow_run_id)
    assert state.is_completed(), state.message
    not_redone(flow_run_id)
    complete = [v for v in versions(client) if v[1] == "complete"]
    assert len(complete) == 2 and complete[0] == (2, "complete")
    assert [v for v in versions(client) if v[1] != "complete"] == []
    # Same data and settings as run 1: training resumed from checkpoint-4, its end, so no step ran.
    assert client.get_metric_history(run.info.run_id, "train/loss") == []
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    mlflow.set_tracking_uri(tracking_uri())  # models:/ URIs resolve against the global one
    loaded = mlflow.transformers.load_model(f"models:/{MODEL}@candidate", return_type="components")
    assert loaded["model"].peft_config["default"].r == 16


# --- the `full` tier: other doors to what the tests above and the shared run prove ---------------


@pytest.mark.full
def test_flow_run_retry_after_a_failed_step_resumes_training(project, prefect_server):
    """A run that fails mid-training, retried with `prefect flow-run retry`, completes: the data
    steps come from the cache, training resumes from its checkpoint, the MLflow run is reused."""
    overrides = {"train.max_steps": 6, "train.save_steps": 3, "train.logging_steps": 1, **QUICK_EVAL}
    with served_deployment(prefect_server, **faults.env(fail_at_step=5)) as env:
        first = run_deployment(env, overrides)
        assert first.returncode == 1 and "Failed" in first.stdout, first.stdout + first.stderr
        flow_run_id = flow_run_id_of(first.stdout)
        state = retry_and_wait(env, flow_run_id)
    assert state.is_completed(), state.message
    states = task_states(flow_run_id)
    assert states["data"] == "Cached"
    mlflow_client = mlflow.MlflowClient(tracking_uri())
    runs = mlflow_client.search_runs([e.experiment_id for e in mlflow_client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in mlflow_client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 4, 5, 6]  # failed during step 5; resumed from checkpoint-3, so 4 runs twice


@pytest.mark.full
def test_sigkilled_training_resumes_when_the_deployment_runs_again(project, prefect_server):
    """SIGKILL while checkpoint-4 is being written; the next deployment run resumes from checkpoint-2
    (the torn one is ignored), skips the data steps and registers a valid adapter."""
    overrides = {"train.max_steps": 6, "train.save_steps": 2, "train.logging_steps": 1, **QUICK_EVAL}
    with served_deployment(prefect_server, **faults.env(kill_at_save=4)) as env:
        first = run_deployment(env, overrides)
        assert first.returncode == 1 and "Failed" in first.stdout, first.stdout + first.stderr
        checkpoints = next(Path("runs").glob("run-*")) / "checkpoints"
        assert (checkpoints / "checkpoint-4").is_dir() and not (checkpoints / "checkpoint-4" / ".complete").exists()
        again = run_deployment(env, overrides)
    assert again.returncode == 0, again.stdout + again.stderr
    states = task_states(flow_run_id_of(again.stdout))
    assert states["data"] == "Cached"
    client = mlflow.MlflowClient(tracking_uri())
    version = client.get_model_version_by_alias("chat-doctor-adapter", "candidate")
    assert [m.step for m in client.get_metric_history(version.run_id, "train/loss")] == [3, 4, 5, 6]
    mlflow.set_tracking_uri(tracking_uri())  # models:/ URIs resolve against the global one
    loaded = mlflow.transformers.load_model("models:/chat-doctor-adapter@candidate", return_type="components")
    assert loaded["model"].peft_config["default"].r == 16


@pytest.mark.full
@needs_real_rows()
def test_deployment_evaluates_a_jsonl_of_real_rows_and_rescores_the_champion(project, prefect_server, tmp_path):
    """A first run makes v1 champion on the eval split; the second names a JSONL of real rows as
    `evaluate.source`: base, tuned and the champion are scored on those rows and promotion uses them."""
    import datasets

    held_out = tmp_path / "held_out_real.jsonl"
    datasets.load_from_disk(str(REAL_ROWS)).select(range(60)).to_json(str(held_out), lines=True)
    overrides = {"train.max_steps": 4, **QUICK_EVAL}
    with served_deployment(prefect_server) as env:
        first = run_deployment(env, overrides)
        assert first.returncode == 0, first.stdout + first.stderr
        second = run_deployment(env, {**overrides, "evaluate.source": str(held_out)})
    assert second.returncode == 0, second.stdout + second.stderr
    report = json.loads(next(Path("runs").glob("run-*/eval/*/report.json")).read_text())
    assert report["gate_set"] == "source"
    assert report["champion"] == {"version": 1, "figures": "scored again on these rows"}
    real = report["sets"]["source"]
    assert real["models"]["champion"]["loss"] == pytest.approx(real["models"]["tuned"]["loss"], rel=1e-4)
    client = mlflow.MlflowClient(tracking_uri())
    version = client.get_model_version_by_alias("chat-doctor-adapter", "candidate")
    assert int(version.version) == 2 and version.tags["eval.set"] == "source"
    assert "champion v1" in version.tags["promotion.reason"]
    assert int(client.get_model_version_by_alias("chat-doctor-adapter", "champion").version) == 1
