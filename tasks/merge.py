"""Step `merge`: fold the LoRA adapter into a full-precision copy of the base.

Reads params sections `model`, `tokenize` (template) and `merge`. Input: `runs/<run>/adapter/` and
the data lineage. Output: `runs/<run>/merged/` (safetensors + tokenizer + model card README.md),
written atomically. The base is loaded in bf16/fp16/fp32, never 4 bit: merging into quantized
weights would round the adapter's delta away. Before saving, the merged model's logits on a few
prompts must match the adapter on the same full-precision base within TOLERANCE, or nothing is saved.
"""

from __future__ import annotations

from pathlib import Path

from chat_doctor.config import Config
from chat_doctor.files import atomic_dir
from chat_doctor.model_card import render_card
from chat_doctor.modeling import load_adapter, load_base_model, load_tokenizer
from chat_doctor.prompts import build_example

# Largest relative error ||merged - (base + adapter)|| / ||base + adapter|| of the logits, per dtype.
# Merging rounds W + BA to the weight dtype once per layer and the rounding compounds with depth:
# Mistral-7B shapes in bf16 measured 3.1e-2 (H200, 2026-11). A wrong merge (adapter lost or scaled
# wrongly) moves the logits by the adapter's whole effect, far above these.
TOLERANCE = {"torch.float32": 1e-4, "torch.bfloat16": 5e-2, "torch.float16": 1e-2}
CHECKS = [  # (query, answer) pairs in the training template
    ("I have had a dry cough for a week and a mild fever.", "Hi, it is likely viral. Rest and drink fluids."),
    ("My knee swells after running. What should I do?", "Hello, apply ice, rest the knee and see an orthopaedist."),
    ("Is it safe to take ibuprofen with paracetamol?", "Yes, in normal doses they can be combined for a short time."),
]


class MergeMismatch(RuntimeError):
    """The merged weights do not reproduce base + adapter: nothing is written."""


def _logits(model, tokenizer, template: str):
    """Logits of every check text, concatenated along the sequence."""
    import torch

    outputs = []
    with torch.no_grad():
        for query, answer in CHECKS:
            batch = tokenizer(build_example(template, query, answer)[0], return_tensors="pt").to(model.device)
            outputs.append(model(**batch).logits.float()[0])
    return torch.cat(outputs)


def run_merge(cfg: Config, adapter: str, lineage: dict | None = None) -> dict:
    """Merge `adapter` into the base, check the logits, save; return {"merged": folder, "logit_error"}."""
    tokenizer = load_tokenizer(cfg.model, adapter)
    base = load_base_model(cfg.model, quantized=False, dtype_name=cfg.merge.dtype)
    with_adapter = load_adapter(base, adapter)
    before = _logits(with_adapter, tokenizer, cfg.tokenize.template)
    merged_model = with_adapter.merge_and_unload()
    error = ((before - _logits(merged_model, tokenizer, cfg.tokenize.template)).norm() / before.norm()).item()
    tolerance = TOLERANCE[str(merged_model.dtype)]
    if not error <= tolerance:
        raise MergeMismatch(
            f"merged logits differ from base + adapter by {error:.3g} relative (> {tolerance}): not saved"
        )
    out = Path(adapter).parent / "merged"
    with atomic_dir(out) as staging:
        merged_model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(render_card(cfg, lineage or {}, None, None, "merged"))
    return {"merged": str(out), "logit_error": error}
