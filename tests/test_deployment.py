"""The `finetune/default` deployment, served as `make demo` serves it, run and retried with the
Prefect CLI, with overrides passed as a deployment parameter."""

import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest

from bench.processes import stop_when_idle, task_states
from chat_doctor.tracking import tracking_uri
from tests.conftest import QUICK_EVAL, REAL_ROWS, needs_real_rows

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@contextmanager
def served_deployment(api_url: str, **extra_env: str):
    """`python -m flows.deploy` in the project folder; yields the env for Prefect CLI calls."""
    env = {**os.environ, "PREFECT_API_URL": api_url, "PYTHONPATH": str(Path.cwd())}
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.deploy"],
        env={**env, **extra_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while subprocess.run([BIN / "prefect", "deployment", "inspect", "finetune/default"], env=env).returncode:
            assert time.time() < deadline and server.poll() is None, "the deployment never appeared"
            time.sleep(2)
        yield env
    finally:
        stop_when_idle(server)


def run_deployment(env: dict, overrides: dict) -> subprocess.CompletedProcess:
    command = ["deployment", "run", "finetune/default", "--watch", "--param", f"overrides={json.dumps(overrides)}"]
    return subprocess.run([BIN / "prefect", *command], env=env, capture_output=True, text=True, timeout=600)


def flow_run_state(flow_run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def retry_and_wait(env: dict, flow_run_id: str, timeout: float = 600):
    """`prefect flow-run retry` (the served deployment picks it up); the state it ends in."""
    assert subprocess.run([BIN / "prefect", "flow-run", "retry", flow_run_id], env=env).returncode == 0
    deadline = time.time() + timeout
    while not (state := flow_run_state(flow_run_id)).is_final():
        assert time.time() < deadline, f"retry still {state.name}"
        time.sleep(3)
    return state


def flow_run_id_of(output: str) -> str:
    return re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)


def test_deployment_run_with_overrides(project, prefect_server, tmp_path):
    source = tmp_path / "my_rows.jsonl"
    rows = Path("data/raw/synthetic_healthcaremagic.jsonl").read_text().splitlines()[:120]
    source.write_text("\n".join(rows) + "\n")
    overrides = {"data.source": str(source), "data.rows": 100, "train.max_steps": 4, **QUICK_EVAL}
    with served_deployment(prefect_server) as env:
        run = run_deployment(env, overrides)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Completed" in run.stdout
    client = mlflow.MlflowClient(tracking_uri())
    version = client.get_model_version_by_alias("chat-doctor-adapter", "candidate")
    params = client.get_run(version.run_id).data.params
    assert params["data.source"] == str(source) and params["train.max_steps"] == "4"
    report = json.loads(Path("data/processed/report.json").read_text())
    assert (report["source_rows"], report["train_rows"]) == (120, 90)


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
    report = json.loads(next(Path("runs").glob("run-*/eval/report.json")).read_text())
    assert report["gate_set"] == "source"
    assert report["champion"] == {"version": 1, "figures": "scored again on these rows"}
    real = report["sets"]["source"]
    assert real["cleaning"]["rows_read"] == 60 and real["rows"] == real["cleaning"]["rows_kept"] > 50
    metrics = ("loss", "perplexity", "rougeL", "similarity", "eos_rate", "repetition", "words")
    for model in ("base", "tuned", "champion"):
        assert set(metrics) <= set(real["models"][model]), model
    # Same training settings, so the second run resumed the first run's adapter: the champion scored
    # from the registry on the base must equal the tuned merged model.
    assert real["models"]["champion"]["loss"] == pytest.approx(real["models"]["tuned"]["loss"], rel=1e-4)
    client = mlflow.MlflowClient(tracking_uri())
    version = client.get_model_version_by_alias("chat-doctor-adapter", "candidate")
    assert int(version.version) == 2 and version.tags["eval.set"] == "source"
    assert "champion v1" in version.tags["promotion.reason"]
    assert int(client.get_model_version_by_alias("chat-doctor-adapter", "champion").version) == 1
    run_metrics = client.get_run(version.run_id).data.metrics
    assert run_metrics["eval_source/tuned_loss"] == pytest.approx(real["models"]["tuned"]["loss"])
    assert "eval/tuned_loss" in run_metrics  # the eval split is still reported


def test_flow_run_retry_skips_finished_steps_and_resumes(project, prefect_server):
    """A run that fails mid-training, retried with `prefect flow-run retry`, completes: the data
    steps come from the cache, training resumes from its checkpoint, the MLflow run is reused."""
    overrides = {"train.max_steps": 6, "train.save_steps": 3, "train.logging_steps": 1, **QUICK_EVAL}
    with served_deployment(prefect_server, CHAT_DOCTOR_FAIL_AT_STEP="5") as env:
        first = run_deployment(env, overrides)
        assert first.returncode == 1 and "Failed" in first.stdout, first.stdout + first.stderr
        flow_run_id = flow_run_id_of(first.stdout)
        state = retry_and_wait(env, flow_run_id)
    assert state.is_completed(), state.message
    states = task_states(flow_run_id)
    assert states["sample"] == "Cached" and states["tokenize"] == "Cached"
    mlflow_client = mlflow.MlflowClient(tracking_uri())
    runs = mlflow_client.search_runs([e.experiment_id for e in mlflow_client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in mlflow_client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 4, 5, 6]  # failed during step 5; resumed from checkpoint-3, so 4 runs twice


def test_sigkilled_training_resumes_when_the_deployment_runs_again(project, prefect_server):
    """SIGKILL while checkpoint-4 is being written; the next deployment run resumes from checkpoint-2
    (the torn one is ignored), skips the data steps and registers a valid adapter."""
    overrides = {"train.max_steps": 6, "train.save_steps": 2, "train.logging_steps": 1, **QUICK_EVAL}
    with served_deployment(prefect_server, CHAT_DOCTOR_KILL_AT_SAVE="4") as env:
        first = run_deployment(env, overrides)
        assert first.returncode == 1 and "Failed" in first.stdout, first.stdout + first.stderr
        checkpoints = next(Path("runs").glob("run-*")) / "checkpoints"
        assert (checkpoints / "checkpoint-4").is_dir() and not (checkpoints / "checkpoint-4" / ".complete").exists()
        again = run_deployment(env, overrides)
    assert again.returncode == 0, again.stdout + again.stderr
    flow_run_id = flow_run_id_of(again.stdout)
    states = task_states(flow_run_id)
    assert states["sample"] == "Cached" and states["tokenize"] == "Cached"
    client = mlflow.MlflowClient(tracking_uri())
    version = client.get_model_version_by_alias("chat-doctor-adapter", "candidate")
    assert [m.step for m in client.get_metric_history(version.run_id, "train/loss")] == [3, 4, 5, 6]
    loaded = mlflow.transformers.load_model("models:/chat-doctor-adapter@candidate", return_type="components")
    assert loaded["model"].peft_config["default"].r == 16
