"""The training recipe, run inside the training process (one per GPU under torchrun):
setup -> train -> save. tasks/train.py launches it and handles out-of-memory.

Reads params sections `model`, `lora` and `train` from the attempt's resolved config. Resumes from
the last complete checkpoint in `runs/<run>/checkpoints/`; writes `runs/<run>/adapter/` atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from chat_doctor.config import Config, split_for_processes
from chat_doctor.files import atomic_dir
from chat_doctor.tracking import log_metrics
from chat_doctor.train_callbacks import callbacks, latest_checkpoint
from chat_doctor.trainer import build_trainer, is_main_process, sharded, world_size
from tasks.train import run_dir_for, steps_for_epochs


def _finished(resume: str | None, adapter: Path, max_steps: int) -> bool:
    # Resuming the Trainer at its last step would train one step more when that step ended mid-epoch.
    return bool(resume) and int(Path(resume).name.split("-")[1]) >= max_steps and adapter.is_dir()


def train_in_process(
    cfg: Config, tokenized: dict[str, str], mlflow_run_id: str | None = None, run_dir: Path | None = None
) -> dict[str, str]:
    """Train the LoRA adapter on the 4-bit base in this process (or in each data-parallel one).

    Under a multi-process launch every process trains its share of each step; the first one logs
    and writes the adapter.
    """
    # Setup: the steps, this process's share of each one, and where to resume from.
    run_dir = run_dir or run_dir_for(cfg, tokenized)
    if cfg.train.max_steps is None:  # called directly, not through run_train, which derives them
        cfg = steps_for_epochs(cfg, tokenized["train"])
    micro, accum = split_for_processes(cfg.train, world_size())
    share = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"micro_batch_size": micro, "grad_accum": accum})}
    )
    checkpoints, adapter = run_dir / "checkpoints", run_dir / "adapter"
    resume = latest_checkpoint(checkpoints)
    outputs = {"run_dir": str(run_dir), "adapter": str(adapter), "resumed_from": resume or ""}
    if _finished(resume, adapter, cfg.train.max_steps):
        print(f"training finished in {run_dir} before (checkpoint {Path(resume).name}); its adapter is reused")
        return outputs
    main = is_main_process()
    trainer = build_trainer(share, tokenized["train"], checkpoints, callbacks(run_dir, mlflow_run_id if main else None))

    # Train.
    result = trainer.train(resume_from_checkpoint=resume)

    # Save: the adapter, its tokenizer and the resolved config, all at once or not at all.
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if sharded(cfg) else None  # all processes
    if not main:
        return outputs
    if mlflow_run_id:
        figures = {"train/final_loss": result.training_loss, "train/runtime_s": result.metrics.get("train_runtime", 0)}
        log_metrics(mlflow_run_id, figures, step=trainer.state.global_step)
    with atomic_dir(adapter) as staging:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
            staging, state_dict=state_dict, safe_serialization=True
        )
        trainer.processing_class.save_pretrained(staging)
        (staging / "chat_doctor_config.json").write_text(json.dumps(cfg.model_dump(), indent=2, sort_keys=True))
    return outputs
