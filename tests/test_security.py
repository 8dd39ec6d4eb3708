"""Security: the hub token never leaves the environment; weights load from safetensors (or torch's
weights_only loader) only, so a pickle cannot run code; remote code stays off unless set. (The chat
UI's loopback binding, login and input limit are tested in test_chat.py; config-chosen output paths
outside runs/ in test_bad_inputs.py.)"""

import base64
import json
import os
import pickle
import shutil
from pathlib import Path

import mlflow
import pytest

from chat_doctor.config import build_config
from chat_doctor.tracking.mlflow_runs import tracking_uri
from tests.conftest import PLANTED_TOKEN

TOKEN = PLANTED_TOKEN  # in the environment of the shared run (tests/conftest.py)


class Payload:
    """Unpickling this runs code: it creates the file `target`."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def poisoned(path: Path, target: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(target)))


def _bytes(path: Path) -> bytes:
    return path.read_bytes() if path.is_file() else b""


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
        return True
    except ValueError:
        return False


def _files_with(root: Path, secret: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if secret in _bytes(p)]


@pytest.mark.slow
def test_hub_token_is_never_written_to_logs_params_tags_or_artifacts(shared):
    """The shared run's two flow runs had a hub token in their environment (tests/conftest.py)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterFlowRunId

    secret = TOKEN.encode()
    # Every file the runs wrote: MLflow store and artifacts, checkpoints (training_args.bin too),
    # adapter, merged model, eval outputs, data, DVC remote and lock, and Prefect's stored results.
    assert [str(p) for p in Path(".").rglob("*") if ".git" not in p.parts and secret in _bytes(p)] == []
    prefect_home = Path(os.environ["PREFECT_HOME"])
    assert _files_with(prefect_home, secret) == []
    # Prefect keeps a failed step's exception as a base64 pickle: those are read decoded.
    records = [p for p in (prefect_home / "storage").rglob("*") if p.is_file()]
    assert [p for p in records if not _is_json(p) and secret in base64.b64decode(p.read_bytes())] == []
    # What the servers hold: Prefect logs, artifacts and parameters; MLflow params, tags, version tags.
    flow_run_ids = [state.state_details.flow_run_id for state in (shared.first, shared.second)]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)))
        artifacts = client.read_artifacts()
        flow_runs = [client.read_flow_run(flow_run_id) for flow_run_id in flow_run_ids]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": flow_run_ids}))
    assert logs and artifacts and len(tasks) >= 2 * 9
    held = [log.message for log in logs] + [json.dumps(a.data, default=str) for a in artifacts]
    held += [json.dumps(f.parameters) for f in flow_runs] + [json.dumps(t.task_inputs, default=str) for t in tasks]
    assert not [text for text in held if TOKEN in text]
    tracking = mlflow.MlflowClient(tracking_uri())
    runs = tracking.search_runs([e.experiment_id for e in tracking.search_experiments()])
    versions = tracking.search_model_versions("name = 'chat-doctor-adapter'")
    assert len(runs) == 2 and len(versions) == 2
    exposed = [{**run.data.params, **run.data.tags} for run in runs]
    exposed += [{**version.tags, "description": version.description} for version in versions]
    assert [key for fields in exposed for key, value in fields.items() if TOKEN in str(value)] == []
    # The results of completed steps are stored as JSON (paths and ids), not pickles.
    results = [json.loads(p.read_text()) for p in records if _is_json(p)]
    assert results and {r["metadata"]["serializer"]["type"] for r in results} == {"json"}


def test_a_token_given_as_config_is_refused_and_not_echoed(monkeypatch):
    from chat_doctor.config import ConfigError

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ConfigError) as err:
        build_config({"model": {"hub_token": TOKEN}})
    assert "unknown key `model.hub_token`" in str(err.value) and "HF_TOKEN" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_config({"model": {"base": f"https://user:{TOKEN}@example.org/model"}})
    assert TOKEN not in str(err.value) and "***" in str(err.value)


def test_an_adapter_offered_only_as_a_pickle_is_refused_unopened(tmp_path):
    from chat_doctor.models.loading import UnsafeWeights, load_adapter, load_base_model
    from chat_doctor.serving.chat_model import load_chat_model

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    ran = tmp_path / "payload-ran"
    poisoned(adapter / "adapter_model.bin", ran)
    cfg = build_config({})
    with pytest.raises(UnsafeWeights, match=r"no adapter_model.safetensors \(\['adapter_model.bin'\]\)"):
        load_adapter(load_base_model(cfg.model, quantized=False), adapter)
    with pytest.raises(UnsafeWeights):
        load_chat_model(str(adapter), cfg, tmp_path / "cache")
    assert not ran.exists()


@pytest.mark.slow
def test_resuming_from_a_poisoned_checkpoint_does_not_run_its_pickles(project, tmp_path):
    """Trainer state files are loaded with weights_only=True: a planted pickle fails to load, unrun."""
    from chat_doctor.config import load_config
    from chat_doctor.training.plan import COMPLETE
    from chat_doctor.training.recipe import train_in_process
    from tasks.sample import run_sample
    from tasks.tokenize import run_tokenize

    cfg = load_config("params.yaml", {"train.max_steps": 2, "train.save_steps": 1})
    tokenized = run_tokenize(cfg.tokenize, cfg.model, run_sample(cfg.data))
    run_dir = train_in_process(cfg, tokenized).run.root
    # As if killed after checkpoint-1: the later checkpoint and the adapter never got written.
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-2")
    shutil.rmtree(run_dir / "adapter")
    checkpoint = run_dir / "checkpoints" / "checkpoint-1"
    assert (checkpoint / COMPLETE).is_file()
    ran = tmp_path / "payload-ran"
    for name in ("rng_state.pth", "optimizer.pt", "scheduler.pt"):
        poisoned(checkpoint / name, ran)
    with pytest.raises(Exception, match=r"Weights only load failed|weights_only"):
        train_in_process(cfg, tokenized)  # same settings: resumes from checkpoint-1
    assert not ran.exists()


def test_remote_code_in_a_model_folder_is_not_run_by_default(tmp_path, tiny_model_dir):
    from chat_doctor.models.loading import load_base_model

    folder = tmp_path / "model-with-code"
    shutil.copytree(tiny_model_dir, folder)
    ran = tmp_path / "remote-code-ran"
    code = f"open({str(ran)!r}, 'w').close()\nfrom transformers import MistralForCausalLM as EvilModel\n"
    (folder / "evil.py").write_text(code)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    cfg = build_config({"model": {"base": str(folder)}})
    assert cfg.model.trust_remote_code is False
    model = load_base_model(cfg.model, quantized=False)
    assert type(model).__name__ == "MistralForCausalLM" and not ran.exists()


def test_the_team_secrets_are_masked_in_messages(monkeypatch):
    """The object store's keys, the database password and a URL's password, wherever a message shows them."""
    from chat_doctor.config import ConfigError, redact

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY")
    monkeypatch.setenv("CHAT_DOCTOR_DB_PASSWORD", "s3cr3t-db-pass")
    text = redact(
        "boto3 said wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY; db s3cr3t-db-pass; "
        "postgresql+psycopg2://chatdoctor:other-pass@10.0.0.5:5432/mlflow http://u:pw123@mlflow:5001 s3://bucket/x"
    )
    assert text == (
        "boto3 said ***; db ***; postgresql+psycopg2://chatdoctor:***@10.0.0.5:5432/mlflow http://u:***@mlflow:5001 "
        "s3://bucket/x"
    )
    for key in ("aws_secret_access_key", "aws_access_key_id", "db_password"):
        with pytest.raises(ConfigError, match=f"unknown key `data.{key}`: secrets never go in params.yaml"):
            build_config({"data": {key: "x"}})
