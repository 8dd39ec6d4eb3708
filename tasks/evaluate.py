"""Step `evaluate`: base vs tuned on the same eval rows.

Reads params sections `model`, `tokenize` (template) and `evaluate`. Inputs: the tokenized eval
split, the processed eval JSONL (for sample prompts) and the merged model. Outputs in
`runs/<run>/eval/`: `report.json` (eval loss and perplexity of both models, over the answer tokens
the training loss used) and `samples.jsonl` (greedy answers of both models to a few eval prompts).
"""

from __future__ import annotations

import math
from pathlib import Path

from chat_doctor.config import Config
from chat_doctor.files import read_jsonl, write_json, write_jsonl
from chat_doctor.modeling import base_location, device, load_base_model, load_tokenizer, resolve_dtype
from chat_doctor.prompts import build_prompt
from chat_doctor.tokenized import IGNORE_INDEX, load_split
from chat_doctor.tracking import log_metrics


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


def generate_answers(model, tokenizer, prompts: list[str], cfg: Config) -> list[dict]:
    """Greedy answers, batched with left padding; `stopped` says whether EOS came before the limit."""
    import torch

    tokenizer.padding_side = "left"
    results = []
    for start in range(0, len(prompts), cfg.evaluate.batch_size):
        chunk = prompts[start : start + cfg.evaluate.batch_size]
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


def _score(model, tokenizer, eval_set, prompts: list[str], cfg: Config) -> tuple[dict, list[dict]]:
    loss = eval_loss(model, tokenizer, eval_set, cfg.evaluate.batch_size)
    return {"loss": loss, "perplexity": math.exp(loss)}, generate_answers(model, tokenizer, prompts, cfg)


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
