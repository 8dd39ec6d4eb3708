"""Opt-in fault injection, for the tests, the soak and demos of the retry paths. Off unless the
environment variable CHAT_DOCTOR_FAULTS names faults; nothing here runs in a normal run.

CHAT_DOCTOR_FAULTS=oom_at_step=3,kill_at_save=4 (comma-separated NAME=VALUE):
  oom_at_step=N        out-of-memory at the end of training step N
  fail_at_step=N       a plain failure at the end of training step N
  kill_at_save=N       SIGKILL while checkpoint N is written (before it is marked complete)
  kill_in_register=after-version   SIGKILL between creating a registry version and completing it
  pause_after_save=N   stop for 10 minutes once checkpoint N is saved (and uploaded): time to kill the machine
  pause_in_register=S  stop for S seconds between creating a registry version and completing it
  eval_oom_at_batch=N  out-of-memory whenever an evaluation batch has N rows

The training and registration faults fire once per run folder (a marker there records it), so the
retry that follows gets past them. Each fault says so in the log when it fires.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from chat_doctor.core.logs import get_logger

logger = get_logger(__name__)

FAULTS_ENV = "CHAT_DOCTOR_FAULTS"
NAMES = (
    "oom_at_step",
    "fail_at_step",
    "kill_at_save",
    "kill_in_register",
    "eval_oom_at_batch",
    "pause_after_save",
    "pause_in_register",
)
PAUSE_AFTER_SAVE_SECONDS = 600


def env(**faults: object) -> dict[str, str]:
    """The environment entry that arms `faults` in a process started with it (tests, the soak)."""
    text = ",".join(f"{name}={value}" for name, value in faults.items())
    planned(text)  # refuses unknown names here, not in the process that would ignore them
    return {FAULTS_ENV: text}


def planned(text: str | None = None) -> dict[str, str]:
    """{name: value} of the faults armed in this process ({} unless CHAT_DOCTOR_FAULTS is set)."""
    text = os.environ.get(FAULTS_ENV, "") if text is None else text
    faults = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in NAMES:
            raise ValueError(f"{FAULTS_ENV}: {item!r} is not NAME=VALUE with NAME one of {', '.join(NAMES)}")
        faults[name] = value
    return faults


def fires(name: str, value: object, run_dir: Path) -> bool:
    """True once per run folder, when fault `name` is armed with `value`."""
    if planned().get(name) != str(value):
        return False
    marker = run_dir / f".injected-{name}"
    if marker.exists():
        return False
    marker.touch()
    logger.warning("fault injection (%s): %s=%s", FAULTS_ENV, name, value)
    return True


def kill_in_register(run_dir: Path) -> None:
    """SIGKILL this process once, between creating a registry version and completing it."""
    if fires("kill_in_register", "after-version", run_dir):
        os.kill(os.getpid(), signal.SIGKILL)
    if (seconds := planned().get("pause_in_register")) and fires("pause_in_register", seconds, run_dir):
        time.sleep(float(seconds))


def eval_out_of_memory(batch_size: int) -> None:
    """Out-of-memory whenever an evaluation batch has the armed size (each time, not once)."""
    if planned().get("eval_oom_at_batch") == str(batch_size):
        import torch

        raise torch.OutOfMemoryError(f"out of memory (injected by {FAULTS_ENV} at batch {batch_size})")
