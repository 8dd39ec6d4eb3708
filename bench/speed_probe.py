"""A Trainer callback that times training steps the same way for every recipe of bench/gpu_speed.py.

Only transformers and torch: the unsloth peer imports it from its own environment too.
"""

from __future__ import annotations

import json
import statistics
import time

from transformers import TrainerCallback


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

    @staticmethod
    def _now() -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.warmup:
            self.step_start = (self._now(), state.num_input_tokens_seen)
            if self.start is None:
                self.start = self.step_start

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_start is None:
            return
        now = self._now()  # the step's tokens are counted micro-batch by micro-batch before this
        self.steps.append((now - self.step_start[0], state.num_input_tokens_seen - self.step_start[1]))
        if state.global_step == state.max_steps:
            self.end = (now, state.num_input_tokens_seen)

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
