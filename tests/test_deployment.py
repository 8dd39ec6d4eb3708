"""The `finetune/default` deployment, served as `make demo` serves it, run with the Prefect CLI and
overrides passed as a deployment parameter."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from chat_doctor.tracking import tracking_uri

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_deployment_run_with_overrides(project, prefect_server, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PYTHONPATH": str(project)}
    source = tmp_path / "my_rows.jsonl"
    rows = Path("data/raw/synthetic_healthcaremagic.jsonl").read_text().splitlines()[:120]
    source.write_text("\n".join(rows) + "\n")
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.deploy"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.time() + 120
        while subprocess.run([BIN / "prefect", "deployment", "inspect", "finetune/default"], env=env).returncode:
            assert time.time() < deadline and server.poll() is None, "the deployment never appeared"
            time.sleep(2)
        overrides = {"data.source": str(source), "data.rows": 100, "train.max_steps": 4, "evaluate.samples": 1}
        run = subprocess.run(
            [
                BIN / "prefect",
                "deployment",
                "run",
                "finetune/default",
                "--watch",
                "--param",
                f"overrides={json.dumps(overrides)}",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Completed" in run.stdout
    client = mlflow.MlflowClient(tracking_uri())
    version = client.get_model_version_by_alias("chat-doctor-adapter", "candidate")
    params = client.get_run(version.run_id).data.params
    assert params["data.source"] == str(source) and params["train.max_steps"] == "4"
    report = json.loads(Path("data/processed/report.json").read_text())
    assert (report["source_rows"], report["train_rows"]) == (120, 90)
