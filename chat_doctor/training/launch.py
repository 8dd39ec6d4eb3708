"""Starting one training attempt in its own process(es) and reading back how it ended.

The attempt runs `python -m chat_doctor.training.recipe runs/<run>/attempt.json` (under torchrun with
one process per GPU, or joining several machines): a child process, so that out-of-memory frees all
of its memory, and the only way the launcher reaches the recipe. Each process writes its outcome
beside the attempt; an out-of-memory anywhere becomes a retry with half the micro-batch.
"""

from __future__ import annotations

import json
import sys

from chat_doctor.config import Config
from chat_doctor.core.files import write_json
from chat_doctor.core.layout import RunFolder

RECIPE = "chat_doctor.training.recipe"


class OutOfMemory(RuntimeError):
    """Training ran out of memory; the next attempt uses half the micro-batch (see halve_micro_batch)."""


class TrainingFailed(RuntimeError):
    """Training failed for another reason (or was killed); retrying the same thing will not help."""


def is_oom(err: BaseException) -> bool:
    import torch

    text = str(err).lower()
    return (
        isinstance(err, torch.OutOfMemoryError | MemoryError)
        or "out of memory" in text
        or ("can't allocate memory" in text)
    )


def apply_micro_batch(cfg: Config, run: RunFolder) -> Config:
    """The config with the micro-batch an earlier out-of-memory attempt left for this run folder."""
    if not run.micro_batch.is_file():
        return cfg
    split = json.loads(run.micro_batch.read_text())
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=split)})


def halve_micro_batch(cfg: Config, run: RunFolder, error: str) -> str:
    """Record half the micro-batch and twice the accumulation (same effective batch) for the retry."""
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    if micro == 1:
        shorter = "train.pack_length (and tokenize.max_length)" if cfg.train.pack_length else "tokenize.max_length"
        raise TrainingFailed(
            f"out of memory at train.micro_batch_size = 1 ({error}); lower {shorter}, set "
            "train.gradient_checkpointing: true, or use a GPU with more memory"
        )
    write_json(run.micro_batch, {"micro_batch_size": micro // 2, "grad_accum": accum * 2})
    return f"out of memory at micro-batch {micro}: the retry uses {micro // 2} x {accum * 2} (same effective batch)"


def processes(cfg: Config) -> int:
    """Data-parallel processes on this machine: train.gpus, or every visible GPU for `auto`."""
    if cfg.train.gpus != "auto":
        return cfg.train.gpus
    import torch

    return max(torch.cuda.device_count(), 1)


def launch_command(cfg: Config, run: RunFolder) -> list[str]:
    """The child process(es) for one attempt: one process, or torchrun with one process per GPU."""
    per_node = processes(cfg)
    if per_node * cfg.train.nnodes == 1:
        return [sys.executable, "-m", RECIPE, str(run.attempt)]
    t = cfg.train
    # One machine: a private rendezvous on a free port (two trainings can share a host).
    meet = ["--standalone"] if t.nnodes == 1 else [
        f"--nnodes={t.nnodes}", f"--node-rank={t.node_rank}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={t.rdzv_endpoint}",
    ]  # fmt: skip
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={per_node}", *meet,
            "-m", RECIPE, str(run.attempt)]  # fmt: skip


def clear_outcomes(run: RunFolder) -> None:
    for old in run.root.glob("outcome*.json"):
        old.unlink()


def outcomes(run: RunFolder) -> list[dict]:
    """What each process of the last attempt reported (rank 0 first)."""
    files = sorted(run.root.glob("outcome*.json"), key=lambda p: p != run.outcome(0))
    return [json.loads(p.read_text()) for p in files]
