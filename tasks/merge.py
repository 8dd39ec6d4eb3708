"""Step `merge`: fold the LoRA adapter into a full-precision copy of the base.

Reads params sections `model` and `merge`. Input: `runs/<run>/adapter/`. Output: `runs/<run>/merged/`
(safetensors + tokenizer), written atomically. The base is loaded in bf16/fp16/fp32, never 4 bit:
merging into quantized weights would round the adapter's delta away.
"""

from __future__ import annotations

from pathlib import Path

from chat_doctor.config import Config
from chat_doctor.files import atomic_dir
from chat_doctor.modeling import load_base_model, load_tokenizer


def run_merge(cfg: Config, adapter: str) -> dict[str, str]:
    """Merge `adapter` into the base; return {"merged": folder}."""
    from peft import PeftModel

    base = load_base_model(cfg.model, quantized=False, dtype_name=cfg.merge.dtype)
    merged_model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    out = Path(adapter).parent / "merged"
    with atomic_dir(out) as staging:
        merged_model.save_pretrained(staging, safe_serialization=True)
        load_tokenizer(cfg.model, adapter).save_pretrained(staging)
    return {"merged": str(out)}
