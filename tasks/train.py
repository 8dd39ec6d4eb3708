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
import os
import time
from pathlib import Path

from chat_doctor.config import Config, section_hash
from chat_doctor.files import atomic_dir, content_hash
from chat_doctor.modeling import device, load_base_model, load_tokenizer, resolve_dtype
from chat_doctor.tokenized import IGNORE_INDEX, load_split
from chat_doctor.tracking import log_metrics


def run_dir_for(cfg: Config, tokenized: dict[str, str]) -> Path:
    """The run folder: same data + same model/LoRA/train settings = same folder (so a rerun resumes).

    The micro-batch split is left out on purpose: after out-of-memory, micro_batch_size halves and
    grad_accum doubles, the effective batch stays, and training must resume in the same folder.
    """
    train = cfg.train.model_dump(exclude={"micro_batch_size", "grad_accum"})
    train["effective_batch"] = cfg.train.micro_batch_size * cfg.train.grad_accum
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


def _mlflow_callback(run_id: str | None):
    from transformers import TrainerCallback

    class MlflowLogger(TrainerCallback):
        """Per logging step: loss, learning rate, grad norm and real (non-padding) tokens/s."""

        def __init__(self) -> None:
            self.last = (time.perf_counter(), 0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            metrics = {f"train/{k}": v for k, v in logs.items() if k in ("loss", "learning_rate", "grad_norm")}
            if "loss" in logs and tokens > self.last[1]:
                metrics["train/tokens_per_s"] = (tokens - self.last[1]) / max(now - self.last[0], 1e-9)
                self.last = (now, tokens)
            if run_id and metrics:
                log_metrics(run_id, metrics, step=state.global_step)

    return MlflowLogger()


FAULT_ENV = "CHAT_DOCTOR_FAIL_AT_STEP"


def _fault_injector(run_dir: Path):
    """Fails training once at step $CHAT_DOCTOR_FAIL_AT_STEP (for retry tests and demos).

    A marker in the run folder makes it one-shot, so the retry that follows runs through.
    """
    from transformers import TrainerCallback

    step = int(os.environ.get(FAULT_ENV, "0"))
    marker = run_dir / ".fault-injected"

    class FaultInjector(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if step and state.global_step == step and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
                raise RuntimeError(f"injected failure at step {step} ({FAULT_ENV})")

    return FaultInjector()


def _collator(cfg: Config, tokenizer):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if cfg.train.packing:
        # One row of concatenated examples; the first label of each example is masked so no
        # example learns to predict across the boundary.
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    # Pads ids with the pad token and labels with IGNORE_INDEX, so EOS labels stay trained.
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8)


def latest_checkpoint(checkpoints: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None


def run_train(cfg: Config, tokenized: dict[str, str], mlflow_run_id: str | None = None) -> dict[str, str]:
    """Train the LoRA adapter on the 4-bit base; return {"run_dir", "adapter"}."""
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
    model = get_peft_model(model, lora)
    # No KV cache in training: with one, transformers would not derive per-row attention from the
    # position ids of packed batches.
    model.config.use_cache = False
    train_set = load_split(tokenized["train"])
    trainer = Trainer(
        model=model,
        args=_training_args(cfg, checkpoints),
        train_dataset=train_set,
        processing_class=tokenizer,
        data_collator=_collator(cfg, tokenizer),
        callbacks=[_mlflow_callback(mlflow_run_id), _fault_injector(run_dir)],
    )
    resume = latest_checkpoint(checkpoints)
    result = trainer.train(resume_from_checkpoint=resume)
    if mlflow_run_id:
        log_metrics(
            mlflow_run_id,
            {"train/final_loss": result.training_loss, "train/runtime_s": result.metrics.get("train_runtime", 0)},
            step=trainer.state.global_step,
        )
    adapter = run_dir / "adapter"
    with atomic_dir(adapter) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "chat_doctor_config.json").write_text(json.dumps(cfg.model_dump(), indent=2, sort_keys=True))
    return {"run_dir": str(run_dir), "adapter": str(adapter), "resumed_from": resume or ""}
