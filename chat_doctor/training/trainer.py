"""The Hugging Face Trainer as chat-doctor builds it: the 4-bit base with fresh LoRA adapters,
TrainingArguments from our config, the collator, and token-budget bins for packed runs.

Loads transformers at import: imported by the training process (chat_doctor/training/recipe.py) and bench/.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from chat_doctor.config import Config, TrainConfig
from chat_doctor.core.choices import VARLEN
from chat_doctor.core.logs import get_logger
from chat_doctor.data.tokenized import IGNORE_INDEX, load_split
from chat_doctor.models.loading import device, load_base_model, load_tokenizer, resolve_dtype
from chat_doctor.training import fp8
from chat_doctor.training.attention import register as register_varlen
from chat_doctor.training.callbacks import profiler_callbacks
from chat_doctor.training.compile_cache import use_project_cache

logger = get_logger(__name__)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def sharded(cfg: Config) -> bool:
    """FSDP in effect: asked for, and more than one process to shard over."""
    return cfg.train.strategy == "fsdp" and world_size() > 1


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _optimizer(name: str) -> str:
    if name != "auto":
        return name
    return "paged_adamw_8bit" if device() == "cuda" else "adamw_torch"


def training_args(cfg: Config, output_dir: Path):
    t = cfg.train
    max_steps = t.max_steps
    if max_steps is None:
        raise ValueError("train.max_steps is derived from train.epochs before training (training/plan.py)")
    dtype = resolve_dtype(cfg.model.compute_dtype)
    on_cuda = device() == "cuda"
    sharded_run = sharded(cfg)
    kernels = t.kernels_in_use(cuda=on_cuda)
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=math.ceil(t.warmup_ratio * max_steps),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=_optimizer(t.optim),
        activation_checkpointing=t.gradient_checkpointing and not sharded_run,
        activation_checkpointing_kwargs={
            "use_reentrant": False,
            "every_n_layers": t.checkpoint_every_n_layers,
            # transformers' offload where ours (HostCopiedCheckpoints) does not apply.
            "offload": t.checkpoint_offload and not side_stream_offload(cfg),
        },
        use_liger_kernel=kernels != "none",
        # liger-loss: only the fused lm_head + loss, outside the (compilable) decoder layers.
        liger_kernel_config=LIGER_LOSS_ONLY if kernels == "liger-loss" else None,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=on_cuda and str(dtype) == "torch.bfloat16",
        fp16=on_cuda and str(dtype) == "torch.float16",
        use_cpu=not on_cuda,
        # Every adapter weight gets a gradient each step: DDP need not search for unused ones.
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if world_size() > 1 and not on_cuda else None,
        fsdp="full_shard auto_wrap" if sharded_run else "",
        fsdp_config=fsdp_config(t) if sharded_run else None,
        # Rows of similar length share a micro-batch: far less padding than random batches, and
        # data-parallel processes get micro-batches of similar cost.
        train_sampling_strategy="group_by_length",
        include_num_input_tokens_seen="non_padding",
        # A NaN loss is logged as NaN rather than smoothed over, and the host skips one of its two
        # waits on the GPU per micro-batch (the token count is the other); the presets in
        # bench/RESULTS.md were measured this way.
        logging_nan_inf_filter=False,
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
        # Batches in pinned host memory, copied to the GPU without the host waiting: a plain copy
        # waits for all the GPU work queued before it (5 tensors a micro-batch, 20 waits a step).
        dataloader_pin_memory=on_cuda,
        accelerator_config={"non_blocking": on_cuda},
    )


LIGER_LOSS_ONLY = {"rope": False, "swiglu": False, "rms_norm": False, "fused_linear_cross_entropy": True}


class HostCopiedCheckpoints(TrainerCallback):
    """train.checkpoint_offload on CUDA: once the Trainer has turned checkpointing on, the layers'
    saved inputs go to host memory on a side stream (chat_doctor/training/offload.py)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from chat_doctor.training.offload import offload_checkpointed_layers

        if not offload_checkpointed_layers(model):
            raise RuntimeError("train.checkpoint_offload: no checkpointed layer found to offload")


def side_stream_offload(cfg: Config) -> bool:
    """train.checkpoint_offload done by HostCopiedCheckpoints: on CUDA, where the Trainer checkpoints."""
    t = cfg.train
    return t.gradient_checkpointing and t.checkpoint_offload and device() == "cuda" and not sharded(cfg)


def fsdp_config(t) -> dict:
    # FSDP1, the established FSDP-QLoRA path: the 4-bit weights are stored as bf16 (see
    # load_base_model) so they shard with the rest; FSDP does the layer checkpointing itself.
    return {
        "version": 1,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "activation_checkpointing": t.gradient_checkpointing,
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": False,
    }


def collator(cfg: Config, tokenizer):
    if cfg.train.packing:
        # One row of concatenated examples; the first label of each example is masked so no
        # example learns to predict across the boundary.
        return DataCollatorWithFlattening(
            return_position_ids=True,
            separator_id=IGNORE_INDEX,
            return_flash_attn_kwargs=cfg.train.attention == VARLEN,  # the row boundaries, for varlen
        )
    # Pads ids with the pad token and labels with IGNORE_INDEX, so EOS labels stay trained.
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8)


def adapted_model(cfg: Config):
    """The 4-bit base with fresh LoRA adapters, prepared for training as the config says."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.train.attention == VARLEN:
        register_varlen()
    model = load_base_model(cfg.model, quantized=True, attention=cfg.train.attention)
    if cfg.train.upcast_layers:
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
        logger.warning("lora.target_modules includes lm_head: +%s adapter parameters, slower steps", f"{extra:,}")
    # LoRA's A matrices start random, and the Trainer seeds only once it is built: seeded here, the
    # same seed and data give the same adapter (unseeded, two runs' adapters differed everywhere).
    set_seed(cfg.train.seed)
    model = get_peft_model(model, lora, autocast_adapter_dtype=cfg.lora.adapter_dtype == "float32")
    if cfg.lora.adapter_dtype == "compute":
        dtype = resolve_dtype(cfg.model.compute_dtype)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(dtype)
    # train.fp8 (issue 32): the frozen base's products in fp8; auto = where the GPU has fp8 tensor cores.
    # Not under FSDP, which shards the weights that fp8 replaces.
    if not sharded(cfg) and fp8.resolve_fp8(cfg.train.fp8, resolve_dtype(cfg.model.compute_dtype)):
        swapped = fp8.fp8_base_layers(model, weights=cfg.train.fp8_weights)
        logger.info("train.fp8: %d base layers compute in fp8 (weights held as %s)", swapped, cfg.train.fp8_weights)
    # No KV cache in training: with one, transformers would not derive per-row attention from the
    # position ids of packed batches.
    model.config.use_cache = False
    if cfg.train.compile and sharded(cfg):
        # FSDP wraps each layer and gathers its sharded weights around it: compiled layers under it
        # are untried, so they run as they are (as train.fp8: auto resolves off there).
        logger.info("train.compile: the layers are not compiled under strategy fsdp")
    elif cfg.train.compile:
        # Not the first layer: its input (the frozen embeddings' output) needs no gradient and every
        # other layer's does, so dynamo would trace and compile the layer twice (~45 s more on an
        # H200) for 1/32 of the work.
        for layer in model.get_base_model().model.layers[1:]:
            layer.compile(dynamic=True)  # bins vary in length: one graph for all of them
    return model


class PackedTrainer(Trainer):
    """Micro-batches of train.micro_batch_size bins of at most train.pack_length tokens."""

    def __init__(self, *args, train: TrainConfig, **kwargs) -> None:
        self.train_config = train
        super().__init__(*args, **kwargs)

    def get_train_dataloader(self):
        loader, self.packed_sampler = packed_dataloader(self, self.train_config)
        return loader

    def _track_num_input_tokens(self, inputs):
        # A packed micro-batch is one row with no padding: its real tokens are its length, known on
        # the host. The Trainer counts them on the GPU and reads the sum back, a wait per micro-batch.
        ids = inputs.get("input_ids")
        if ids is None or "attention_mask" in inputs or world_size() > 1:  # padded rows; or a sum over processes
            return super()._track_num_input_tokens(inputs)
        if self.args.include_num_input_tokens_seen != "no":
            self.state.num_input_tokens_seen += ids.numel()


class SamplerEpoch(TrainerCallback):
    """Tells the bin sampler the epoch before each one starts. The Trainer does too, except when a
    data-parallel run resumes mid-epoch (its wrappers then hide the sampler), and a wrong epoch
    there would replay the bins of another order."""

    def __init__(self) -> None:
        self.trainer: PackedTrainer | None = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.packed_sampler.set_epoch(math.floor(state.epoch or 0))


def build_trainer(
    cfg: Config, train_path: str | Path, checkpoints: Path, extra_callbacks: Sequence[TrainerCallback] = ()
) -> Trainer:
    """The Trainer for `cfg` on the tokenized split at `train_path` (also what bench/ measures)."""
    use_project_cache()  # before train.compile / train.fp8 compile anything
    tokenizer = load_tokenizer(cfg.model)
    common = {
        "model": adapted_model(cfg),
        "args": training_args(cfg, checkpoints),
        "train_dataset": load_split(train_path),
        "processing_class": tokenizer,
        "data_collator": collator(cfg, tokenizer),
    }
    offload = [HostCopiedCheckpoints()] if side_stream_offload(cfg) else []
    callbacks = [*extra_callbacks, *offload, *profiler_callbacks()]
    if not cfg.train.pack_length:
        return Trainer(**common, callbacks=callbacks)
    epochs = SamplerEpoch()
    trainer = PackedTrainer(**common, train=cfg.train, callbacks=[*callbacks, epochs])
    epochs.trainer = trainer
    return trainer


def packed_dataloader(trainer, train):
    """The train DataLoader over token-budget bins (accelerate hands each process whole micro-batches),
    and its sampler."""
    import pyarrow.compute as pc
    from torch.utils.data import DataLoader

    from chat_doctor.training.packing import PackedBatchSampler

    dataset = trainer.train_dataset
    lengths = pc.list_value_length(dataset.data.column("input_ids")).to_pylist()
    sampler = PackedBatchSampler(lengths, train.pack_length, train.micro_batch_size, train.seed)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=trainer.data_collator,
        num_workers=0,
        pin_memory=trainer.args.dataloader_pin_memory,  # with the Trainer's non-blocking copies (training_args)
    )
    return trainer.accelerator.prepare(loader), sampler
