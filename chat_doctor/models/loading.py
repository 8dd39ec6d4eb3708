"""Loading the base model and tokenizer the same way for every step and the chat UI.

`model.base` is an embedded base (`tiny`, `smollm2-135m`), a hub id, or a local folder. QLoRA loads it in 4 bit
through bitsandbytes (on CUDA and on the CPU alike); merging and evaluation load it in full precision.
"""

from __future__ import annotations

import os
from pathlib import Path

from chat_doctor.config import ModelConfig

from chat_doctor.core.choices import EMBEDDED


def base_location(cfg: ModelConfig) -> str:
    """What `from_pretrained` gets: a local folder, or a hub id (resolved from the local cache offline)."""
    if cfg.base in EMBEDDED:
        from chat_doctor.models.embedded import ensure_embedded

        return str(ensure_embedded(cfg.base))
    return str(Path(cfg.base).expanduser()) if Path(cfg.base).expanduser().exists() else cfg.base


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def local_device() -> str:
    """This process's device: under a data-parallel launch each process owns GPU number LOCAL_RANK."""
    if device() == "cpu":
        return "cpu"
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"


def resolve_dtype(name: str):
    """`auto` -> bf16 where the GPU supports it, fp16 on older GPUs (T4), fp32 on the CPU."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(cfg: ModelConfig, location: str | None = None):
    """The base's tokenizer, with a pad token that is NOT eos (pad = eos would mask every EOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        location or base_location(cfg), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(f"{cfg.base}: the tokenizer has no pad token besides EOS; the model could not learn to stop")
    return tokenizer


def load_base_model(
    cfg: ModelConfig,
    *,
    quantized: bool,
    dtype_name: str | None = None,
    attention: str = "sdpa",
    on_cpu: bool = False,
):
    """The base model, 4-bit (NF4 by default) for training, or full precision for merge and eval.

    The 4-bit weights are stored as `compute_dtype`, so FSDP can shard them with the rest. Each
    data-parallel process loads its copy onto its own GPU; `on_cpu` keeps it in host memory.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute_dtype = resolve_dtype(dtype_name or cfg.compute_dtype)
    kwargs = {}
    if quantized and cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype,
        )
    return AutoModelForCausalLM.from_pretrained(
        base_location(cfg),
        revision=cfg.revision,
        dtype=compute_dtype,
        device_map={"": "cpu" if on_cpu else local_device()},
        attn_implementation=attention,
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,  # never unpickle weights
        **kwargs,
    )


def load_merged(folder: str | Path, dtype_name: str, *, on_cpu: bool = False):
    """A merged model (the base with an adapter folded in, written by the merge step) in full
    precision: a local folder of our own, so no revision and no remote code."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(folder),
        dtype=resolve_dtype(dtype_name),
        device_map={"": "cpu" if on_cpu else local_device()},
        use_safetensors=True,
    )


class UnsafeWeights(ValueError):
    """Weights offered only as a pickle (`.bin`, `.pt`): chat-doctor loads safetensors only."""


def load_adapter(model, folder: str | Path, name: str | None = None):
    """`model` with the PEFT adapter in `folder`, from its safetensors file only (a pickle can run code).

    With `name`, `model` is already a PeftModel: the adapter is added beside its others and made active.
    """
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "adapter_model.safetensors").is_file():
        found = sorted(p.name for p in folder.glob("adapter_model.*")) or "no adapter weights"
        raise UnsafeWeights(f"{folder}: no adapter_model.safetensors ({found}); only safetensors weights are loaded")
    if name is None:
        return PeftModel.from_pretrained(model, str(folder))  # peft reads the safetensors file when there is one
    model.load_adapter(str(folder), adapter_name=name)
    model.set_adapter(name)
    return model
