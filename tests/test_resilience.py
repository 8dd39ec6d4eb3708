"""Training that survives: out-of-memory retried by Prefect with half the micro-batch and the same
effective batch, and a SIGKILLed training resumed from its last complete checkpoint."""

import json
from pathlib import Path

import mlflow
import pytest

from bench.processes import task_states
from chat_doctor.tracking import tracking_uri
from tests.conftest import QUICK_EVAL

pytestmark = pytest.mark.slow
STEPS = {"train.max_steps": 6, "train.save_steps": 2, "train.logging_steps": 1, **QUICK_EVAL}


def _run(client):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time ASC"])
    return runs


def test_oom_is_retried_with_half_the_micro_batch_and_resumes(project, prefect_server, monkeypatch):
    from flows.finetune import finetune

    monkeypatch.setenv("CHAT_DOCTOR_OOM_AT_STEP", "3")
    overrides = {**STEPS, "train.micro_batch_size": 4, "train.grad_accum": 2}
    state = finetune(overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    client = mlflow.MlflowClient(tracking_uri())
    (run,) = _run(client)
    assert run.data.tags["train.micro_batch_size_used"] == "2" and run.data.tags["train.grad_accum_used"] == "4"
    # No gap and no restart: steps 1-2 from the first attempt, 3-6 resumed from checkpoint-2.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    run_dir = next(Path("runs").glob("run-*"))
    last_attempt = json.loads((run_dir / "attempt.json").read_text())["config"]["train"]
    assert (last_attempt["micro_batch_size"], last_attempt["grad_accum"]) == (2, 4)
    assert json.loads((run_dir / "micro_batch.json").read_text()) == {"micro_batch_size": 2, "grad_accum": 4}
    assert task_states(state.state_details.flow_run_id)["train"] == "Completed"


def test_out_of_memory_at_micro_batch_one_says_what_to_change(project, prefect_server, monkeypatch):
    from flows.finetune import finetune

    monkeypatch.setenv("CHAT_DOCTOR_OOM_AT_STEP", "1")
    state = finetune(overrides={**STEPS, "train.micro_batch_size": 1, "train.grad_accum": 8}, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"out of memory at train\.micro_batch_size = 1.*tokenize\.max_length"):
        state.result()


def test_evaluation_halves_its_batch_after_out_of_memory(monkeypatch, capsys):
    """Out-of-memory at eval batch 8: the work is redone at batch 4; at batch 1 it stops with a message."""
    from tasks.evaluate import with_smaller_batches

    monkeypatch.setenv("CHAT_DOCTOR_EVAL_OOM_AT_BATCH", "8")
    sizes = []
    assert with_smaller_batches(lambda b: sizes.append(b) or b * 10, 8, "eval loss") == 40
    assert sizes == [4]
    assert "eval loss: out of memory, retrying with evaluate.batch_size 4" in capsys.readouterr().out
    monkeypatch.setenv("CHAT_DOCTOR_EVAL_OOM_AT_BATCH", "1")
    with pytest.raises(RuntimeError, match=r"generation: out of memory at evaluate\.batch_size 1"):
        with_smaller_batches(lambda b: b, 1, "generation")
