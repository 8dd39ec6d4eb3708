"""Shared fixtures: a throw-away copy of the project (its own git, DVC, MLflow store and runs), a
temporary Prefect server, and one project the flow has run in (`shared_run`) for the many tests
that only read what a run leaves behind. Tests never touch the checkout's data, dvc.lock or mlflow.db.

Tiers: `make test` runs everything but the tests marked `full` (each of those proves again, through
another door, something a `make test` test proves too); `make test-all` runs them all."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from chat_doctor.config.presets import QUICK_EVAL  # noqa: F401  (tests import it from here)

# Prefect keeps results and cache records under PREFECT_HOME: give the tests their own.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="chat-doctor-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_ROWS = SHARED_DATA / "healthcaremagic_400"
TEST_PRESET = "cpu-tiny"


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def copy_project(dest: Path, preset: str | None = TEST_PRESET) -> Path:
    """The committed and working-tree files of the project (what a fresh clone has), as a new repo,
    with params.yaml's preset set to the tests' own (None: as shipped)."""
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
    # The tests run on the tiny random Mistral (every code path in seconds), not the demo's model.
    if preset:
        params = dest / "params.yaml"
        params.write_text(re.sub(r"(?m)^preset: .*$", f"preset: {preset}", params.read_text()))
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
    from chat_doctor.models.embedded import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-mistral")


def new_project(dest: Path, tiny_model_dir: Path) -> Path:
    """A copy of the project at `dest` with the tiny base already built."""
    root = copy_project(dest)
    (root / "models").mkdir()
    shutil.copytree(tiny_model_dir, root / "models" / "tiny-mistral")
    return root


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_model_dir) -> Path:
    """A fresh copy of the project as the working directory, with the tiny base already built."""
    root = new_project(tmp_path / "project", tiny_model_dir)
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


# The shared run: 10 steps, checkpoints every 5, four short answers per model.
FAST = {
    "train.max_steps": 10,
    "train.logging_steps": 2,
    "train.save_steps": 5,
    "evaluate.rows": 4,
    "evaluate.max_new_tokens": 16,
}
SHORTER = {**FAST, "train.max_steps": 2}  # the second run: fewer steps, so a worse adapter
PLANTED_TOKEN = "hf_" + "PlantedSecretToken" * 2  # in the environment of the shared run, never to be written
OOM_STEP = 7  # out-of-memory injected there in the first run: retried at half the micro-batch from checkpoint-5


@dataclass(frozen=True)
class SharedRun:
    root: Path
    first: object  # the flow run's final state (v1, champion)
    second: object  # the same data, fewer steps (v2, candidate only)
    base_hash: str  # the tiny base's content hash before anything trained on it
    run_dir: Path  # the first run's folder: checkpoints, adapter, merged model, eval
    eval_dir: Path  # the first run's evaluation: report, samples, summary, chart

    @property
    def processed(self) -> Path:
        """Both runs' processed rows (one folder: the same data), relative to the project."""
        (folder,) = (self.root / "runs" / "data").glob("processed-*")
        return folder.relative_to(self.root)

    @property
    def tokenized(self) -> Path:
        (folder,) = (self.root / "runs" / "data").glob("tokenized-*")
        return folder.relative_to(self.root)


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory, tiny_model_dir, prefect_server) -> SharedRun:
    """The flow run twice in one project, under the session's Prefect server, as a user would.

    Run 1 (FAST) has a hub token in its environment and meets an injected out-of-memory at step 7
    (Prefect retries `train` at half the micro-batch, resuming from checkpoint-5): it registers v1,
    champion. Run 2 (SHORTER) gets its data from DVC's run cache (its own experiment, the same data)
    and registers v2, which does not beat v1 and stays candidate. Tests only read this project; one
    that changes the registry puts it back, and one that needs to write works on a copy
    (`copy_of_shared`).
    """
    from chat_doctor.core import faults
    from chat_doctor.core.files import content_hash
    from flows.finetune import finetune

    root = new_project(tmp_path_factory.mktemp("shared") / "project", tiny_model_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        base_hash = content_hash(root / "models" / "tiny-mistral")
        patch.setenv("HF_TOKEN", PLANTED_TOKEN)
        patch.setenv("HUGGING_FACE_HUB_TOKEN", PLANTED_TOKEN)
        with pytest.MonkeyPatch.context() as armed:
            for name, value in faults.env(oom_at_step=OOM_STEP).items():
                armed.setenv(name, value)
            first = finetune(overrides=FAST, return_state=True)
        assert first.is_completed(), first.message
        (run_dir,) = [p.parent.parent for p in (root / "runs").glob("run-*/checkpoints/checkpoint-10")]
        (eval_dir,) = (run_dir / "eval").iterdir()
        second = finetune(overrides=SHORTER, return_state=True)
        assert second.is_completed(), second.message
    return SharedRun(root, first, second, base_hash, run_dir, eval_dir)


@pytest.fixture
def shared(shared_run, monkeypatch) -> SharedRun:
    """The shared run's project as the working directory (read it, do not change it)."""
    monkeypatch.chdir(shared_run.root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return shared_run


def copy_of_shared(shared_run: SharedRun, dest: Path) -> Path:
    """A copy of the shared project to change (its MLflow store still points at the original's
    artifacts, which a copy only reads)."""
    return Path(shutil.copytree(shared_run.root, dest, symlinks=True))


def data_folders(tags: dict) -> tuple[Path, Path]:
    """The processed and tokenized folders a run trained on, from its lineage tags."""
    return tuple(  # type: ignore[return-value]
        Path("runs/data") / f"{Path(out).name}-{tags[f'dvc.{out}'].removesuffix('.dir')}"
        for out in ("data/processed", "data/tokenized")
    )


def experiment_params(tags: dict) -> dict:
    """params.yaml as the run's DVC experiment holds it."""
    import yaml

    rev = tags["dvc.experiment_rev"]
    shown = subprocess.run(["git", "show", f"{rev}:params.yaml"], capture_output=True, text=True, check=True)
    return yaml.safe_load(shown.stdout)


def needs_real_rows():
    return pytest.mark.skipif(not REAL_ROWS.is_dir(), reason=f"{REAL_ROWS} is absent (real rows live outside the repo)")
