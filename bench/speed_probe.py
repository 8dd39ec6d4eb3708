"""A Trainer callback that times training steps the same way for every recipe of bench/gpu_speed.py.

Only transformers and torch: the unsloth peer imports it from its own environment too.
"""

from __future__ import annotations

import json
import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Real tokens/s over the steps after `warmup`, peak GPU memory, and the logged losses and grad norms."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.start: tuple[float, int] | None = None
        self.end: tuple[float, int] | None = None

    @staticmethod
    def _now() -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup and self.start is None:
            self.start = (self._now(), state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            self.end = (self._now(), state.num_input_tokens_seen)

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
        return {
            "tokens_per_s": round(tokens / seconds, 1),
            "timed_tokens": int(tokens),
            "timed_s": round(seconds, 2),
            "peak_gib": round(peak, 2),
            "losses": self.losses,
            "grad_norms": self.grad_norms,
        }


def emit(figures: dict) -> None:
    """One line the parent process picks out of the child's output."""
    print("RESULT " + json.dumps(figures), flush=True)
