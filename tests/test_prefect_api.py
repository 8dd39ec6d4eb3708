"""Command-line flow runs find a Prefect server without the user's profile being changed: the
configured one (which must answer), else the project's while it answers, else a temporary one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.processes import free_port

REPO = Path(__file__).resolve().parents[1]
CHOOSE = "from flows.finetune import api_url_for_this_run as f; print('->', f())"  # as the flow CLI runs it


def choose(folder: Path, **env: str) -> subprocess.CompletedProcess:
    """The choice in a fresh process in `folder`, with a Prefect home (and profile) of its own."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env = {**clean, "PREFECT_HOME": str(folder / "prefect-home"), "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", CHOOSE], cwd=folder, env=env, capture_output=True, text=True)


def record(folder: Path, url: str) -> None:
    (folder / ".local").mkdir()
    (folder / ".local" / "prefect-api-url").write_text(url + "\n")


def test_no_server_recorded_or_configured_means_a_temporary_one(tmp_path):
    done = choose(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "-> None" in done.stdout and "a temporary server for this run" in done.stdout + done.stderr


def test_the_project_server_is_used_while_it_answers_and_not_once_stopped(tmp_path, prefect_server):
    record(tmp_path, prefect_server)
    done = choose(tmp_path)
    assert (
        f"this project's server at {prefect_server}" in done.stdout + done.stderr
        and f"-> {prefect_server}" in done.stdout
    )
    (tmp_path / ".local" / "prefect-api-url").write_text(f"http://127.0.0.1:{free_port()}/api\n")  # after make stop
    done = choose(tmp_path)
    assert done.returncode == 0 and "-> None" in done.stdout, done.stdout + done.stderr


def test_a_configured_server_that_does_not_answer_says_how_to_go_on(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/api"
    done = choose(tmp_path, PREFECT_API_URL=dead)
    assert done.returncode != 0
    assert f"PREFECT_API_URL = {dead} does not answer" in done.stderr and "unset PREFECT_API_URL" in done.stderr


@pytest.mark.full
def test_a_flow_run_from_the_command_line_after_make_stop(project):
    """`make demo`, `make stop`, then `python -m flows.finetune train.max_steps=2` as the README says."""
    record(project, f"http://127.0.0.1:{free_port()}/api")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env = {**env, "PYTHONPATH": str(project)}
    overrides = ["train.max_steps=2", "evaluate.rows=2", "evaluate.max_new_tokens=8"]
    command = [sys.executable, "-m", "flows.finetune", *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "a temporary server for this run" in done.stdout + done.stderr and "'version': 1" in done.stdout
    assert "Failed to send telemetry" not in done.stdout + done.stderr  # analytics off (pyproject.toml)
