"""Sections `lora` and `train`: the adapter and how it is trained, and the batch split over GPUs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from chat_doctor.config.common import ConfigError, Section


class LoraConfig(Section):
    r: int = Field(16, gt=0, description="Adapter rank: capacity vs adapter size and memory.")
    alpha: int = Field(32, gt=0, description="Scale = alpha / r; 2x r is the usual choice.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Linear layers that get an adapter; all of them trains best.",
    )
    adapter_dtype: Literal["float32", "compute"] = Field(
        "float32",
        description="Adapter weights in fp32 (peft's default) or in model.compute_dtype: bf16 adapters skip "
        "a cast per layer and halve adapter memory; the optimizer still keeps its own state.",
    )


class TrainConfig(Section):
    max_steps: int | None = Field(
        60, gt=0, description="Optimizer steps; null (the default when `epochs` is set) = derived from epochs."
    )
    epochs: float | None = Field(
        None,
        gt=0,
        description="Passes over the training rows, instead of max_steps. The train step derives the steps "
        "from the tokenized data (rows, or bins with pack_length, over the effective batch), prints them and "
        "tags them on the MLflow run (train.max_steps_used). A train.max_steps you set yourself clears a "
        "preset's epochs; setting both yourself is an error.",
    )

    @model_validator(mode="before")
    @classmethod
    def _steps_or_epochs(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("epochs") is not None:
            if data.get("max_steps") is not None:
                raise ValueError("set train.max_steps or train.epochs, not both (set the other to null)")
            return {**data, "max_steps": None}
        return data

    micro_batch_size: int = Field(
        4, gt=0, description="Rows (bins, with pack_length) per forward pass; halved on out-of-memory."
    )
    grad_accum: int = Field(2, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-3, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate decay after warm-up; cosine ends near 0, constant keeps the peak."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW decay of the adapter weights; LoRA rarely needs it on short runs."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping: lower = steadier steps, slower learning.")
    optim: str = Field("auto", description="auto = paged_adamw_8bit on CUDA, adamw_torch on CPU.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations: far less memory, ~30% slower. On for big models."
    )
    checkpoint_every_n_layers: int = Field(
        1,
        gt=0,
        description="With gradient_checkpointing: recompute only every n-th layer (2 = half the "
        "recomputation, more memory).",
    )
    checkpoint_offload: bool = Field(
        False,
        description="With gradient_checkpointing: keep the checkpointed layer inputs in CPU memory "
        "(least GPU memory; on CUDA copied on a side stream, 7% slower than keeping them on the GPU).",
    )
    packing: bool = Field(
        False,
        description="Padding-free: a micro-batch's rows are concatenated into one sequence with per-row "
        "attention (position ids restart at each row), so no compute goes to padding.",
    )
    pack_length: int = Field(
        0,
        ge=0,
        description="With packing: whole rows are packed into bins of at most this many tokens and "
        "micro_batch_size counts bins, so every forward pass holds about micro_batch_size x pack_length "
        "tokens (0 = micro_batch_size counts rows, whatever their length). Must be >= tokenize.max_length.",
    )
    upcast_layers: bool = Field(
        True,
        description="Norms, embeddings and lm_head in fp32 (peft's prepare_model_for_kbit_training, the "
        "notebook's choice): steadier in fp16; in bf16 it costs ~1 GiB and a slow fp32 lm_head.",
    )
    kernels: Literal["none", "liger", "liger-loss", "auto"] = Field(
        "none",
        description="liger: Triton kernels for RMSNorm, SwiGLU and RoPE, and lm_head fused with the loss so "
        "the logits are never held (GPU only; install the `gpu` extra). liger-loss: only the fused lm_head "
        "and loss, which sit outside the decoder layers and so go with train.compile. auto: liger-loss when "
        "train.compile is on, liger when it is off (uncompiled, mistral-7b with liger-loss ran at ~12,000 "
        "tokens/s and 44 GiB, with liger ~15,000 and 36 GiB, on an H100), none on a CPU.",
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer but the first (dynamic shapes): with kernels: "
        "liger-loss, 1.17x the tokens/s of liger's layer kernels in bf16, and with fp8 it fuses the quantizing "
        "passes (1.29x over fp8 uncompiled, on an H100). The first run on a machine spends ~65-95 s of its "
        "first step compiling; what it compiled is kept in runs/compile-cache and loaded by later runs (~43 s). "
        "Needs kernels: none, liger-loss or auto (dynamo rejects liger's layer kernels). Not under strategy: fsdp.",
    )
    # train.fp8 (issue 32; chat_doctor/training/fp8.py).
    fp8: bool | Literal["auto"] = Field(
        False,
        description="The frozen base's products (forward and input gradient) in fp8 e4m3 with a scale per "
        "token and per weight row (torch._scaled_mm); LoRA and everything trained stay bf16. The base is held as "
        "one fp8 copy (1 byte a parameter, the 4-bit weights freed: +3.2 GiB peak on mistral-7b). On an H100: "
        "1.11x mistral-7b's tokens/s, 1.29x with compile + kernels: liger-loss; losses within 0.9% of bf16's "
        "(bench/notes-fp8.md). auto = on for GPUs of compute capability 8.9+ computing in bf16, else bf16 "
        "products without error; true = on, or an error saying why not. Not with strategy: fsdp.",
    )
    fp8_weights: Literal["fp8", "4bit"] = Field(
        "fp8",
        description="With train.fp8, how the frozen base's weights are held. fp8: one fp8 copy of each, made once "
        "(1 byte a parameter; the 4-bit weights are freed: +3.2 GiB peak on Mistral-7B), the fastest. 4bit: the "
        "4-bit weights stay and every product quantizes its weight to fp8 on the fly (no memory beyond the 4-bit "
        "base, one more pass over each weight per product): for a memory-bound recipe such as mistral-7b-lean.",
    )
    attention: Literal["sdpa", "varlen", "flex_attention", "eager"] = Field(
        "sdpa",
        description="Attention kernel. With packing, sdpa masks a dense block-diagonal matrix; varlen "
        "(CUDA, needs packing) runs flash attention over each row alone; flex_attention skips the blocks "
        "between rows (compiled on first use).",
    )
    gpus: int | Literal["auto"] = Field(
        "auto",
        description="Processes (one per GPU) for data-parallel training; auto = every visible GPU. The "
        "effective batch is kept: each process gets its share of micro_batch_size x grad_accum.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: a full 4-bit copy of the base per GPU (fastest). fsdp: the base is sharded "
        "across GPUs, for models that do not fit one.",
    )
    nnodes: int = Field(1, gt=0, description="Machines taking part; each runs the step with its node_rank.")
    node_rank: int = Field(0, ge=0, description="This machine's rank, 0 .. nnodes-1.")
    rdzv_endpoint: str = Field(
        "127.0.0.1:29500",
        description="host:port of node 0, where the processes of all machines meet (nnodes > 1, join: by-hand).",
    )
    join: Literal["work-pool", "by-hand"] = Field(
        "work-pool",
        description="How the other machines of a multi-node run (nnodes > 1) take part. work-pool: node 0's "
        "train step starts a `train-node` flow run per other node on the Prefect work pool (a worker on each "
        "machine; the data comes from the DVC remote, checkpoints from $CHAT_DOCTOR_CHECKPOINTS) and sets the "
        "rendezvous to its own address. by-hand: each machine runs `python -m tasks.train join` with the "
        "project on a shared filesystem, meeting at rdzv_endpoint.",
    )
    logging_steps: int = Field(5, gt=0, description="Loss, token rate and memory printed and logged every K steps.")
    save_steps: int = Field(20, gt=0, description="Checkpoint every K steps (resume point after a crash).")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept.")
    seed: int = Field(
        42, ge=0, lt=2**32, description="Adapter initialisation and batch order; same seed + data = same adapter."
    )

    @model_validator(mode="after")
    def _settings_fit_together(self) -> TrainConfig:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs (both are null)")
        if self.attention == "varlen" and not self.packing:
            raise ValueError("train.attention = varlen needs train.packing: true (it attends within packed rows)")
        if self.pack_length and not self.packing:
            raise ValueError("train.pack_length needs train.packing: true (bins are packed rows)")
        if self.compile and self.kernels == "liger":
            raise ValueError(
                "train.compile needs train.kernels: none, liger-loss or auto "
                "(torch.compile rejects liger's layer kernels)"
            )
        if self.strategy == "fsdp" and self.fp8 is True:
            raise ValueError("train.fp8 = true does not go with train.strategy = fsdp (set train.fp8: auto or false)")
        if self.strategy == "fsdp" and self.upcast_layers:
            raise ValueError("train.strategy = fsdp needs train.upcast_layers: false (FSDP shards one dtype)")
        return self

    def kernels_in_use(self, cuda: bool) -> Literal["none", "liger", "liger-loss"]:
        """train.kernels with auto resolved: for this machine (CUDA or not) and train.compile."""
        if self.kernels != "auto":
            return self.kernels
        if not cuda:
            return "none"
        return "liger-loss" if self.compile else "liger"

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port, e.g. 10.0.0.1:29500")
        return value

    @field_validator("gpus")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be auto or at least 1")
        return value

    @field_validator("node_rank")
    @classmethod
    def _rank_in_range(cls, value: int, info: ValidationInfo) -> int:
        if value >= info.data.get("nnodes", 1):
            raise ValueError(f"must be below train.nnodes = {info.data.get('nnodes', 1)}")
        return value


def effective_batch(train: TrainConfig) -> int:
    """Rows (bins, with train.pack_length) per optimizer step: micro-batch x accumulation, over all
    GPUs together. OOM retries keep it."""
    return train.micro_batch_size * train.grad_accum


def split_for_processes(train: TrainConfig, processes: int) -> tuple[int, int]:
    """(micro-batch, accumulation) of each of `processes` data-parallel processes; the effective batch stays.

    Each process takes 1/processes of the rows of a step, in micro-batches no larger than the
    configured one (memory was sized for that).
    """
    total = effective_batch(train)
    if total % processes:
        raise ConfigError(
            f"train.micro_batch_size x train.grad_accum = {total} {'bins' if train.pack_length else 'rows'} "
            f"per step cannot be split over "
            f"{processes} GPUs: make it a multiple of {processes} (or set train.gpus)"
        )
    share = total // processes
    micro = max(m for m in range(1, min(train.micro_batch_size, share) + 1) if share % m == 0)
    return micro, share // micro
