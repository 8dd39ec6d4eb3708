"""The team stack, started as `make team-up` starts it, with nothing mocked: PostgreSQL 15 (Debian's),
SeaweedFS's S3, the MLflow server on PostgreSQL with its artifacts in S3, the Prefect server on
PostgreSQL, the `chat-doctor` work pool with two process workers in folders of their own (two GPU
machines), and a project whose committed DVC remote is the bucket. Flow runs go through
`prefect deployment run finetune/default`, and each worker runs its flow run in a clone of the
project at the deployed commit, as a GPU machine would.

make test: two runs at once, one on each worker; make test-all adds four at once and the faults."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import new_project
from tests.served import flow_run_id_of

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
QUICK = {"train.max_steps": 3, "train.save_steps": 3, "evaluate.rows": 1, "evaluate.max_new_tokens": 4}
MODEL = "chat-doctor-adapter"


def _ports_free(*ports: int) -> bool:
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _team_ports() -> dict[str, int]:
    """Free ports for the stack; SeaweedFS takes the S3 port's next four and each one's +10000 (gRPC)."""
    while True:
        s3 = random.randrange(20000, 29000)
        others = [random.randrange(30000, 40000) for _ in range(3)]
        if _ports_free(*range(s3, s3 + 5), *range(s3 + 10000, s3 + 10005), *others):
            return {
                "TEAM_S3_PORT": s3,
                "TEAM_PG_PORT": others[0],
                "TEAM_MLFLOW_PORT": others[1],
                "TEAM_PREFECT_PORT": others[2],
            }


@dataclass
class Team:
    root: Path
    env: dict[str, str]  # a user's shell after `source .local/team/env`
    secrets: dict[str, str]

    def prefect(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([BIN / "prefect", *args], env=self.env, capture_output=True, text=True, timeout=900)
        assert not check or done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    def run_deployment(self, overrides: dict) -> str:
        done = self.prefect("deployment", "run", "finetune/default", "--param", f"overrides={json.dumps(overrides)}")
        return flow_run_id_of(done.stdout)

    def mlflow(self):
        import mlflow

        return mlflow.MlflowClient(self.env["MLFLOW_TRACKING_URI"])

    def s3(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.env["AWS_ENDPOINT_URL"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )

    def objects(self, prefix: str = "") -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket="chat-doctor", Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def sql(self, database: str, query: str) -> list[tuple]:
        import psycopg2

        port = self.env["TEAM_PG_PORT"]
        password = self.secrets["CHAT_DOCTOR_DB_PASSWORD"]
        db = psycopg2.connect(host="127.0.0.1", port=port, user="chatdoctor", password=password, dbname=database)
        try:
            cursor = db.cursor()
            cursor.execute(query)
            return cursor.fetchall()
        finally:
            db.close()


def _read_env(path: Path) -> dict[str, str]:
    lines = [line.removeprefix("export ") for line in path.read_text().splitlines() if "=" in line]
    return dict(line.split("=", 1) for line in lines)


@pytest.fixture(scope="module")
def team(tiny_model_dir):
    # PostgreSQL runs as the `postgres` user under root: its cluster's folder must be reachable by it,
    # which pytest's own temporary folders (mode 700) are not.
    base = Path(tempfile.mkdtemp(prefix="chat-doctor-team-"))
    base.chmod(0o755)
    root = new_project(base / "project", tiny_model_dir)
    ports = _team_ports()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    env.update({k: str(v) for k, v in ports.items()})
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["CHAT_DOCTOR_MODELS_DIR"] = str(root / "models")  # the tiny base, built once for both workers
    env.pop("PYTHONPATH", None)
    # The team's DVC remote is the bucket, committed as a team would (credentials stay in the environment).
    s3_url = f"http://127.0.0.1:{ports['TEAM_S3_PORT']}"
    for command in (
        ["remote", "add", "-d", "team", "s3://chat-doctor/dvc"],
        ["remote", "modify", "team", "endpointurl", s3_url],
    ):
        subprocess.run([BIN / "dvc", *command], cwd=root, env=env, check=True, capture_output=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qam", "team remote"],
        cwd=root,
        check=True,
    )
    up = subprocess.run([sys.executable, "-m", "team.stack", "up"], cwd=root, env=env, capture_output=True, text=True)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        home = root / ".local" / "team"
        user = {**env, **_read_env(home / "env"), "PREFECT_HOME": str(base / "prefect-client")}
        yield Team(root, user, _read_env(home / "secrets.env"))
    finally:
        subprocess.run([sys.executable, "-m", "team.stack", "down"], cwd=root, env=env, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _wait_all(team: Team, ids: list[str], timeout: float = 900) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.time() + timeout
    with temporary_settings({PREFECT_API_URL: team.env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        while True:
            runs = {i: client.read_flow_run(i) for i in ids}
            if all(r.state.is_final() for r in runs.values()) or time.time() > deadline:
                return runs
            time.sleep(2)


def _worker_of(team: Team, flow_run_id: str) -> str:
    """The worker that ran a flow run, from the workers' own logs."""
    for log in sorted((team.root / ".local" / "team").glob("worker-*.log")):
        if f"submitting flow run '{flow_run_id}'" in log.read_text():
            return log.stem
    raise AssertionError(f"no worker log names flow run {flow_run_id}")


def _audit_versions(team: Team, asked: dict[str, dict], runs: dict) -> dict[str, object]:
    """Each flow run registered one complete version whose lineage is its own; returns them by flow run."""
    client = team.mlflow()
    versions = {}
    for flow_run_id, overrides in asked.items():
        (run,) = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
        )
        (version,) = client.search_model_versions(f"run_id = '{run.info.run_id}'")
        version = client.get_model_version(MODEL, version.version)
        assert version.tags["registration"] == "complete"
        assert run.data.params["data.rows"] == str(overrides["data.rows"])
        assert version.tags["dvc.experiment_remote"] == "origin"
        # Its artifacts are in the bucket, through the tracking server.
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        stored = team.objects(f"mlflow/{run.info.experiment_id}/{run.info.run_id}/")
        assert any(k.endswith("eval/report.json") for k in stored), stored[:20]
        versions[flow_run_id] = version
    hashes = [v.tags["dvc.data/processed"] for v in versions.values()]
    assert len(set(hashes)) == len(hashes)  # different rows asked, different data made
    # The registry is PostgreSQL's, and so are Prefect's flow runs.
    registered = team.sql("mlflow", f"SELECT version FROM model_versions WHERE name = '{MODEL}'")
    assert {str(v) for (v,) in registered} >= {v.version for v in versions.values()}
    completed = team.sql("prefect", "SELECT id::text FROM flow_run WHERE state_type = 'COMPLETED'")
    assert set(asked) <= {i for (i,) in completed}
    # Promotion in registration order: the first found no champion, the champion is the last promoted.
    ordered = sorted(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    ordered = [client.get_model_version(MODEL, v.version) for v in ordered]
    assert "there was no champion" in ordered[0].tags["promotion.reason"]
    assert all("there was no champion" not in v.tags["promotion.reason"] for v in ordered[1:])
    promoted = [v for v in ordered if v.tags["promotion.decision"] == "promoted"]
    assert client.get_model_version_by_alias(MODEL, "champion").version == promoted[-1].version
    for flow_run_id, version in sorted(versions.items(), key=lambda item: int(item[1].version)):
        print(
            f"  v{version.version}: {_worker_of(team, flow_run_id)}, {asked[flow_run_id]['data.rows']} rows, data "
            f"{version.tags['dvc.data/processed'][:10]}, tuned loss {float(version.tags['eval.tuned.loss']):.4f}, "
            f"{version.tags['promotion.decision']}"
        )
    print(f"  champion: v{promoted[-1].version}")
    return versions


def _pull_in_a_fresh_clone(team: Team, version, dest: Path) -> None:
    """`git clone`, `dvc exp pull`, `dvc exp apply`, `dvc pull`: the version's data, exactly."""
    subprocess.run(["git", "clone", "-q", str(team.root), str(dest)], check=True)
    experiment = version.tags["dvc.experiment"]
    for command in (["exp", "pull", "origin", experiment], ["exp", "apply", experiment], ["pull"]):
        done = subprocess.run([BIN / "dvc", *command], cwd=dest, env=team.env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    lock = (dest / "dvc.lock").read_text()
    for out in ("processed", "tokenized"):
        assert version.tags[f"dvc.data/{out}"] in lock
    report = json.loads((dest / "data/processed/report.json").read_text())
    assert report["train_rows"] + report["eval_rows"] == int(
        team.mlflow().get_run(version.run_id).data.params["data.rows"]
    )
    status = subprocess.run([BIN / "dvc", "status"], cwd=dest, env=team.env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout


def _no_secret_anywhere(team: Team) -> None:
    """Keys and the database password: never in params, tags, logs, artifacts or Prefect's database."""
    secrets = [team.secrets["AWS_SECRET_ACCESS_KEY"], team.secrets["CHAT_DOCTOR_DB_PASSWORD"]]
    dump = subprocess.run(
        [
            "/usr/lib/postgresql/15/bin/pg_dump",
            "-h",
            "127.0.0.1",
            "-p",
            team.env["TEAM_PG_PORT"],
            "-U",
            "chatdoctor",
            "prefect",
        ],
        env={**team.env, "PGPASSWORD": team.secrets["CHAT_DOCTOR_DB_PASSWORD"]},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "flow_run" in dump and not [s for s in secrets if s in dump]
    s3 = team.s3()
    for key in team.objects():
        body = s3.get_object(Bucket="chat-doctor", Key=key)["Body"].read()
        assert not [s for s in secrets if s.encode() in body], key
    client = team.mlflow()
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        text = json.dumps([run.data.params, run.data.tags])
        assert not [s for s in secrets if s in text]
    kept = {"secrets.env", "env"}  # the stack's own, readable by its owner only
    for path in (team.root / ".local" / "team").glob("*"):
        if path.name in kept:
            assert path.stat().st_mode & 0o077 == 0, path
        elif path.is_file():
            assert not [s for s in secrets if s.encode() in path.read_bytes()], path


def test_two_runs_at_once_on_two_workers_register_on_the_team_servers(team, tmp_path):
    started = time.time()
    asked = {}
    for rows in (24, 30):
        overrides = {"data.rows": rows, **QUICK}
        asked[team.run_deployment(overrides)] = overrides
    runs = _wait_all(team, list(asked))
    print(f"two runs on two workers: {time.time() - started:.0f} s")
    assert all(r.state.is_completed() for r in runs.values()), {i: r.state for i, r in runs.items()}
    assert {_worker_of(team, i) for i in asked} == {"worker-1", "worker-2"}  # one run on each machine
    versions = _audit_versions(team, asked, runs)
    # A second machine restores the data of any registered version from the bucket.
    _pull_in_a_fresh_clone(team, next(iter(versions.values())), tmp_path / "clone")
    # Each worker's clone pushed its data experiment to the repository.
    refs = subprocess.run(["git", "for-each-ref", "refs/exps/"], cwd=team.root, capture_output=True, text=True)
    assert all(v.tags["dvc.experiment"] in refs.stdout for v in versions.values())
    _no_secret_anywhere(team)


# The slower tier: four runs at once, and the faults on the shared stack, each followed by a retry and
# an audit that nothing is lost or half-written.


def _stack(team: Team):
    from team.stack import Stack

    ports = {name: int(team.env[f"TEAM_{name.upper()}_PORT"]) for name in ("pg", "s3", "mlflow", "prefect")}
    return Stack(team.root, ports)


def _workers(team: Team, numbers=(1, 2), faults: dict[str, str] | None = None) -> None:
    """Stop every worker, then start `numbers` (with `faults` armed in their flow runs)."""
    from team.stack import _stop, start_worker, wait_for_workers

    stack = _stack(team)
    _stop(stack, "worker-1", "worker-2")
    for number in numbers:
        start_worker(stack, team.secrets, number, faults)
    wait_for_workers(stack, team.secrets, [f"worker-{n}" for n in numbers])


def _kill_machine(team: Team, name: str) -> None:
    """SIGKILL a worker and everything it started, as when its machine dies."""
    import psutil

    pid = int(_stack(team).pidfile(name).read_text())
    process = psutil.Process(pid)
    for each in [*process.children(recursive=True), process]:
        each.kill()


def _task_running(team: Team, flow_run_id: str, task: str, timeout: float = 600) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.time() + timeout
    runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    with temporary_settings({PREFECT_API_URL: team.env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        while time.time() < deadline:
            if any(
                t.name.startswith(task) and t.state.is_running() for t in client.read_task_runs(flow_run_filter=runs)
            ):
                return
            time.sleep(0.5)
    raise AssertionError(f"task {task} of {flow_run_id} never ran")


def _task_state(team: Team, flow_run_id: str, task: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    with temporary_settings({PREFECT_API_URL: team.env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        (found,) = [t for t in client.read_task_runs(flow_run_filter=runs) if t.name.startswith(task)]
        return found.state


def _logs(team: Team, flow_run_id: str) -> str:
    return team.prefect("flow-run", "logs", flow_run_id).stdout


def _one_complete_version(team: Team, flow_run_id: str):
    client = team.mlflow()
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    (version,) = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    version = client.get_model_version(MODEL, version.version)
    assert version.tags["registration"] == "complete" and "promotion.decision" in version.tags
    assert all(v.tags.get("registration") != "incomplete" for v in client.search_model_versions(f"name = '{MODEL}'"))
    return version


def _finish(team: Team, flow_run_id: str):
    """The run's end; a failed or crashed one retried once (`prefect flow-run retry`), as a user would."""
    started = time.time()
    state = _wait_all(team, [flow_run_id])[flow_run_id].state
    print(f"  the run ended {state.name}" + (f" ({state.message[:160]})" if not state.is_completed() else ""))
    if not state.is_completed():
        team.prefect("flow-run", "retry", flow_run_id)
        state = _wait_all(team, [flow_run_id])[flow_run_id].state
        print(f"  `prefect flow-run retry`: {state.name} {time.time() - started:.0f} s later")
    assert state.is_completed(), state
    return state


@pytest.mark.full
def test_four_runs_at_once_on_a_pool_of_two(team, tmp_path):
    started = time.time()
    asked = {}
    for rows in (20, 26, 32, 38):
        overrides = {"data.rows": rows, **QUICK}
        asked[team.run_deployment(overrides)] = overrides
    runs = _wait_all(team, list(asked))
    print(f"four runs on two workers: {time.time() - started:.0f} s")
    assert all(r.state.is_completed() for r in runs.values()), {i: r.state for i, r in runs.items()}
    assert {_worker_of(team, i) for i in asked} == {"worker-1", "worker-2"}
    versions = _audit_versions(team, asked, runs)
    for n, version in enumerate(versions.values()):
        _pull_in_a_fresh_clone(team, version, tmp_path / f"clone-{n}")
    # The champion from the server: as the chat UI loads it (models:/chat-doctor-adapter@champion), and as GGUF.
    clone = tmp_path / "clone-0"
    # The registry on the server, as `chat-doctor-models` lists it.
    done = subprocess.run([BIN / "chat-doctor-models", "list"], cwd=clone, env=team.env, capture_output=True, text=True)
    assert done.returncode == 0 and "champion" in done.stdout, done.stdout + done.stderr
    # Its adapter comes down from the bucket through the tracking server.
    done = subprocess.run(
        [BIN / "chat-doctor-models", "download", "champion", "--to", str(tmp_path / "champion")],
        cwd=clone,
        env=team.env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert list((tmp_path / "champion").rglob("adapter_model.safetensors")), done.stdout
    chat = (
        "from pathlib import Path; from chat_doctor.config import load_config; "
        "from chat_doctor.serving.chat_model import load_chat_model, stream_answer; "
        "chat = load_chat_model('champion', load_config('params.yaml'), Path('chat-cache')); "
        "settings = {'max_new_tokens': 4, 'repetition_penalty': 1.0, 'temperature': 0.0, 'top_p': 1.0}; "
        "print(list(stream_answer(chat, 'I have a headache.', settings))[-1])"
    )
    done = subprocess.run([sys.executable, "-c", chat], cwd=clone, env=team.env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    export = [BIN / "chat-doctor-models", "export", "champion", "--gguf", str(tmp_path / "gguf"), "--types", "f16"]
    done = subprocess.run(export, cwd=clone, env=team.env, capture_output=True, text=True)
    assert done.returncode == 0 and list((tmp_path / "gguf").glob("*.gguf")), done.stdout + done.stderr[-3000:]
    _no_secret_anywhere(team)


@pytest.mark.full
def test_a_worker_killed_mid_training_is_retried_and_resumes_from_the_bucket(team):
    from chat_doctor.core import faults

    _workers(team, numbers=(1,), faults=faults.env(pause_after_save=3))
    before = set(team.objects("checkpoints/"))
    flow_run_id = team.run_deployment({"data.rows": 44, **QUICK, "train.max_steps": 6})
    deadline = time.time() + 600
    while not [k for k in set(team.objects("checkpoints/")) - before if k.endswith("checkpoint-3/.complete")]:
        assert time.time() < deadline, "checkpoint-3 never reached the bucket"
        time.sleep(1)
    _kill_machine(team, "worker-1")
    killed = time.time()
    print("worker-1 killed (SIGKILL, with its flow run) once checkpoint-3 was in the bucket")
    # The zombie-runs automation marks it Crashed once its heartbeats stop; the other machine retries it.
    crashed = _wait_all(team, [flow_run_id], timeout=400)[flow_run_id].state
    assert crashed.is_crashed(), crashed
    print(f"  Crashed {time.time() - killed:.0f} s later (no heartbeat: the zombie-runs automation)")
    _workers(team, numbers=(2,))
    retried = time.time()
    team.prefect("flow-run", "retry", flow_run_id)
    assert _wait_all(team, [flow_run_id])[flow_run_id].state.is_completed()
    print(f"  retried on worker-2: Completed {time.time() - retried:.0f} s later, resumed from checkpoint-3")
    logs = _logs(team, flow_run_id)
    assert "checkpoint-3" in logs and "downloaded from s3://chat-doctor/checkpoints/" in logs, logs[-3000:]
    version = _one_complete_version(team, flow_run_id)
    assert team.mlflow().get_run(version.run_id).data.tags["train.max_steps_used"] == "6"
    _workers(team)


@pytest.mark.full
def test_the_object_store_down_during_dvc_push_then_a_retry(team, tmp_path):
    from team.stack import _stop, start_object_store, wait_for_object_store

    flow_run_id = team.run_deployment({"data.rows": 50, **QUICK})
    # Down from the data step on (which makes the data locally), so version-data's `dvc push` meets it.
    _task_running(team, flow_run_id, "data")
    _stop(_stack(team), "s3")
    print("object store stopped while the data step ran")
    state = _wait_all(team, [flow_run_id])[flow_run_id].state
    assert state.is_failed(), state
    assert _task_state(team, flow_run_id, "version-data").is_failed()  # its push met the store down
    client = team.mlflow()  # nothing registered from the failed attempt
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    assert runs and not [v for r in runs for v in client.search_model_versions(f"run_id = '{r.info.run_id}'")]
    print(f"  the run Failed at version-data (`dvc push`): {state.message[:160]}; nothing registered")
    start_object_store(_stack(team), team.secrets)
    wait_for_object_store(_stack(team), team.secrets)
    _finish(team, flow_run_id)
    _pull_in_a_fresh_clone(team, _one_complete_version(team, flow_run_id), tmp_path / "clone")


@pytest.mark.full
def test_the_tracking_server_restarted_during_register(team):
    from chat_doctor.core import faults
    from team.stack import _stop, start_mlflow, wait_for_mlflow

    _workers(team, faults=faults.env(pause_in_register=20))
    flow_run_id = team.run_deployment({"data.rows": 56, **QUICK})
    client = team.mlflow()
    deadline = time.time() + 600
    while not [
        v for v in client.search_model_versions(f"name = '{MODEL}'") if v.tags.get("registration") == "incomplete"
    ]:
        assert time.time() < deadline, "register never created its version"
        time.sleep(0.5)
    _stop(_stack(team), "mlflow")
    print("MLflow server stopped for 5 s while register held its version `incomplete`")
    time.sleep(5)
    start_mlflow(_stack(team), team.secrets)
    wait_for_mlflow(_stack(team))
    _finish(team, flow_run_id)
    print(f"  v{_one_complete_version(team, flow_run_id).version}: registration complete, no incomplete version left")
    _workers(team)


@pytest.mark.full
def test_postgres_restarted_between_steps(team):
    from team.stack import postgres_bin

    flow_run_id = team.run_deployment({"data.rows": 62, **QUICK})
    _task_running(team, flow_run_id, "train")
    data = team.root / ".local" / "team" / "postgres"
    # With its log file, as the stack starts it: the server must not hold this call's output pipes open.
    log = data.parent / "postgres.log"
    command = [str(postgres_bin() / "pg_ctl"), "-D", str(data), "-l", str(log), "-m", "fast", "-w", "restart"]
    command = ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command
    assert subprocess.run(command, capture_output=True).returncode == 0
    print("PostgreSQL restarted (pg_ctl restart -m fast) while the train step ran")
    _finish(team, flow_run_id)
    _one_complete_version(team, flow_run_id)


@pytest.mark.full
def test_two_machines_train_one_run_through_the_pool(team):
    """train.nnodes: 2 (one process each, gloo): node 0 is the worker that runs the flow, node 1 a
    `train-node` flow run that the train step starts on the other worker; no shared folder between them."""
    flow_run_id = team.run_deployment({"data.rows": 68, **QUICK, "train.nnodes": 2, "train.gpus": 1})
    assert _wait_all(team, [flow_run_id])[flow_run_id].state.is_completed(), _logs(team, flow_run_id)[-3000:]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: team.env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        parent = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        (node,) = client.read_flow_runs(flow_run_filter=parent)
    assert node.parameters["node_rank"] == 1 and node.state.is_completed(), node.state
    # Two machines: node 1 ran on the worker that did not run node 0.
    assert {_worker_of(team, flow_run_id), _worker_of(team, str(node.id))} == {"worker-1", "worker-2"}
    node_log = _logs(team, str(node.id))
    assert "node 1 of 2 meets node 0 at 127.0.0.1:" in node_log, node_log[-3000:]
    version = _one_complete_version(team, flow_run_id)
    assert team.mlflow().get_run(version.run_id).data.tags["train.processes"] == "2"
    print(f"train.nnodes 2: node 0 on {_worker_of(team, flow_run_id)}, node 1 (a train-node flow run) on "
          f"{_worker_of(team, str(node.id))}; v{version.version} trained by 2 processes")  # fmt: skip


def _sweep(team: Team, grid: dict, overrides: dict) -> tuple[str, object]:
    done = team.prefect(
        "deployment", "run", "sweep/default", "--param", f"grid={json.dumps(grid)}",
        "--param", f"overrides={json.dumps(overrides)}",
    )  # fmt: skip
    flow_run_id = flow_run_id_of(done.stdout)
    return flow_run_id, _wait_all(team, [flow_run_id], timeout=1500)[flow_run_id]


def _finetune_runs(team: Team) -> set[str]:
    return {i for (i,) in team.sql("prefect", "SELECT f.id::text FROM flow_run f JOIN flow ON f.flow_id = flow.id "
                                               "WHERE flow.name = 'finetune'")}  # fmt: skip


def _artifacts(team: Team, flow_run_id: str) -> dict[str, str]:
    rows = team.sql("prefect", f"SELECT key, type, data::text FROM artifact WHERE flow_run_id = '{flow_run_id}'")
    return {key: (kind, data) for key, kind, data in rows if key}


@pytest.mark.full
def test_a_sweep_fans_out_over_the_pool_compares_and_reuses_its_trials(team, tmp_path):
    grid = {"lora.r": [4, 8], "train.learning_rate": [1e-3, 4e-3]}
    overrides = {"data.rows": 74, **QUICK, "train.logging_steps": 1}  # a logging step: tokens/s and memory
    before = _finetune_runs(team)
    started = time.time()
    sweep_id, sweep_run = _sweep(team, grid, overrides)
    print(f"sweep of 4 trials on two workers: {time.time() - started:.0f} s")
    assert sweep_run.state.is_completed(), _logs(team, sweep_id)[-3000:]
    trials = _finetune_runs(team) - before
    assert len(trials) == 4
    assert {_worker_of(team, i) for i in trials} == {"worker-1", "worker-2"}  # spread over the pool
    # MLflow: one parent, four children, each with its complete version; one data experiment for all.
    client = team.mlflow()
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(experiments, f"tags.`prefect.flow_run_id` = '{sweep_id}'")
    children = client.search_runs(experiments, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    assert {c.data.tags["prefect.flow_run_id"] for c in children} == trials
    points = {(c.data.params["lora.r"], float(c.data.params["train.learning_rate"])) for c in children}
    assert points == {(r, lr) for r in ("4", "8") for lr in (1e-3, 4e-3)}
    versions = [_one_complete_version(team, i) for i in trials]
    assert len({v.tags["dvc.experiment"] for v in versions}) == 1  # the data was made once, by the sweep
    assert "made once for the runs of these data settings" in _logs(team, next(iter(trials)))
    # The comparison: in the parent run (table, data, chart) and as Prefect artifacts.
    stored = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert stored == {"sweep/comparison.md", "sweep/comparison.json", "sweep/comparison.png"}
    rows = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "sweep/comparison.json", str(tmp_path))).read_text()
    )
    print(Path(client.download_artifacts(parent.info.run_id, "sweep/comparison.md", str(tmp_path))).read_text())
    assert [r["status"] for r in rows] == ["completed"] * 4
    assert all(isinstance(r["tuned"], float) and r["wall_s"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    artifacts = _artifacts(team, sweep_id)
    assert {"sweep-trials", "sweep-comparison", "sweep-chart"} <= set(artifacts)
    assert artifacts["sweep-chart"][1].startswith('"http') and "comparison.png" in artifacts["sweep-chart"][1]
    # The promotion rule in order of finishing: the champion is the last promoted version; when a trial
    # won, it is the best of the sweep and the summary says so.
    ordered = sorted(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    ordered = [client.get_model_version(MODEL, v.version) for v in ordered]
    promoted = [v for v in ordered if v.tags["promotion.decision"] == "promoted"]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == promoted[-1].version
    best = min(rows, key=lambda r: r["tuned"])  # loss: lower is better
    summary = _logs(team, sweep_id)
    if int(champion.version) in {r["version"] for r in rows}:
        assert int(champion.version) == best["version"]
        assert f"won: version {champion.version} is champion" in summary
    # The same sweep again: every trial is taken from the registry, nothing trains.
    count = len(ordered)
    again_id, again = _sweep(team, grid, overrides)
    assert again.state.is_completed()
    assert _finetune_runs(team) - before == trials  # no new trial ran
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == count
    assert "reused" in _logs(team, again_id) and "4 trials: 4 finished, 0 failed" in _logs(team, again_id)
    # A trial with an impossible setting fails alone, and is listed with its reason.
    bad_id, bad = _sweep(team, {"train.fp8": [False, True]}, {**overrides, "lora.r": 4})
    assert bad.state.is_completed()
    logs = _logs(team, bad_id)
    assert "2 trials: 1 finished, 1 failed" in logs, logs[-3000:]
    artifacts = _artifacts(team, bad_id)
    assert "train.fp8 = true" in artifacts["sweep-comparison"][1]


@pytest.mark.full
def test_cancelling_a_sweep_cancels_its_trials(team):
    """Three long trials on two workers: two running, one waiting for a worker. Cancelling the sweep
    (`prefect flow-run cancel`) cancels all three; none registers a version."""
    grid = {"train.learning_rate": [1e-3, 2e-3, 3e-3]}
    overrides = {"data.rows": 62, **QUICK, "train.max_steps": 400, "train.save_steps": 400}
    done = team.prefect(
        "deployment", "run", "sweep/default", "--param", f"grid={json.dumps(grid)}",
        "--param", f"overrides={json.dumps(overrides)}",
    )  # fmt: skip
    sweep_id = flow_run_id_of(done.stdout)

    def trials() -> dict[str, str]:
        query = f"SELECT id::text, state_type FROM flow_run WHERE tags::text LIKE '%sweep:{sweep_id}%'"
        return dict(team.sql("prefect", query))

    deadline = time.time() + 600
    while list(trials().values()).count("RUNNING") < 2:
        assert time.time() < deadline, trials()
        time.sleep(1)
    for flow_run_id, state in trials().items():
        if state == "RUNNING":
            _task_running(team, flow_run_id, "train")  # training, not still starting
    assert sorted(trials().values()) == ["RUNNING", "RUNNING", "SCHEDULED"], trials()
    team.prefect("flow-run", "cancel", sweep_id)
    runs = _wait_all(team, [sweep_id, *trials()], timeout=300)
    assert all(r.state.is_cancelled() for r in runs.values()), {i: r.state for i, r in runs.items()}
    client = team.mlflow()
    for flow_run_id in trials():
        for run in client.search_runs(
            [e.experiment_id for e in client.search_experiments()], f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
        ):
            assert not client.search_model_versions(f"run_id = '{run.info.run_id}'")
