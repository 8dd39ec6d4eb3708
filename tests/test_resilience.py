"""Training that survives: out-of-memory retried by Prefect with half the micro-batch and the same
effective batch (the shared run meets one: tests/test_flow.py), a stop with what to change when
micro-batch 1 does not fit, evaluation that halves its batch, and a SIGKILLed training resumed from
its last complete checkpoint."""

from pathlib import Path

import pytest

from chat_doctor.core import faults
from chat_doctor.training.callbacks import callbacks
from tests.conftest import QUICK_EVAL

STEPS = {"train.max_steps": 6, "train.save_steps": 2, "train.logging_steps": 1, **QUICK_EVAL}


def arm(monkeypatch, **armed) -> None:
    for name, value in faults.env(**armed).items():
        monkeypatch.setenv(name, value)


# Full tier: the flow gives up with what to change (in make test, tests/test_packing.py checks the
# message at micro-batch 1, and the shared run's out-of-memory shows Prefect retrying `train`).
@pytest.mark.full
def test_out_of_memory_at_micro_batch_one_says_what_to_change(project, prefect_server, monkeypatch):
    from flows.finetune import finetune

    arm(monkeypatch, oom_at_step=1)
    state = finetune(overrides={**STEPS, "train.micro_batch_size": 1, "train.grad_accum": 8}, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"out of memory at train\.micro_batch_size = 1.*tokenize\.max_length"):
        state.result()


@pytest.mark.slow
@pytest.mark.full
def test_sigkill_while_a_checkpoint_is_written_resumes_from_the_one_before(project, monkeypatch):
    """SIGKILL while checkpoint-4 is written: that checkpoint is left unmarked (a torn one), and the
    next attempt ignores it, resumes from checkpoint-2 and finishes."""
    from chat_doctor.config import load_config
    from chat_doctor.training.plan import COMPLETE
    from tasks.sample import run_sample
    from tasks.tokenize import run_tokenize
    from tasks.train import TrainingFailed, run_train

    arm(monkeypatch, kill_at_save=4)
    cfg = load_config("params.yaml", {"data.rows": 40, "lora.r": 4, **STEPS, "train.max_steps": 4})
    tokenized = run_tokenize(cfg.tokenize, cfg.model, run_sample(cfg.data))
    with pytest.raises(TrainingFailed, match="exit code -9"):
        run_train(cfg, tokenized)
    checkpoints = next(Path("runs").glob("run-*")) / "checkpoints"
    assert (checkpoints / "checkpoint-4").is_dir() and not (checkpoints / "checkpoint-4" / COMPLETE).exists()
    out = run_train(cfg, tokenized)  # a retry, as Prefect or the next deployment run makes it
    assert out.resumed_from.endswith("checkpoint-2")
    assert (checkpoints / "checkpoint-4" / COMPLETE).is_file()
    assert (out.run.adapter / "adapter_model.safetensors").is_file()


def test_evaluation_halves_its_batch_after_out_of_memory(monkeypatch, caplog):
    """Out-of-memory at eval batch 8: the work is redone at batch 4; at batch 1 it stops with a message."""
    from chat_doctor.evaluation.scoring import with_smaller_batches

    arm(monkeypatch, eval_oom_at_batch=8)
    sizes = []
    assert with_smaller_batches(lambda b: sizes.append(b) or b * 10, 8, "eval loss") == 40
    assert sizes == [4]
    assert "eval loss: out of memory, retrying with evaluate.batch_size 4" in caplog.text
    arm(monkeypatch, eval_oom_at_batch=1)
    with pytest.raises(RuntimeError, match=r"generation: out of memory at evaluate\.batch_size 1"):
        with_smaller_batches(lambda b: b, 1, "generation")


def test_faults_are_off_unless_armed_and_unknown_ones_are_refused(monkeypatch, tmp_path):
    """A normal run installs no fault hook; the old one-variable-per-fault names do nothing."""
    for old in ("CHAT_DOCTOR_OOM_AT_STEP", "CHAT_DOCTOR_KILL_AT_SAVE", "CHAT_DOCTOR_FAIL_AT_STEP"):
        monkeypatch.setenv(old, "1")
    monkeypatch.delenv(faults.FAULTS_ENV, raising=False)
    installed = [type(c).__name__ for c in callbacks(tmp_path, None)]
    assert faults.planned() == {} and installed == ["MlflowLogger", "Progress", "MarkComplete"]
    faults.eval_out_of_memory(1)  # nothing raised
    faults.kill_in_register(tmp_path)  # nothing killed
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="'oom_at=3' is not NAME=VALUE with NAME one of oom_at_step"):
        faults.env(oom_at=3)
    arm(monkeypatch, oom_at_step=3)
    assert "FaultInjector" in [type(c).__name__ for c in callbacks(tmp_path, None)]
