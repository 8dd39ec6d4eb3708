"""Step `evaluate`: base vs tuned on the same eval rows.

Reads params sections `model`, `tokenize` (template) and `evaluate`. Inputs: the tokenized eval
split, the processed eval JSONL (for sample prompts) and the merged model. Outputs in
`runs/<run>/eval/`: `report.json` (eval loss and perplexity of both models, over the answer tokens
the training loss used) and `samples.jsonl` (greedy answers of both models to a few eval prompts).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from chat_doctor.config import Config
from chat_doctor.files import read_jsonl, write_json, write_jsonl
from chat_doctor.modeling import base_location, device, load_base_model, load_tokenizer, resolve_dtype
from chat_doctor.prompts import build_prompt
from chat_doctor.tokenized import IGNORE_INDEX, load_split
from chat_doctor.tracking import log_metrics

EVAL_OOM_ENV = "CHAT_DOCTOR_EVAL_OOM_AT_BATCH"  # out-of-memory whenever the eval batch has this size


def eval_loss(model, tokenizer, dataset, batch_size: int) -> float:
    """Mean cross-entropy per label token (not per batch, so batch padding cannot skew it)."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate(dataset.select(range(start, min(start + batch_size, len(dataset)))).to_list())
            batch = {k: v.to(model.device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total += losses.item()
            count += int((labels != IGNORE_INDEX).sum())
    return total / count


def generate_answers(model, tokenizer, prompts: list[str], cfg: Config, batch_size: int) -> list[dict]:
    """Greedy answers, batched with left padding; `stopped` says whether EOS came before the limit."""
    import torch

    tokenizer.padding_side = "left"
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=cfg.evaluate.max_new_tokens,
                do_sample=False,
                repetition_penalty=cfg.evaluate.repetition_penalty,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            stopped = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id)] if stopped else row
            results.append({"answer": tokenizer.decode(row, skip_special_tokens=True).strip(), "stopped": stopped})
    return results


def with_smaller_batches(work, batch_size: int, what: str):
    """work(batch_size), halving the batch after out-of-memory until it fits (or 1 does not)."""
    import torch

    while True:
        try:
            if os.environ.get(EVAL_OOM_ENV) == str(batch_size):  # fault injection for tests and demos
                raise torch.OutOfMemoryError(f"out of memory (injected by {EVAL_OOM_ENV} at batch {batch_size})")
            return work(batch_size)
        except torch.OutOfMemoryError as err:
            if batch_size == 1:
                raise RuntimeError(f"{what}: out of memory at evaluate.batch_size 1 ({err})") from err
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch_size //= 2
            print(f"{what}: out of memory, retrying with evaluate.batch_size {batch_size}")


def _score(model, tokenizer, eval_set, prompts: list[str], cfg: Config) -> tuple[dict, list[dict]]:
    size = cfg.evaluate.batch_size
    loss = with_smaller_batches(lambda b: eval_loss(model, tokenizer, eval_set, b), size, "eval loss")
    answers = with_smaller_batches(lambda b: generate_answers(model, tokenizer, prompts, cfg, b), size, "generation")
    return {"loss": loss, "perplexity": math.exp(loss)}, answers


def run_evaluate(
    cfg: Config, tokenized_eval: str, processed_eval: str, merged: str, mlflow_run_id: str | None = None
) -> dict[str, str]:
    """Write the eval report and samples; return their paths and the headline figures."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(cfg.model, merged)
    eval_set = load_split(tokenized_eval)
    rows = read_jsonl(Path(processed_eval))[: cfg.evaluate.samples]
    prompts = [build_prompt(cfg.tokenize.template, row["input"]) for row in rows]
    dtype = resolve_dtype(cfg.merge.dtype)
    base = load_base_model(cfg.model, quantized=False, dtype_name=cfg.merge.dtype)
    base_scores, base_answers = _score(base, tokenizer, eval_set, prompts, cfg)
    del base
    tuned = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype, device_map={"": device()})
    tuned_scores, tuned_answers = _score(tuned, tokenizer, eval_set, prompts, cfg)
    out = Path(merged).parent / "eval"
    report = {
        "base_model": base_location(cfg.model),
        "eval_rows": len(eval_set),
        "base": base_scores,
        "tuned": tuned_scores,
    }
    samples = [
        {"query": row["input"], "reference": row["output"], "base": b, "tuned": t}
        for row, b, t in zip(rows, base_answers, tuned_answers, strict=True)
    ]
    write_json(out / "report.json", report)
    write_jsonl(out / "samples.jsonl", samples)
    if mlflow_run_id:
        figures = {f"eval/{m}_{k}": report[m][k] for m in ("base", "tuned") for k in ("loss", "perplexity")}
        log_metrics(mlflow_run_id, figures)
    return {"report": str(out / "report.json"), "samples": str(out / "samples.jsonl")}
