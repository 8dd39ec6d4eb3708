"""One typed config for the whole pipeline, read from params.yaml and validated once.

Resolution order (later wins): the preset named by `preset` -> the sections of params.yaml ->
dotted overrides such as `train.max_steps=20`. Every error names the key to change.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

PARAMS_FILE = "params.yaml"
# Data outputs tracked by DVC (dvc.yaml names the same folders).
PROCESSED_DIR = Path("data/processed")
TOKENIZED_DIR = Path("data/tokenized")
TINY = "tiny"  # embedded: a tiny random Mistral from a fixed seed (fast tests of every code path)
SMOLLM2 = "smollm2-135m"  # embedded: SmolLM2-135M-Instruct, a real small model (the demo)
EMBEDDED = (TINY, SMOLLM2)  # built offline under models/ by chat_doctor/embedded.py
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


RUNS_ROOT = "runs"  # every output that config can place goes under this project folder
HUB_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # read by huggingface_hub; never part of config
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{20,}")
_SECRET_KEY = re.compile(r"token|secret|password|api_key", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the hub token of the environment, and anything shaped like one, masked."""
    for name in HUB_TOKEN_ENV:
        token = os.environ.get(name)
        if token and len(token) >= 8:
            text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def is_local(value: str) -> bool:
    """A path on this machine (existing, or written like one) rather than a hub id or registry name."""
    return value.startswith(("/", ".", "~")) or Path(value).expanduser().exists()


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    base: str = Field(
        TINY, description="`tiny` or `smollm2-135m` (embedded, built offline), a hub id, or a local folder."
    )
    revision: str | None = Field(None, description="Hub revision (commit, tag) of `base`.")
    load_in_4bit: bool = Field(True, description="QLoRA: base weights in 4 bit. False = plain LoRA, more memory.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="nf4 suits normally distributed weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants: ~0.4 bit/param saved.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto = bf16 on GPUs that have it, else fp16; float32 on CPU."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub model. Keep off unless needed.")

    @field_validator("base")
    @classmethod
    def _base_exists(cls, value: str) -> str:
        if value in EMBEDDED:
            return value
        if is_local(value):
            path = Path(value).expanduser()
            if not (path / "config.json").is_file():
                raise ValueError(f"{value!r} is not a model folder (no config.json there)")
            return value
        if not HUB_ID.match(value):
            raise ValueError(
                f"{value!r} is neither an embedded base ({', '.join(EMBEDDED)}), a hub id like org/name, "
                "nor an existing folder"
            )
        return value


DEFAULT_COLUMNS = {"instruction": "instruction", "input": "input", "output": "output"}


class DataConfig(_Section):
    source: str = Field(
        "data/raw/synthetic_healthcaremagic.jsonl",
        description="Hub dataset id, or a local .json/.jsonl/.csv/.parquet file or save_to_disk folder.",
    )
    revision: str | None = Field(None, description="Hub dataset revision; pin it for reproducibility.")
    split: str = Field("train", description="Split of a hub dataset (or of a DatasetDict folder).")
    rows: int = Field(400, gt=0, description="Rows sampled from the source (before the split).")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of the sample held out for evaluation.")
    seed: int = Field(42, description="Sampling and split seed: same seed + same source = same files.")
    columns: dict[Literal["instruction", "input", "output"], str] = Field(
        DEFAULT_COLUMNS,
        description="Source column for each field; e.g. {input: question, output: answer}. instruction is optional.",
    )
    strict: bool = Field(
        False,
        description="True: any invalid row in the source is an error. False: invalid rows are dropped and counted.",
    )
    max_chars: int = Field(20000, gt=0, description="Longer queries or answers are invalid (scraping accidents).")
    clean_artefacts: bool = Field(True, description='Remove the scraper\'s "Chat Doctor" artefacts.')
    dedupe: bool = Field(True, description="Drop exact and near-exact (case, spacing, punctuation) duplicate rows.")
    drop_cut_off: bool = Field(
        False, description="Drop answers that stop mid-sentence (counted either way); costs rows."
    )

    @field_validator("columns")
    @classmethod
    def _fill_columns(cls, value: dict[str, str]) -> dict[str, str]:
        return {**DEFAULT_COLUMNS, **value}  # name only the columns that differ


class TokenizeConfig(_Section):
    template: Literal["original", "mistral-inst", "chatml"] = Field(
        "original",
        description="`original`: the Chat-Doctor prompt; `mistral-inst`: [INST] ... [/INST]; `chatml`: "
        "<|im_start|>user ... <|im_end|> (SmolLM2, Qwen and other ChatML instruct models).",
    )
    max_length: int = Field(512, ge=16, description="Tokens per row incl. EOS; longer answers are cut, EOS kept.")
    loss_on: Literal["completion", "all"] = Field(
        "completion", description="completion = prompt tokens masked (learn answers, not questions)."
    )


class LoraConfig(_Section):
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


class TrainConfig(_Section):
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
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
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
        "(least GPU memory; costs PCIe copies).",
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
    kernels: Literal["none", "liger"] = Field(
        "none",
        description="liger: Triton kernels for RMSNorm, SwiGLU and RoPE, and lm_head fused with the loss so "
        "the logits are never held (GPU only; install the `gpu` extra).",
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
        "127.0.0.1:29500", description="host:port of node 0, where the processes of all machines meet (nnodes > 1)."
    )
    logging_steps: int = Field(5, gt=0)
    save_steps: int = Field(20, gt=0, description="Checkpoint every K steps (resume point after a crash).")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept.")
    seed: int = 42

    @model_validator(mode="after")
    def _settings_fit_together(self) -> TrainConfig:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs (both are null)")
        if self.attention == "varlen" and not self.packing:
            raise ValueError("train.attention = varlen needs train.packing: true (it attends within packed rows)")
        if self.pack_length and not self.packing:
            raise ValueError("train.pack_length needs train.packing: true (bins are packed rows)")
        if self.strategy == "fsdp" and self.upcast_layers:
            raise ValueError("train.strategy = fsdp needs train.upcast_layers: false (FSDP shards one dtype)")
        return self

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


class MergeConfig(_Section):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Full-precision base the adapter is merged into; auto = bf16 on GPU, fp32 on CPU."
    )
    device: Literal["auto", "cpu"] = Field(
        "auto",
        description="auto = the GPU when there is one; cpu = in host memory, for a GPU smaller than the "
        "full-precision base (7B in bf16: ~15 GB of host memory, ~1 minute).",
    )


class EvaluateConfig(_Section):
    batch_size: int = Field(8, gt=0, description="Rows per eval forward pass and per generation batch (halved on OOM).")
    rows: int = Field(
        40, gt=0, description="Eval rows each model answers (generation is the slow part); loss uses every row."
    )
    max_new_tokens: int = Field(125, gt=0, description="Generation limit per answer (the original's 125).")
    repetition_penalty: float = Field(1.15, ge=1.0, description="The original notebook's setting; 1.0 = off.")
    load_in_4bit: bool = Field(
        False,
        description="Score the models as QLoRA serves them: the 4-bit base, with the adapter for the tuned "
        "model, instead of the full-precision base and merged model (7B: ~5 GiB of GPU memory, not ~16).",
    )
    source: str | None = Field(
        None,
        description="Extra eval rows besides the eval split, e.g. held-out real rows: a local file or folder "
        "or hub id (formats and columns as data.*). When set, promotion is judged on these rows.",
    )

    @field_validator("source")
    @classmethod
    def _source_exists(cls, value: str | None) -> str | None:
        if value and is_local(value) and not Path(value).expanduser().exists():
            raise ValueError(f"{value!r} does not exist")
        return value


# Figures every evaluation reports for each model; True where higher is better.
METRICS = {
    "loss": False,
    "perplexity": False,
    "rougeL": True,
    "similarity": True,
    "eos_rate": True,
    "repetition": False,
}


class RegisterConfig(_Section):
    experiment: str = Field("chat-doctor", min_length=1, description="MLflow experiment.")
    model_name: str = Field("chat-doctor-adapter", min_length=1, description="Registered model name.")
    alias: str = Field("candidate", min_length=1, description="Alias moved to each new version.")
    champion_alias: str = Field(
        "champion", min_length=1, description="Alias moved only when a version beats the base and the champion."
    )
    promote_metric: Literal["loss", "perplexity", "rougeL", "similarity", "eos_rate", "repetition"] = Field(
        "loss", description="What promotion compares. Loss is the least noisy on small eval sets."
    )
    min_improvement: float = Field(
        0.0, ge=0, description="How much better (in the metric's units) a version must be to be promoted."
    )
    register_merged: bool = Field(
        False, description="Also register the merged full-precision model as `<model_name>-merged` (14 GB for 7B)."
    )

    @field_validator("champion_alias")
    @classmethod
    def _aliases_differ(cls, value: str, info: ValidationInfo) -> str:
        if value == info.data.get("alias"):
            raise ValueError("must differ from registry.alias (the newest version's alias)")
        return value


class ChatConfig(_Section):
    model: str = Field(
        "champion",
        min_length=1,
        description="Registry alias (champion), version (3 or v3), or a local adapter or merged folder.",
    )
    host: str = Field("127.0.0.1", description="Address the UI binds; 0.0.0.0 exposes it to the network.")
    port: int = Field(7860, ge=1, le=65535)
    max_input_chars: int = Field(2000, gt=0, description="Longer messages are refused with a message.")
    max_new_tokens: int = Field(125, gt=0, le=2048, description="Answer length limit (the original's 125).")
    repetition_penalty: float = Field(1.15, ge=1.0, le=2.0, description="The original's setting.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy (the original); above 0 samples.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling, used when temperature > 0.")


class Config(_Section):
    preset: str = Field("cpu-tiny", description="Defaults the sections start from.")
    runs_dir: str = Field(
        RUNS_ROOT, description="Where checkpoints, adapters, merged models and reports go: runs or runs/<name>."
    )
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    merge: MergeConfig = MergeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegisterConfig = RegisterConfig()
    chat: ChatConfig = ChatConfig()

    @model_validator(mode="after")
    def _sections_fit_together(self) -> Config:
        if self.train.strategy == "fsdp" and self.lora.adapter_dtype != "compute":
            raise ValueError("train.strategy = fsdp needs lora.adapter_dtype: compute (FSDP shards one dtype)")
        if 0 < self.train.pack_length < self.tokenize.max_length:
            raise ValueError(
                f"train.pack_length = {self.train.pack_length} is shorter than tokenize.max_length = "
                f"{self.tokenize.max_length}: a row of that length would fit no bin"
            )
        return self

    @field_validator("runs_dir")
    @classmethod
    def _inside_runs(cls, value: str) -> str:
        # Outputs are deleted and replaced by the steps: config must not aim them anywhere else.
        parts = Path(value).parts
        if Path(value).is_absolute() or ".." in parts or not parts or parts[0] != RUNS_ROOT:
            raise ValueError(
                f"outputs stay in the project's {RUNS_ROOT}/ folder: use {RUNS_ROOT} or {RUNS_ROOT}/<name> "
                f"(link {RUNS_ROOT}/ to another disk for space)"
            )
        return value


def deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# Presets hold only what differs from the field defaults above (which are `cpu-tiny`).
# The Mistral-7B presets: bench/gpu_speed.py measures each against the notebook and unsloth
# (bench/RESULTS.md); `mistral-7b` is the fastest that fits 40 GiB, `-lean` the smallest.
_MISTRAL_7B = {
    "model": {"base": "mistralai/Mistral-7B-v0.1"},
    "data": {"source": "lavita/ChatDoctor-HealthCareMagic-100k", "rows": 5000},
    "tokenize": {"max_length": 512},
    "evaluate": {"batch_size": 16, "rows": 500},
}
_FAST = {
    # r=32 on all seven projections (no lm_head: +1.2M parameters, 10% slower, nothing gained);
    # bf16 throughout; rows packed with per-row attention; no activation recomputation.
    "lora": {"r": 32, "alpha": 64, "dropout": 0.0, "adapter_dtype": "compute"},
    "train": {
        # Micro-batches by token budget: 4 bins of whole rows, each <= 1,536 tokens, so every forward
        # pass holds ~6,100 tokens (16 rows held 500 to 8,192) and GPUs of a data-parallel run get equal
        # work. 4 x 2,048 ran 1.5% faster but peaked at 42 GiB.
        "pack_length": 1536,
        "micro_batch_size": 4,
        "grad_accum": 4,  # ~24k tokens (~190 rows) a step; 4 GPUs each take one micro-batch of it
        "epochs": 1,  # one pass over 4,500 HealthCareMagic rows: ~52 steps of 16 bins (~820 bins; 274 tokens a row)
        "learning_rate": 2e-4,
        "optim": "adamw_torch_fused",
        "gradient_checkpointing": False,
        "upcast_layers": False,
        "kernels": "liger",
        "attention": "varlen",
        "packing": True,
        "logging_steps": 5,
        "save_steps": 20,
        "save_total_limit": 3,
    },
}
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-tiny": {},
    # The demo: SmolLM2-135M-Instruct (real weights, embedded) fine-tuned in 4 bit on the bundled
    # sample, sized for `make demo` on 2 CPU cores (~4.5 s a step). 12 steps of 4 rows teach it to
    # stop; beyond ~12 its loss on real HealthCareMagic rows rises above the base's, as it learns
    # the sample's one answer frame (bench/RESULTS.md).
    "smollm2-135m": {
        "model": {"base": SMOLLM2},
        "tokenize": {"template": "chatml"},
        "train": {
            "max_steps": 12,
            "micro_batch_size": 4,
            "grad_accum": 1,
            "learning_rate": 5e-4,
            "logging_steps": 2,
            "save_steps": 4,
        },
        "evaluate": {"rows": 8},
    },
    "mistral-7b": deep_merge(_MISTRAL_7B, _FAST),
    # Least GPU memory, for a 16 GiB card: the fast recipe on the same micro-batches, recomputing
    # each layer in the backward pass from its input, which waits in CPU memory (5.5 GiB at 1.08x
    # unsloth; kept on the GPU: 6.9 GiB; 2 bins a micro-batch: 5.6 GiB at 0.66x unsloth,
    # launch-bound). The bf16 base (14.5 GB) is merged in host memory and evaluation runs on the
    # 4-bit base, so no step needs more GPU memory than training.
    "mistral-7b-lean": deep_merge(
        deep_merge(_MISTRAL_7B, _FAST),
        {
            "train": {
                "optim": "paged_adamw_8bit",
                "gradient_checkpointing": True,
                "checkpoint_offload": True,
            },
            "merge": {"device": "cpu", "dtype": "bfloat16"},
            "evaluate": {"load_in_4bit": True},
        },
    ),
    # The original Chat-Doctor notebook's recipe (unpacked rows, fp32 norms and lm_head, checkpointing).
    "mistral-7b-original": deep_merge(
        _MISTRAL_7B,
        {
            "lora": {"r": 32, "alpha": 64, "dropout": 0.05},
            "train": {
                "max_steps": 500,  # 2,000 rows: 0.44 of an epoch of 4,500 rows, as the notebook ran
                "micro_batch_size": 4,
                "grad_accum": 1,
                "learning_rate": 2.5e-4,
                "optim": "paged_adamw_8bit",
                "gradient_checkpointing": True,
                "logging_steps": 10,
                "save_steps": 50,
                "save_total_limit": 3,
            },
        },
    ),
}


def cli_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.max_steps=20"]` -> `{"train.max_steps": 20}`; values parse as YAML."""
    flat: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.max_steps=20")
        flat[key] = yaml.safe_load(raw) if raw else ""
    return flat


def parse_overrides(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """Dotted overrides (`KEY=VALUE` strings or a {key: value} dict) -> nested dict."""
    flat = cli_overrides(items) if isinstance(items, list) else dict(items or {})
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override")
        node[leaf] = value
    return nested


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden" and _SECRET_KEY.search(key):
            lines.append(
                f"{source}: unknown key `{key}`: secrets never go in params.yaml or overrides; "
                f"the hub token is read from the environment ({' or '.join(HUB_TOKEN_ENV)})"
            )
        elif e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key `{key}`")
        elif isinstance(e.get("input"), dict):  # a check across keys: its message names them
            lines.append(f"{source}: {e['msg'].removeprefix('Value error, ')}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: `{key}` = {e.get('input')!r}: {msg}")
    return redact("\n".join(lines))


def build_config(raw: dict[str, Any], source: str = PARAMS_FILE) -> Config:
    """Preset defaults + `raw` -> validated Config. `raw` may name a preset."""
    preset = raw.get("preset", "cpu-tiny")
    if preset not in PRESETS:
        raise ConfigError(f"{source}: `preset` = {preset!r}: choose one of {sorted(PRESETS)}")
    defaults = copy.deepcopy(PRESETS[preset])
    train = raw.get("train")
    if isinstance(train, dict) and train.get("max_steps") is not None and "epochs" not in train:
        defaults.get("train", {}).pop("epochs", None)  # the steps you set win over the preset's epochs
    try:
        return Config.model_validate(deep_merge(defaults, raw))
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def load_config(path: str | Path = PARAMS_FILE, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    raw = deep_merge(read_params(path), parse_overrides(overrides))
    source = f"{path}" + (" + overrides" if overrides else "")
    return build_config(raw, source)


def flatten(config: Config) -> dict[str, Any]:
    """Dotted keys -> values, e.g. {"train.max_steps": 60}, for MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            out[prefix] = node

    walk("", config.model_dump())
    out["train.effective_batch_size"] = effective_batch(config.train)
    return out


def section_hash(*sections: BaseModel) -> str:
    """Stable hash of config sections, for cache keys and run folders."""
    payload = json.dumps([s.model_dump() for s in sections], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
