"""The training recipe, run in the training process (one per GPU under torchrun): setup -> train -> save.

    python -m chat_doctor.training.recipe runs/<run>/attempt.json

chat_doctor/training/launch.py starts it (the train step never imports it), reads each process's
outcome and turns out-of-memory into a retry. The attempt holds the resolved config (sections
`model`, `lora`, `train`), the tokenized data and the MLflow run. Resumes from the last complete
checkpoint in the run's `checkpoints/`; writes its `adapter/` atomically. Loads transformers: the
training process only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from chat_doctor.config import Config, split_for_processes
from chat_doctor.core.files import atomic_dir, write_json
from chat_doctor.core.layout import RunFolder
from chat_doctor.core.logs import get_logger
from chat_doctor.core.records import Tokenized, Trained
from chat_doctor.tracking.mlflow_runs import log_metrics, system_metrics
from chat_doctor.training.callbacks import callbacks
from chat_doctor.training.launch import is_oom
from chat_doctor.training.plan import finished, latest_checkpoint, run_folder_for, steps_for_epochs
from chat_doctor.training.trainer import build_trainer, is_main_process, sharded, world_size

logger = get_logger(__name__)


def train_in_process(
    cfg: Config, tokenized: Tokenized, run: RunFolder | None = None, mlflow_run_id: str | None = None
) -> Trained:
    """Train the LoRA adapter on the 4-bit base in this process (or in each data-parallel one).

    Under a multi-process launch every process trains its share of each step; the first one logs
    and writes the adapter.
    """
    # Setup: the steps, this process's share of each one, and where to resume from.
    run = run or run_folder_for(cfg, tokenized.train)
    if cfg.train.max_steps is None:  # called directly, not through run_train, which derives them
        cfg = steps_for_epochs(cfg, tokenized.train)
    assert cfg.train.max_steps is not None
    micro, accum = split_for_processes(cfg.train, world_size())
    share = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"micro_batch_size": micro, "grad_accum": accum})}
    )
    if done := finished(run, cfg.train.max_steps):  # called directly, not through run_train, which checks first
        logger.info("training finished in %s before (checkpoint %s); its adapter is reused", run.root, Path(done).name)
        return Trained(run=run, resumed_from=done)
    resume = latest_checkpoint(run.checkpoints)
    trained = Trained(run=run, resumed_from=resume or "")
    main = is_main_process()
    trainer = build_trainer(
        share, tokenized.train, run.checkpoints, callbacks(run.root, mlflow_run_id if main else None)
    )

    # Train.
    result = trainer.train(resume_from_checkpoint=resume)

    # Save: the adapter, its tokenizer and the resolved config, all at once or not at all.
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if sharded(cfg) else None  # all processes
    if not main:
        return trained
    if mlflow_run_id:
        figures = {"train/final_loss": result.training_loss, "train/runtime_s": result.metrics.get("train_runtime", 0)}
        log_metrics(mlflow_run_id, figures, step=trainer.state.global_step)
    with atomic_dir(run.adapter) as staging:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
            staging, state_dict=state_dict, safe_serialization=True
        )
        trainer.processing_class.save_pretrained(staging)
        (staging / "chat_doctor_config.json").write_text(json.dumps(cfg.model_dump(), indent=2, sort_keys=True))
    return trained


def _log_to_stdout() -> None:
    """chat-doctor's log lines on stdout, as plain lines: the launcher relays them into the step's log
    and reads the progress lines back."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("chat_doctor").addHandler(handler)


def recipe_main(attempt: Path) -> int:
    """One training attempt as `attempt` (runs/<run>/attempt.json) describes it.

    Under torchrun each process trains its share of each step and writes its outcome (rank 0 to
    outcome.json, the others to outcome-rank<N>.json), so an out-of-memory anywhere is seen.
    """
    _log_to_stdout()
    spec = json.loads(attempt.read_text())
    cfg = Config.model_validate(spec["config"])
    run = RunFolder(root=attempt.parent)
    rank = os.environ.get("RANK", "0")
    run_id = spec["mlflow_run_id"]
    # Each machine's first process samples its CPU/GPU/memory into the run (node ids tell them apart).
    node = cfg.train.node_rank if cfg.train.nnodes > 1 else None
    with system_metrics(run_id if os.environ.get("LOCAL_RANK", "0") == "0" else None, node):
        try:
            trained = train_in_process(cfg, Tokenized.model_validate(spec["tokenized"]), run, run_id)
            write_json(run.outcome(rank), trained.model_dump(mode="json"))
            return 0
        except Exception as err:
            write_json(run.outcome(rank), {"oom": is_oom(err), "error": f"{type(err).__name__}: {err}"})
            raise


if __name__ == "__main__":
    # Through the module's own name, so its logger is chat_doctor.training.recipe, not __main__.
    from chat_doctor.training import recipe

    sys.exit(recipe.recipe_main(Path(sys.argv[1])))
