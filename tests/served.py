"""Helpers for tests that drive the served `finetune/default` deployment with the Prefect CLI, as
`make demo` serves it, and an MLflow tracking server they can kill and start again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from bench.processes import free_port, mlflow_server_command, stop_when_idle

BIN = Path(sys.executable).parent


@contextmanager
def served_deployment(api_url: str, limit: int = 1, **extra_env: str):
    """`python -m flows.deploy --limit LIMIT` in the current folder; yields the env for Prefect CLI calls."""
    env = {**os.environ, "PREFECT_API_URL": api_url, "PYTHONPATH": str(Path.cwd())}
    # An earlier test's deployment of the same name would answer `inspect` before this one is up.
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run([BIN / "prefect", "deployment", "delete", "finetune/default"], env=env, **quiet)
    # The runner looks for scheduled runs every second rather than every 10 (Prefect's default).
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.deploy", "--limit", str(limit)],
        env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1", **extra_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        inspect = [BIN / "prefect", "deployment", "inspect", "finetune/default"]
        while subprocess.run(inspect, env=env, **quiet).returncode:
            assert time.time() < deadline and server.poll() is None, "the deployment never appeared"
            time.sleep(1)
        yield env
    finally:
        stop_when_idle(server)


def run_deployment(env: dict, overrides: dict, watch: bool = True) -> subprocess.CompletedProcess:
    command = ["deployment", "run", "finetune/default", "--param", f"overrides={json.dumps(overrides)}"]
    command += ["--watch"] if watch else []
    return subprocess.run([BIN / "prefect", *command], env=env, capture_output=True, text=True, timeout=600)


def flow_run_state(flow_run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def wait_until_final(flow_run_id: str, timeout: float = 600):
    deadline = time.time() + timeout
    while not (state := flow_run_state(flow_run_id)).is_final():
        assert time.time() < deadline, f"flow run still {state.name}"
        time.sleep(1)
    return state


def retry_and_wait(env: dict, flow_run_id: str, timeout: float = 600):
    """`prefect flow-run retry` (the served deployment picks it up); the state it ends in."""
    assert subprocess.run([BIN / "prefect", "flow-run", "retry", flow_run_id], env=env).returncode == 0
    return wait_until_final(flow_run_id, timeout)


def flow_run_id_of(output: str) -> str:
    return re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)


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
