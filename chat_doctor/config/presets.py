"""Named starting points for params.yaml (`preset:`): plain values, merged under its sections."""

from __future__ import annotations

import copy
from typing import Any

from chat_doctor.core.choices import SMOLLM2


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
    # 128 answers a batch on the merged bf16 model: 500 answers of 125 new tokens in 32 s on an H100; 256
    # were no faster and 512 ran out of memory on its 80 GB (bench/RESULTS.md, 2026-12-06).
    "evaluate": {"batch_size": 128, "rows": 500},
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
        # The frozen base's products in fp8 where the GPU has fp8 tensor cores (sm 8.9+; bf16 elsewhere),
        # and the decoder layers compiled, liger keeping only its fused lm_head + loss: together 1.48x
        # the bf16 recipe and 1.33x the fair unsloth, losses within 0.5%, 36.8 GiB, on an H100
        # (bench/RESULTS.md, 2026-12-06). The compiled layers are cached in runs/compile-cache: the first
        # step takes ~43 s with the cache, 67-96 s without; compiling pays past ~2.4M tokens.
        "fp8": "auto",
        "compile": True,
        # liger-loss while compiled; liger's layer kernels too with train.compile=false (faster and
        # 8 GiB smaller than liger-loss uncompiled).
        "kernels": "auto",
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
    # sample, sized for `make demo` on 2 CPU cores (~5 s a step). 24 steps of 4 rows teach it to stop
    # (EOS on every answer of real HealthCareMagic rows in the sweep) while its loss on those rows stays
    # below the base's (bench/RESULTS.md).
    "smollm2-135m": {
        "model": {"base": SMOLLM2},
        "tokenize": {"template": "chatml"},
        "train": {
            "max_steps": 24,
            "micro_batch_size": 4,
            "grad_accum": 1,
            "learning_rate": 5e-4,
            "logging_steps": 4,
            "save_steps": 8,
        },
        "evaluate": {"rows": 8},
    },
    "mistral-7b": deep_merge(_MISTRAL_7B, _FAST),
    # Least GPU memory, for a 16 GiB card: the fast recipe on the same micro-batches, recomputing
    # each layer in the backward pass from its input, which waits in CPU memory, copied there on a
    # side stream (5.5 GiB at 0.79x unsloth's offloaded checkpointing; kept on the GPU: 6.9 GiB,
    # 8% faster). The bf16 base (14.5 GB) is merged in host memory and evaluation runs on the
    # 4-bit base, so no step needs more GPU memory than training.
    "mistral-7b-lean": deep_merge(
        deep_merge(_MISTRAL_7B, _FAST),
        {
            "train": {
                "optim": "paged_adamw_8bit",
                "gradient_checkpointing": True,
                "checkpoint_offload": True,
                # fp8 made from the 4-bit weights for each product (no memory beyond them; an fp8 copy would
                # add 3.2 GiB) gained 0.9% here on an H100 (bench/RESULTS.md, 2026-12-06): off. Compiling
                # the checkpointed layers did not pay.
                "fp8": False,
                "fp8_weights": "4bit",
                "compile": False,
                "kernels": "liger",
            },
            "merge": {"device": "cpu", "dtype": "bfloat16"},
            "evaluate": {"load_in_4bit": True, "batch_size": 16},
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

# Overrides for smoke runs (tests, bench/soak.py): a couple of short answers per model.
QUICK_EVAL = {"evaluate.rows": 2, "evaluate.max_new_tokens": 8}
