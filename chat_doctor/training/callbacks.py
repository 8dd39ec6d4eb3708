"""Trainer callbacks for the train step: MLflow logging, progress lines, completed-checkpoint markers
(and their upload to the team's checkpoint store), and the opt-in profiler. Imported by the training
process only (it loads transformers)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from chat_doctor.core import faults
from chat_doctor.core.logs import get_logger
from chat_doctor.tracking.mlflow_runs import log_metrics
from chat_doctor.training.checkpoint_store import upload
from chat_doctor.training.plan import COMPLETE

logger = get_logger(__name__)


def peak_memory_gib() -> float:
    """Peak GPU memory of this process, or its peak resident memory on a CPU."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class TokenRate:
    """Real tokens/s between successive updates (the tokens of all processes over this clock)."""

    def __init__(self, tokens: int) -> None:
        self.time, self.tokens = time.perf_counter(), tokens

    def update(self, tokens: int) -> float:
        now = time.perf_counter()
        rate = (tokens - self.tokens) / max(now - self.time, 1e-9)
        self.time, self.tokens = now, tokens
        return rate


class MarkComplete(TrainerCallback):
    """Trainer calls on_save after model, optimizer, scheduler, RNG and state are written."""

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return  # the first process writes the checkpoint and marks it
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        os.sync()
        (folder / COMPLETE).write_text(str(state.global_step))
        if stored := upload(folder):  # the team's object store: any machine can resume from it
            logger.info("checkpoint %s uploaded to %s", folder.name, stored)


class MlflowLogger(TrainerCallback):
    """Per logging step: loss, learning rate, grad norm, real (non-padding) tokens/s, peak memory.

    Kept beside transformers' MLflowCallback, which does not fit here: it is configured only by
    environment variables (MLFLOW_RUN_ID to join our run), logs every TrainingArguments field and the
    model config as ~150 more params into a run that already holds the whole config, names metrics
    without the `train/` prefix that the eval figures sit beside, and has no token rate or memory."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id, self.rate = run_id, TokenRate(0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        tokens = state.num_input_tokens_seen
        metrics = {f"train/{k}": v for k, v in logs.items() if k in ("loss", "learning_rate", "grad_norm")}
        if "loss" in logs and tokens > self.rate.tokens:
            metrics["train/tokens_per_s"] = self.rate.update(tokens)
            metrics["train/peak_memory_gib"] = peak_memory_gib()
        if self.run_id and metrics:
            log_metrics(self.run_id, metrics, step=state.global_step)


class Progress(TrainerCallback):
    """One plain line per logging step with real tokens/s (all processes) and an ETA, in the log
    (the training process's stdout); tasks/train.py reads these lines back (PROGRESS) for the Prefect
    progress artifact."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first_step = time.perf_counter(), state.global_step
        self.rate = TokenRate(state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        now = time.perf_counter()
        done = state.global_step - self.first_step
        per_step = (now - self.start) / max(done, 1)
        eta = int(per_step * (state.max_steps - state.global_step))
        tokens_per_s = self.rate.update(state.num_input_tokens_seen)
        logger.info(
            f"step {state.global_step}/{state.max_steps} ({100 * state.global_step // state.max_steps}%) "
            f"loss {logs['loss']:.4f}, {tokens_per_s:,.0f} tokens/s, ETA {eta // 60}:{eta % 60:02d}"
        )


class FaultInjector(TrainerCallback):
    """Opt-in training faults (chat_doctor/core/faults.py): out-of-memory or a failure at a step, a
    SIGKILL while a checkpoint is written. It comes before MarkComplete: on_save runs in list order,
    so a kill here leaves the checkpoint written but unmarked, as a crash mid-save would."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        step = state.global_step
        if faults.fires("oom_at_step", step, self.run_dir):
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at step {step} by {faults.FAULTS_ENV})")
        if faults.fires("fail_at_step", step, self.run_dir):
            raise RuntimeError(f"injected failure at step {step} ({faults.FAULTS_ENV})")

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and faults.fires("kill_at_save", state.global_step, self.run_dir):
            os.kill(os.getpid(), signal.SIGKILL)


class PauseAfterSave(TrainerCallback):
    """Opt-in: stops once checkpoint N is saved, marked and uploaded, so a test can kill the machine
    mid-training (after MarkComplete in the list)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and faults.fires("pause_after_save", state.global_step, self.run_dir):
            time.sleep(faults.PAUSE_AFTER_SAVE_SECONDS)


TRAINING_FAULTS = {"oom_at_step", "fail_at_step", "kill_at_save"}


def callbacks(run_dir: Path, run_id: str | None) -> list:
    # Fault injection only when one is armed (nothing on the production path), around MarkComplete.
    planned = faults.planned().keys()
    armed = [FaultInjector(run_dir)] if TRAINING_FAULTS & planned else []
    paused = [PauseAfterSave(run_dir)] if "pause_after_save" in planned else []
    return [MlflowLogger(run_id), Progress(), *armed, MarkComplete(), *paused]


PROFILE_ENV = "CHAT_DOCTOR_PROFILE"  # a folder: where the time of two training steps goes, per process
PROFILE_AFTER = 3  # steps left out first (allocator, kernel autotuning, first-step compilation)
PROFILE_STEPS = 2


class Profile(TrainerCallback):
    """torch.profiler over two steps; see profiler_callbacks."""

    profiler: Any = None  # a torch.profiler.profile while it records
    steps = 0

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_step_begin(self, args, state, control, **kwargs):
        import torch

        if state.global_step == PROFILE_AFTER and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self.steps += 1
            if self.steps == PROFILE_STEPS:
                self.write()

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self.write()

    def write(self) -> None:
        self.profiler.__exit__(None, None, None)
        out = Path(self.folder)
        out.mkdir(parents=True, exist_ok=True)
        rank = os.environ.get("RANK", "0")
        averages = self.profiler.key_averages()
        tables = [
            f"== {sort} ({self.steps} steps) ==\n{averages.table(sort_by=sort, row_limit=40)}"
            for sort in ("self_device_time_total", "self_cpu_time_total")
        ]
        (out / f"profile-rank{rank}.txt").write_text("\n\n".join(tables))
        if rank == "0":
            import gzip
            import tempfile

            with tempfile.NamedTemporaryFile(suffix=".json") as raw:
                self.profiler.export_chrome_trace(raw.name)
                with open(raw.name, "rb") as src, gzip.open(out / "trace-rank0.json.gz", "wb") as dst:
                    dst.write(src.read())
        self.profiler = None


def profiler_callbacks() -> list:
    """With CHAT_DOCTOR_PROFILE set: torch.profiler over steps 4-5 (as progress lines number them).

    Each process writes profile-rank<N>.txt (operators by GPU time and by CPU time) into that
    folder; the first also writes trace-rank0.json.gz, which ui.perfetto.dev opens. A run that
    ends sooner writes what it profiled.
    """
    folder = os.environ.get(PROFILE_ENV)
    if not folder:
        return []
    return [Profile(folder)]
