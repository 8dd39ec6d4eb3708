"""Step `merge`: fold the LoRA adapter into a full-precision copy of the base.

Reads params sections `model`, `tokenize` (template) and `merge`. Input: the run folder's adapter and
the data's DVC hashes. Output: the run folder's `merged/` (safetensors + tokenizer + model card README.md),
written atomically. The base is loaded in bf16/fp16/fp32, never 4 bit: merging into quantized
weights would round the adapter's delta away; `merge.device: cpu` does it in host memory for a GPU
smaller than that copy. Before saving, the merged model is judged against
the adapter's own effect on a few prompts: it must keep most of what the adapter changes in the
base's logits, or nothing is saved.
"""

from __future__ import annotations

import hashlib
import json

from chat_doctor.config import Config, section_hash
from chat_doctor.core.files import atomic_dir, content_hash, file_lock, write_json
from chat_doctor.core.layout import RunFolder
from chat_doctor.core.logs import get_logger
from chat_doctor.core.records import DataVersion, Merged, Trained
from chat_doctor.data.prompts import build_example
from chat_doctor.models.loading import load_adapter, load_base_model, load_tokenizer
from chat_doctor.orchestration.steps import step
from chat_doctor.tracking.model_card import render_card

# The merged model must keep at least this share of the adapter's effect on the check prompts:
# 1 - |merged - adapter| / |adapter - base| (logits). A correct fp32 merge keeps ~1.0; a merge that
# lost the adapter keeps ~0, whatever the adapter's size. A fixed tolerance on |merged - adapter|
# alone would pass a lost adapter whose effect is below it (a light fine-tune in bf16).
MIN_KEPT = 0.5
# With no effect to judge by (an adapter that changes nothing), the merged logits must equal the
# adapter's within the dtype's rounding, relative to their size.
ROUNDING = {"torch.float32": 1e-4, "torch.bfloat16": 5e-2, "torch.float16": 1e-2}
CHECKS = [  # (query, answer) pairs in the training template
    ("I have had a dry cough for a week and a mild fever.", "Hi, it is likely viral. Rest and drink fluids."),
    ("My knee swells after running. What should I do?", "Hello, apply ice, rest the knee and see an orthopaedist."),
    ("Is it safe to take ibuprofen with paracetamol?", "Yes, in normal doses they can be combined for a short time."),
]


MERGE_RECORD = "merge.json"  # in the merged folder: what it was made from, and its check's figures
logger = get_logger(__name__)


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


def run_merge(cfg: Config, trained: Trained, data: DataVersion | None = None) -> Merged:
    """Merge the trained adapter into the base, judge the logits, save; return the figures."""
    run = trained.run
    with file_lock(run.lock, f"waiting for another run that merges the same adapter in {run.root}"):
        return _merge(cfg, run, data)


def _merge_key(cfg: Config, run: RunFolder) -> str:
    """What a merged model is made from: the adapter's weights and config, and the settings."""
    adapter = [content_hash(run.adapter / name) for name in ("adapter_model.safetensors", "adapter_config.json")]
    return hashlib.sha256(json.dumps([*adapter, section_hash(cfg.model, cfg.merge, cfg.tokenize)]).encode()).hexdigest()


def _merge(cfg: Config, run: RunFolder, data: DataVersion | None) -> Merged:
    key, record = _merge_key(cfg, run), run.merged / MERGE_RECORD
    if record.is_file() and (made := json.loads(record.read_text()))["key"] == key:
        logger.info("%s holds this adapter merged with these settings already: reused", run.merged)
        return Merged(run=run, logit_error=made["logit_error"], adapter_effect_kept=made["adapter_effect_kept"])
    adapter = str(run.adapter)
    tokenizer = load_tokenizer(cfg.model, adapter)
    base = load_base_model(cfg.model, quantized=False, dtype_name=cfg.merge.dtype, on_cpu=cfg.merge.device == "cpu")
    with_adapter = load_adapter(base, adapter)
    adapted = _logits(with_adapter, tokenizer, cfg.tokenize.template)
    with with_adapter.disable_adapter():
        effect = (adapted - _logits(with_adapter, tokenizer, cfg.tokenize.template)).norm().item()
    merged_model = with_adapter.merge_and_unload()
    gap = (adapted - _logits(merged_model, tokenizer, cfg.tokenize.template)).norm().item()
    error = gap / adapted.norm().item()
    if effect > 0:
        kept = 1 - gap / effect
        if kept < MIN_KEPT:
            raise MergeMismatch(
                f"the merged model keeps {kept:.0%} of the adapter's effect on the check prompts "
                f"(|merged - adapter| = {gap:.3g}, {error:.2%} of the logits; |adapter - base| = {effect:.3g}; "
                f"needs {MIN_KEPT:.0%}): not "
                f"saved. Either the merge is wrong or merge.dtype = {cfg.merge.dtype} rounds the adapter "
                "away (set merge.dtype: float32)"
            )
    elif error > ROUNDING[str(merged_model.dtype)]:
        raise MergeMismatch(f"merged logits differ from base + adapter by {error:.3g} relative: not saved")
    else:
        kept = 1.0
    with atomic_dir(run.merged) as staging:
        merged_model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(render_card(cfg, data.tags if data else {}, None, None, "merged"))
        write_json(staging / MERGE_RECORD, {"key": key, "logit_error": error, "adapter_effect_kept": kept})
    return Merged(run=run, logit_error=error, adapter_effect_kept=kept)


@step("merge")
def merge(cfg: Config, trained: Trained, data: DataVersion) -> Merged:
    return run_merge(cfg, trained, data)
