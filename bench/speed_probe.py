"""A Trainer callback that times training steps the same way for every recipe of bench/gpu_speed.py.

Only transformers and torch: the unsloth peer imports it from its own environment too.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Callable

from transformers import TrainerCallback

SYNC_WARNING = "called a synchronizing CUDA operation"  # torch.cuda.set_sync_debug_mode("warn")


class HostWaits:
    """Counts the host's waits on the GPU (a blocking copy, `.item()`, a stream synchronisation) with
    torch's sync debug mode, which warns at each one; the warnings are counted, not printed."""

    def __init__(self) -> None:
        self.count = 0
        self._show: Callable[..., None] | None = None

    def start(self) -> None:
        import torch

        self._show = show = warnings.showwarning

        def count(message, category, *args, **kwargs):
            if SYNC_WARNING in str(message):
                self.count += 1
            else:
                show(message, category, *args, **kwargs)

        warnings.showwarning = count
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}.*")
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        import torch

        torch.cuda.set_sync_debug_mode("default")
        if self._show is not None:
            warnings.showwarning = self._show


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class StepTimer(TrainerCallback):
    """Real tokens/s over the steps after `warmup` (in all, and the median and spread of the single
    optimizer steps), peak GPU memory, and the logged losses and grad norms."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.start: tuple[float, int] | None = None
        self.end: tuple[float, int] | None = None
        self.step_start: tuple[float, int] | None = None
        self.steps: list[tuple[float, int]] = []  # (seconds, real tokens) of each timed step
        self.train_start: float | None = None
        self.first_step_s: float | None = None  # the first optimizer step, compilation included
        self.waits: HostWaits | None = None  # over the timed steps, data loading between them included
        self.waited_steps = 0  # timed steps done when counting began

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_start = self._now()

    @staticmethod
    def _now() -> float:
        import torch

        if torch.cuda.is_available():
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)  # the timer's own wait is not counted
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(mode)
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.warmup:
            self.step_start = (self._now(), state.num_input_tokens_seen)
            if self.start is None:
                self.start = self.step_start

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step_s is None and self.train_start is not None:
            self.first_step_s = self._now() - self.train_start
        if self.step_start is None:
            return
        now = self._now()  # the step's tokens are counted micro-batch by micro-batch before this
        self.steps.append((now - self.step_start[0], state.num_input_tokens_seen - self.step_start[1]))
        if state.global_step == state.max_steps:
            self.end = (now, state.num_input_tokens_seen)
            if self.waits is not None:
                self.waits.stop()
        elif self.waits is None and torch_cuda():
            # Counted from the end of the first timed step to the end of the last: whole steps, each
            # with the loading of its batches.
            self.waits = HostWaits()
            self.waits.start()
            self.waited_steps = len(self.steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.losses.append(round(float(logs["loss"]), 4))
            self.grad_norms.append(round(float(logs.get("grad_norm", 0.0)), 4))

    def figures(self) -> dict:
        import torch

        seconds = self.end[0] - self.start[0]
        tokens = self.end[1] - self.start[1]
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        rates = sorted(t / s for s, t in self.steps)
        return {
            "tokens_per_s": round(tokens / seconds, 1),
            "timed_tokens": int(tokens),
            "timed_s": round(seconds, 2),
            "timed_steps": len(self.steps),
            "tokens_per_step": round(tokens / max(len(self.steps), 1)),
            # Per optimizer step (data loading between steps left out): the middle and the spread.
            "median_step_tokens_per_s": round(statistics.median(rates), 1),
            "step_tokens_per_s_p10_p90": [round(rates[len(rates) // 10], 1), round(rates[-1 - len(rates) // 10], 1)],
            "peak_gib": round(peak, 2),
            "first_step_s": round(self.first_step_s, 1) if self.first_step_s is not None else None,
            "host_waits_per_step": (
                round(self.waits.count / (len(self.steps) - self.waited_steps), 1)
                if self.waits and len(self.steps) > self.waited_steps
                else None
            ),
            "losses": self.losses,
            "grad_norms": self.grad_norms,
        }


RESULT = "RESULT "


def emit(figures: dict) -> None:
    """One line the parent process picks out of the child's output (last_result)."""
    print(RESULT + json.dumps(figures), flush=True)


def last_result(output: str) -> dict | None:
    """The figures of the child's last emit, or None."""
    found = [line for line in output.splitlines() if line.startswith(RESULT)]
    return json.loads(found[-1][len(RESULT) :]) if found else None
