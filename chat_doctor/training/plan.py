"""What a training will be before anything loads: its run folder and its number of steps."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from chat_doctor.config import Config, effective_batch, section_hash
from chat_doctor.core.files import content_hash
from chat_doctor.core.layout import RunFolder
from chat_doctor.core.logs import get_logger
from chat_doctor.data.tokenized import load_split

logger = get_logger(__name__)

COMPLETE = ".complete"  # written into a checkpoint folder once everything in it is on disk

# How the step is spread over GPUs and machines: the same training whatever they are, so a run can
# resume on another number of GPUs (the effective batch is kept).
LAUNCH_KEYS = {"gpus", "strategy", "nnodes", "node_rank", "rdzv_endpoint", "join"}


def run_folder_for(cfg: Config, train_split: Path) -> RunFolder:
    """The run folder: same data + same model/LoRA/train settings = same folder (so a rerun resumes).

    The micro-batch split is left out on purpose: after out-of-memory, micro_batch_size halves and
    grad_accum doubles, the effective batch stays, and training must resume in the same folder.
    """
    train = cfg.train.model_dump(exclude={"micro_batch_size", "grad_accum", *LAUNCH_KEYS})
    train["effective_batch"] = effective_batch(cfg.train)
    key = hashlib.sha256(json.dumps([section_hash(cfg.model, cfg.lora), train, content_hash(train_split)]).encode())
    return RunFolder(root=Path(cfg.runs_dir) / f"run-{key.hexdigest()[:12]}")


def latest_checkpoint(checkpoints: Path) -> str | None:
    """The newest checkpoint whose save finished; a folder cut short by a crash is not one."""
    if not checkpoints.is_dir():
        return None
    done = [p for p in checkpoints.glob("checkpoint-*") if (p / COMPLETE).is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[1]))) if done else None


def finished(run: RunFolder, max_steps: int) -> str | None:
    """The checkpoint a finished training of `max_steps` in `run` ended at (its adapter written), or None.

    Resuming the Trainer at its last step would train one step more when that step ended mid-epoch."""
    resume = latest_checkpoint(run.checkpoints)
    done = resume is not None and int(Path(resume).name.split("-")[1]) >= max_steps and run.adapter.is_dir()
    return resume if done else None


def steps_for_epochs(cfg: Config, train_split: Path) -> Config:
    """The config with train.max_steps derived from train.epochs (unchanged when epochs is not set)."""
    t = cfg.train
    if not t.epochs:
        return cfg
    import pyarrow.compute as pc

    from chat_doctor.training.packing import pack_rows  # torch: loaded only when epochs are derived

    lengths = pc.list_value_length(load_split(train_split).data.column("input_ids")).to_pylist()
    units = len(pack_rows(lengths, t.pack_length)) if t.pack_length else len(lengths)
    per_epoch = math.ceil(units / effective_batch(t))
    steps = max(1, math.ceil(t.epochs * per_epoch))
    what = f"{len(lengths):,} rows in {units:,} bins" if t.pack_length else f"{units:,} rows"
    logger.info(
        "train.epochs = %g: %d steps (%s, %d a step, %d an epoch)", t.epochs, steps, what, effective_batch(t), per_epoch
    )
    # The steps replace the epochs: what the training processes, the run folder and the saved
    # config see is the number of steps that really run.
    return cfg.model_copy(update={"train": t.model_copy(update={"max_steps": steps, "epochs": None})})
