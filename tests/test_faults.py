"""Faults around registration, through the served deployment as users run it: the flow process
killed mid-registration, and the MLflow tracking server gone while `register` runs. After
`prefect flow-run retry`: one complete version, nothing half-written, and training, merge and
evaluation taken from Prefect's cache instead of run again."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from bench.processes import free_port, mlflow_server_command, task_states
from chat_doctor.tracking import tracking_uri
from tests.conftest import QUICK_EVAL
from tests.test_deployment import (
    BIN,
    flow_run_id_of,
    flow_run_state,
    retry_and_wait,
    run_deployment,
    served_deployment,
)

pytestmark = pytest.mark.slow
MODEL = "chat-doctor-adapter"
QUICK = {"train.max_steps": 4, "train.save_steps": 2, "train.logging_steps": 1, **QUICK_EVAL}


def registry_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chat_doctor.registry", *args], capture_output=True, text=True)


def versions(client) -> list[tuple[int, str]]:
    found = client.search_model_versions(f"name = '{MODEL}'")
    return sorted((int(v.version), v.tags.get("registration", "")) for v in found)


def not_redone(flow_run_id: str) -> None:
    states = task_states(flow_run_id)
    assert (states["train"], states["merge"], states["evaluate"]) == ("Cached",) * 3, states
    assert states["register"] == "Completed"


def test_crash_mid_registration_is_cleaned_up_by_the_retry(project, prefect_server):
    with served_deployment(prefect_server, CHAT_DOCTOR_KILL_IN_REGISTER="after-version") as env:
        first = run_deployment(env, QUICK)
        flow_run_id = flow_run_id_of(first.stdout)
        assert flow_run_state(flow_run_id).name == "Crashed", first.stdout[-3000:]
        client = mlflow.MlflowClient(tracking_uri())
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        deadline = time.time() + 60
        while client.get_run(run.info.run_id).info.status != "FAILED":  # by the flow's on_crashed hook
            assert time.time() < deadline, client.get_run(run.info.run_id).info.status
            time.sleep(1)
        # The kill came between creating the version and completing it: a half-written version, no alias.
        assert versions(client) == [(1, "incomplete")]
        assert client.get_registered_model(MODEL).aliases == {}
        assert "INCOMPLETE registration (retry its flow run)" in registry_cli("list").stdout
        refused = registry_cli("show", "1")
        assert refused.returncode != 0 and "v1: its registration was cut short" in refused.stderr
        state = retry_and_wait(env, flow_run_id)
    assert state.is_completed(), state.message
    assert versions(client) == [(2, "complete")]  # v1 deleted by the retry, v2 registered once
    assert client.get_registered_model(MODEL).aliases == {"candidate": 2, "champion": 2}
    not_redone(flow_run_id)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]


class MlflowServer:
    """`mlflow server` on the project's sqlite store, serving its artifacts: start, kill, start again."""

    def __init__(self, root: Path):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.command = mlflow_server_command(root, port, BIN / "mlflow")
        self.proc = None

    def start(self) -> None:
        import urllib.request

        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
        self.proc = subprocess.Popen(self.command, start_new_session=True, **quiet)
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                assert time.time() < deadline and self.proc.poll() is None, "the MLflow server did not start"
                time.sleep(0.5)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def mlflow_server(project, monkeypatch):
    server = MlflowServer(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    server.start()
    yield server
    server.kill()


def test_mlflow_down_during_register_then_retry_does_not_train_again(project, prefect_server, mlflow_server):
    import json

    with served_deployment(prefect_server) as env:
        command = ["deployment", "run", "finetune/default", "--param", f"overrides={json.dumps(QUICK)}"]
        started = subprocess.run([BIN / "prefect", *command], env=env, capture_output=True, text=True, check=True)
        flow_run_id = flow_run_id_of(started.stdout)
        deadline = time.time() + 600
        while task_states(flow_run_id).get("register") != "Running":
            assert time.time() < deadline and not flow_run_state(flow_run_id).is_final(), "register never ran"
            time.sleep(0.3)
        mlflow_server.kill()
        while not (state := flow_run_state(flow_run_id)).is_final():
            assert time.time() < deadline, state.name
            time.sleep(1)
        assert state.is_failed(), state.name
        mlflow_server.start()
        client = mlflow.MlflowClient(tracking_uri())
        assert [v for v in versions(client) if v[1] == "complete"] == []
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert run.info.status == "RUNNING"  # the failure hook could not reach the store either
        state = retry_and_wait(env, flow_run_id)
    assert state.is_completed(), state.message
    not_redone(flow_run_id)
    assert [v for v in versions(client) if v[1] == "complete"] == [(versions(client)[-1][0], "complete")]
    assert [v for v in versions(client) if v[1] != "complete"] == []
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    loaded = mlflow.transformers.load_model(f"models:/{MODEL}@candidate", return_type="components")
    assert loaded["model"].peft_config["default"].r == 16
