"""Step `train`: QLoRA fine-tuning of the base on the tokenized train split.

Reads params sections `model`, `lora` and `train`. Input: `data/tokenized/train.arrow`. Outputs in
`runs/<run>/` where <run> is a hash of the training data and those sections, so re-running the same
training finds its own checkpoints and resumes: `checkpoints/checkpoint-N/` every `train.save_steps`
and `adapter/` (PEFT safetensors + tokenizer + the resolved config), written atomically at the end.
Train loss, learning rate, grad norm and tokens/s go to the MLflow run per logging step.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

from chat_doctor.config import Config, effective_batch, section_hash
from chat_doctor.files import atomic_dir, content_hash, write_json
from chat_doctor.modeling import device, load_base_model, load_tokenizer, resolve_dtype
from chat_doctor.tokenized import IGNORE_INDEX, load_split
from chat_doctor.tracking import log_metrics, set_tags
from chat_doctor.train_callbacks import callbacks, latest_checkpoint


def run_dir_for(cfg: Config, tokenized: dict[str, str]) -> Path:
    """The run folder: same data + same model/LoRA/train settings = same folder (so a rerun resumes).

    The micro-batch split is left out on purpose: after out-of-memory, micro_batch_size halves and
    grad_accum doubles, the effective batch stays, and training must resume in the same folder.
    """
    train = cfg.train.model_dump(exclude={"micro_batch_size", "grad_accum"})
    train["effective_batch"] = effective_batch(cfg.train)
    key = hashlib.sha256(
        json.dumps([section_hash(cfg.model, cfg.lora), train, content_hash(Path(tokenized["train"]))]).encode()
    )
    return Path(cfg.runs_dir) / f"run-{key.hexdigest()[:12]}"


def _optimizer(name: str) -> str:
    if name != "auto":
        return name
    return "paged_adamw_8bit" if device() == "cuda" else "adamw_torch"


def _training_args(cfg: Config, output_dir: Path):
    from transformers import TrainingArguments

    t = cfg.train
    dtype = resolve_dtype(cfg.model.compute_dtype)
    on_cuda = device() == "cuda"
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=math.ceil(t.warmup_ratio * t.max_steps),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=_optimizer(t.optim),
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=on_cuda and str(dtype) == "torch.bfloat16",
        fp16=on_cuda and str(dtype) == "torch.float16",
        use_cpu=not on_cuda,
        # Rows of similar length share a micro-batch: far less padding than random batches.
        train_sampling_strategy="group_by_length",
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
    )


def _collator(cfg: Config, tokenizer):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if cfg.train.packing:
        # One row of concatenated examples; the first label of each example is masked so no
        # example learns to predict across the boundary.
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    # Pads ids with the pad token and labels with IGNORE_INDEX, so EOS labels stay trained.
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8)


def train_in_process(cfg: Config, tokenized: dict[str, str], mlflow_run_id: str | None = None) -> dict[str, str]:
    """Train the LoRA adapter on the 4-bit base in this process; resume from the last complete checkpoint."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer

    run_dir = run_dir_for(cfg, tokenized)
    checkpoints = run_dir / "checkpoints"
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, quantized=True)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    if "lm_head" in cfg.lora.target_modules:
        extra = cfg.lora.r * (model.config.hidden_size + model.config.vocab_size)
        print(f"warning: lora.target_modules includes lm_head: +{extra:,} adapter parameters, slower steps")
    model = get_peft_model(model, lora)
    # No KV cache in training: with one, transformers would not derive per-row attention from the
    # position ids of packed batches.
    model.config.use_cache = False
    trainer = Trainer(
        model=model,
        args=_training_args(cfg, checkpoints),
        train_dataset=load_split(tokenized["train"]),
        processing_class=tokenizer,
        data_collator=_collator(cfg, tokenizer),
        callbacks=callbacks(run_dir, mlflow_run_id),
    )
    resume = latest_checkpoint(checkpoints)
    result = trainer.train(resume_from_checkpoint=resume)
    if mlflow_run_id:
        figures = {"train/final_loss": result.training_loss, "train/runtime_s": result.metrics.get("train_runtime", 0)}
        log_metrics(mlflow_run_id, figures, step=trainer.state.global_step)
    adapter = run_dir / "adapter"
    with atomic_dir(adapter) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "chat_doctor_config.json").write_text(json.dumps(cfg.model_dump(), indent=2, sort_keys=True))
    return {"run_dir": str(run_dir), "adapter": str(adapter), "resumed_from": resume or ""}


class OutOfMemory(RuntimeError):
    """Training ran out of memory; the next attempt uses half the micro-batch (see run_train)."""


class TrainingFailed(RuntimeError):
    """Training failed for another reason (or was killed); retrying the same thing will not help."""


def _is_oom(err: BaseException) -> bool:
    import torch

    text = str(err).lower()
    return (
        isinstance(err, torch.OutOfMemoryError | MemoryError)
        or "out of memory" in text
        or ("can't allocate memory" in text)
    )


def _micro_batch_state(run_dir: Path) -> Path:
    return run_dir / "micro_batch.json"


def _apply_micro_batch(cfg: Config, run_dir: Path) -> Config:
    """The config with the micro-batch an earlier out-of-memory attempt left for this run folder."""
    state = _micro_batch_state(run_dir)
    if not state.is_file():
        return cfg
    split = json.loads(state.read_text())
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=split)})


def _halve_micro_batch(cfg: Config, run_dir: Path, error: str) -> str:
    """Record half the micro-batch and twice the accumulation (same effective batch) for the retry."""
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    if micro == 1:
        raise TrainingFailed(
            f"out of memory at train.micro_batch_size = 1 ({error}); lower tokenize.max_length, set "
            "train.gradient_checkpointing: true, or use a GPU with more memory"
        )
    write_json(_micro_batch_state(run_dir), {"micro_batch_size": micro // 2, "grad_accum": accum * 2})
    return f"out of memory at micro-batch {micro}: the retry uses {micro // 2} x {accum * 2} (same effective batch)"


def run_train(cfg: Config, tokenized: dict[str, str], mlflow_run_id: str | None = None) -> dict[str, str]:
    """Train in a child process, so that out-of-memory frees all of its memory; return the outputs.

    Raises OutOfMemory (after recording half the micro-batch for the next attempt, which resumes
    from the last complete checkpoint) or TrainingFailed for anything else, a kill included.
    """
    run_dir = run_dir_for(cfg, tokenized)
    cfg = _apply_micro_batch(cfg, run_dir)
    spec = run_dir / "attempt.json"
    write_json(spec, {"config": cfg.model_dump(), "tokenized": tokenized, "mlflow_run_id": mlflow_run_id})
    outcome = run_dir / "outcome.json"
    outcome.unlink(missing_ok=True)
    if mlflow_run_id:
        set_tags(
            mlflow_run_id,
            {"train.micro_batch_size_used": cfg.train.micro_batch_size, "train.grad_accum_used": cfg.train.grad_accum},
        )
    # The child's stdout (progress lines with ETA) is relayed line by line into this step's log.
    with subprocess.Popen([sys.executable, "-m", "tasks.train", str(spec)], stdout=subprocess.PIPE, text=True) as child:
        for line in child.stdout:
            print(line.rstrip(), flush=True)
    result = json.loads(outcome.read_text()) if outcome.is_file() else None
    if child.returncode == 0 and result and result.get("adapter"):
        return result
    if result and result.get("oom"):
        raise OutOfMemory(_halve_micro_batch(cfg, run_dir, result["error"]))
    reason = result["error"] if result else f"the training process ended with exit code {child.returncode}"
    raise TrainingFailed(f"training failed: {reason}")


def main(spec_path: str) -> int:
    """Child-process entry point: run one training attempt described by `spec_path`."""
    spec = json.loads(Path(spec_path).read_text())
    cfg = Config.model_validate(spec["config"])
    outcome = Path(spec_path).parent / "outcome.json"
    monitor = _system_metrics(spec["mlflow_run_id"])
    try:
        write_json(outcome, train_in_process(cfg, spec["tokenized"], spec["mlflow_run_id"]))
        return 0
    except Exception as err:
        write_json(outcome, {"oom": _is_oom(err), "error": f"{type(err).__name__}: {err}"})
        raise
    finally:
        if monitor:
            monitor.finish()


def _system_metrics(run_id: str | None):
    """MLflow's CPU/GPU/memory sampler on the run, for the training process's lifetime."""
    if not run_id:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from chat_doctor.tracking import tracking_uri

    monitor = SystemMetricsMonitor(run_id, sampling_interval=5, resume_logging=True, tracking_uri=tracking_uri())
    monitor.start()
    return monitor


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
