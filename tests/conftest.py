"""Shared fixtures: a throw-away copy of the project (its own git, DVC, MLflow store and runs) and a
temporary Prefect server, so tests never touch the checkout's data, dvc.lock or mlflow.db."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# Prefect keeps results and cache records under PREFECT_HOME: give the tests their own.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="chat-doctor-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_ROWS = SHARED_DATA / "healthcaremagic_400"
QUICK_EVAL = {"evaluate.rows": 2, "evaluate.max_new_tokens": 8}  # a couple of short answers per model


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def copy_project(dest: Path) -> Path:
    """The committed and working-tree files of the project (what a fresh clone has), as a new repo."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in listed:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-qm", "copy")
    return dest


@pytest.fixture(autouse=True)
def _no_tracking_uri_left_behind():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; one test's store must not become the next's."""
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded base, built once per session (the copies below link to it)."""
    from chat_doctor.embedded import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-mistral")


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_model_dir) -> Path:
    """A fresh copy of the project as the working directory, with the tiny base already built."""
    root = copy_project(tmp_path / "project")
    (root / "models").mkdir()
    shutil.copytree(tiny_model_dir, root / "models" / "tiny-mistral")
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect server and database for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield PREFECT_API_URL.value()


def needs_real_rows():
    return pytest.mark.skipif(not REAL_ROWS.is_dir(), reason=f"{REAL_ROWS} is absent (real rows live outside the repo)")
