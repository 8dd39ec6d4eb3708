"""Process helpers shared by the soak (bench/soak.py) and the tests: ports, servers, flow-run states."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mlflow_server_command(root: Path, port: int, mlflow: str | Path = "mlflow") -> list[str]:
    """`mlflow server` on the project's sqlite store, serving its artifacts, one worker, on loopback."""
    return [
        str(mlflow), "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "mlartifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip


def stop_when_idle(server: subprocess.Popen) -> None:
    """Stop a served deployment once its flow processes have exited: a runner stopped while a
    finished run's process is still exiting marks that run Cancelled."""
    import psutil

    def busy() -> list:
        # Not counted: a child that exited and awaits reaping, and multiprocessing's resource
        # tracker, which lives as long as the runner does.
        children = psutil.Process(server.pid).children()
        return [
            c
            for c in children
            if c.status() != psutil.STATUS_ZOMBIE and "multiprocessing.resource_tracker" not in " ".join(c.cmdline())
        ]

    deadline = time.time() + 60
    while busy() and time.time() < deadline:
        time.sleep(0.5)
    for child in busy():
        print(f"still running after 60 s, stopped with the deployment: {' '.join(child.cmdline())[:300]}")
    if os.getpgid(server.pid) == server.pid:
        os.killpg(server.pid, signal.SIGTERM)  # started in its own session: stop its workers too
    else:
        server.terminate()
    server.wait(timeout=60)


def task_states(flow_run_id: str) -> dict[str, str]:
    """{task name: state name} for the latest attempt of a flow run (a retry is a new attempt)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
    attempt = max((run.flow_run_run_count for run in runs), default=0)
    return {
        run.name.rsplit("-", 1)[0]: run.state.name if run.state else "Pending"
        for run in runs
        if run.flow_run_run_count == attempt
    }
