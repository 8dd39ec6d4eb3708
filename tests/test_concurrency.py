"""Runs at once in one project, as Prefect invites: a deployment run and a command-line run with
different data, then a second deployment run of the first's settings. Each registered version
carries its own data (DVC experiment, hashes, rows) and its own losses; the workspace's params.yaml
and dvc.lock are untouched; `champion` ends on the version that beats everything registered before
it; with the served deployment's limit of one run at a time, the second deployment run waits in
Prefect until the first has finished, and then shares its data, adapter and merged model."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from chat_doctor.tracking.mlflow_runs import tracking_uri
from tests.conftest import data_folders, experiment_params, new_project
from tests.served import BIN, flow_run_id_of, flow_run_state, run_deployment, served_deployment, wait_until_final

pytestmark = pytest.mark.slow
PLANTED = "hf_" + "Zq7" * 10  # shaped like a hub token; must never be echoed
SHORT = {"train.max_steps": 2, "train.save_steps": 2, "evaluate.rows": 1, "evaluate.max_new_tokens": 4}


def flow_run_logs(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    found = []
    with get_client(sync_client=True) as client:
        while batch := client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=len(found)
        ):
            found += batch
    return "\n".join(log.message for log in found)


def flow_run_times(flow_run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    return run.start_time, run.end_time


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, prefect_server):
    """A project, as the working directory, and its served deployment (one run at a time)."""
    root = new_project(tmp_path_factory.mktemp("concurrency") / "project", tiny_model_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        with served_deployment(prefect_server, limit=1) as env:
            yield root, env


# Full tier: the deployment parameter's door (make test: the same values through the flow in
# tests/test_bad_inputs.py, and good parameters through this deployment below).
@pytest.mark.full
def test_bad_deployment_parameters_fail_before_training(served):
    """`prefect deployment run finetune/default --param overrides=...` with bad values, as users type them."""
    _, env = served
    cases = [
        ('{"lora.r": 0}', "`lora.r` = 0"),
        (json.dumps({"model.token": PLANTED}), "unknown key `model.token`: secrets never go in params.yaml"),
    ]
    for overrides, message in cases:
        command = ["deployment", "run", "finetune/default", "--watch", "--param", f"overrides={overrides}"]
        done = subprocess.run([BIN / "prefect", *command], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode != 0, done.stdout
        state = flow_run_state(flow_run_id_of(done.stdout))
        assert state.is_failed() and message in state.message, (message, state.message)
        assert PLANTED not in state.message
    # Not a mapping of dotted keys: Prefect refuses the parameter before any run starts.
    command = ["deployment", "run", "finetune/default", "--param", "overrides=[1, 2]"]
    done = subprocess.run([BIN / "prefect", *command], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "overrides" in done.stdout + done.stderr, done.stdout + done.stderr
    assert not list(Path("runs").glob("run-*")) and not list(Path("dvc-remote").rglob("*.*"))
    assert mlflow.MlflowClient(tracking_uri()).search_registered_models() == []


def test_runs_at_once_keep_their_own_data_lineage_and_champion(served, tmp_path):
    """A deployment run and a command-line run with other data, at once in one project folder."""
    root, env = served
    rows = (root / "data/raw/synthetic_healthcaremagic.jsonl").read_text().splitlines()
    own = tmp_path / "own_rows.jsonl"  # another source, as a user's file outside the project
    own.write_text("\n".join(rows[200:240]) + "\n")
    asked = {
        "deployment": {"data.source": str(own), "data.rows": 30, **SHORT},
        # Held-out rows: evaluate's log once showed a bytecode listing here (a print of dill's).
        "command-line": {"data.rows": 24, "data.seed": 7, "evaluate.source": str(own), **SHORT},
    }
    workspace = {name: Path(name).read_text() for name in ("params.yaml", "dvc.lock")}
    deployment_run = flow_run_id_of(run_deployment(env, asked["deployment"], watch=False).stdout)
    # A command-line run beside it, as `python -m flows.finetune KEY=VALUE ...`.
    command = [sys.executable, "-m", "flows.finetune", *(f"{k}={v}" for k, v in asked["command-line"].items())]
    cli = subprocess.Popen(
        command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = cli.communicate(timeout=900)[0]
    assert cli.returncode == 0, output[-3000:]
    assert wait_until_final(deployment_run).is_completed()
    # They ran at once: each started before the other ended.
    client = mlflow.MlflowClient(tracking_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "attributes.status = 'FINISHED'")
    assert len(runs) == 2
    (first, second) = sorted(runs, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time

    registered = {}
    for run in runs:
        name = "deployment" if run.data.tags["prefect.flow_run_id"] == deployment_run else "command-line"
        (version,) = client.search_model_versions(f"run_id = '{run.info.run_id}'")
        registered[name] = version
        overrides = asked[name]
        # Its params, its experiment and the data it trained on all say the same rows.
        assert run.data.params["data.rows"] == str(overrides["data.rows"])
        in_experiment = experiment_params(version.tags)["data"]
        assert in_experiment.get("rows") == overrides["data.rows"]
        assert in_experiment.get("source") == overrides.get("data.source")
        processed, tokenized = data_folders(version.tags)
        report = json.loads((processed / "report.json").read_text())
        assert report["train_rows"] + report["eval_rows"] == overrides["data.rows"]
        assert report["source"] == overrides.get("data.source", "data/raw/synthetic_healthcaremagic.jsonl")
        attempt = json.loads(next(Path("runs").glob(f"run-*/eval/{run.info.run_id}/report.json")).read_text())
        gate = attempt["sets"][attempt["gate_set"]]["models"]
        assert float(version.tags["eval.tuned.loss"]) == gate["tuned"]["loss"]
        assert json.loads((tokenized / "report.json").read_text())["splits"]["train"]["rows"] > 0
    hashes = {name: v.tags["dvc.data/processed"] for name, v in registered.items()}
    losses = {name: v.tags["eval.base.loss"] for name, v in registered.items()}
    assert hashes["deployment"] != hashes["command-line"] and losses["deployment"] != losses["command-line"]
    assert len({v.tags["dvc.experiment"] for v in registered.values()}) == 2
    # Promotion in registration order, each against everything registered before it.
    by_version = sorted(registered.values(), key=lambda v: int(v.version))
    assert [int(v.version) for v in by_version] == [1, 2]
    assert "there was no champion" in by_version[0].tags["promotion.reason"]
    assert "there was no champion" not in by_version[1].tags["promotion.reason"]
    promoted = [v for v in by_version if v.tags["promotion.decision"] == "promoted"]
    champion = client.get_model_version_by_alias("chat-doctor-adapter", "champion")
    assert champion.version == promoted[-1].version
    logged = flow_run_logs(client.get_run(registered["command-line"].run_id).data.tags["prefect.flow_run_id"])
    assert "MLflow run" in logged and "LOAD_GLOBAL" not in logged and " RESUME " not in logged
    # The workspace is the user's.
    assert {name: Path(name).read_text() for name in workspace} == workspace
    git = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    assert git.stdout == ""


# Full tier: Prefect's global concurrency limit at work (make test: the limit is set by the served
# deployment above, and same settings share their data through DVC's run cache in the shared run).
@pytest.mark.full
def test_a_second_deployment_run_waits_for_the_slot_then_shares_the_first_ones_work(served):
    _, env = served
    same = {"data.rows": 28, "data.seed": 11, **SHORT}
    ids = [flow_run_id_of(run_deployment(env, same, watch=False).stdout) for _ in range(2)]
    waited = set()
    while not flow_run_state(ids[0]).is_final():
        state = flow_run_state(ids[1])
        waited.add(state.name)
        assert not state.is_running(), "the second deployment run started while the first ran"
        time.sleep(0.5)
    assert all(wait_until_final(i).is_completed() for i in ids)
    assert "AwaitingConcurrencySlot" in waited, waited
    assert flow_run_times(ids[1])[0] >= flow_run_times(ids[0])[1]  # it waited until the first had finished
    client = mlflow.MlflowClient(tracking_uri())
    experiments = [e.experiment_id for e in client.search_experiments()]
    versions = []
    for flow_run_id in ids:
        (run,) = client.search_runs(experiments, f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
        (version,) = client.search_model_versions(f"run_id = '{run.info.run_id}'")
        versions.append(version)
    # The same settings shared the work: the same data (DVC's run cache), the same run folder, whose
    # adapter and merged model the second found finished; only the experiments are their own.
    assert versions[0].tags["dvc.data/processed"] == versions[1].tags["dvc.data/processed"]
    assert versions[0].tags["dvc.experiment"] != versions[1].tags["dvc.experiment"]
    second_logs = flow_run_logs(ids[1])
    assert "training finished in" in second_logs and "its adapter is reused" in second_logs
    assert "already: reused" in second_logs  # the merged model
    assert "Stage 'sample' is cached - skipping run" in second_logs
