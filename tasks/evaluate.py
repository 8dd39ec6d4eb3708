"""Step `evaluate`: base vs tuned (and the current champion) on the same rows, as one report.

Reads params sections `model`, `tokenize` (template) and `evaluate`. Inputs: the tokenized and
processed eval split, the cleaned `evaluate.source` rows when given, the merged model, and the
champion's registry record. For each eval set and model: loss and perplexity over the answer tokens
training used; batched greedy generation (left padding, KV cache, the original settings) scored
with ROUGE-L, MiniLM similarity, EOS rate, repeated 3-gram rate and length. Outputs in
`runs/<run>/eval/`: `report.json`, `samples.jsonl` (per-row answers and scores), `summary.md`,
`chart.png`; the same figures as MLflow metrics and artifacts.

The champion is scored again on these rows unless its registered figures came from the same rows
and settings (same `eval_key`), so promotion always compares like with like.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from chat_doctor import faults
from chat_doctor.config import Config
from chat_doctor.eval_report import markdown_summary, plot_chart
from chat_doctor.files import content_hash, read_jsonl, write_json, write_jsonl, write_text
from chat_doctor.metrics import METRICS, answer_figures, loss_figures
from chat_doctor.modeling import (
    base_location,
    load_adapter,
    load_base_model,
    load_merged,
    load_tokenizer,
)
from chat_doctor.prompts import build_prompt
from chat_doctor.tokenized import IGNORE_INDEX, load_split, tokenize_row


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
    """Greedy answers, batched with left padding; `stopped` says whether EOS came before the limit.

    Prompts of similar length share a batch (longest first), so little of each batch is padding;
    the answers come back in the prompts' order."""
    import torch

    tokenizer.padding_side = "left"  # new tokens follow the prompt directly in every row
    order = sorted(range(len(prompts)), key=lambda i: -len(tokenizer(prompts[i])["input_ids"]))
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = [prompts[i] for i in order[start : start + batch_size]]
        batch = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=cfg.evaluate.max_new_tokens,
                do_sample=False,
                repetition_penalty=cfg.evaluate.repetition_penalty,
                use_cache=True,  # training saved use_cache=False in the config
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            stopped = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id)] if stopped else row
            answer = tokenizer.decode(row, skip_special_tokens=True).strip()
            results.append({"answer": answer, "stopped": stopped, "new_tokens": len(row)})
    by_prompt = [None] * len(prompts)
    for i, result in zip(order, results, strict=True):
        by_prompt[i] = result
    return by_prompt


def with_smaller_batches(work, batch_size: int, what: str):
    """work(batch_size), halving the batch after out-of-memory until it fits (or 1 does not)."""
    import torch

    while True:
        try:
            faults.eval_out_of_memory(batch_size)  # opt-in fault injection: nothing unless armed
            return work(batch_size)
        except torch.OutOfMemoryError as err:
            if batch_size == 1:
                raise RuntimeError(f"{what}: out of memory at evaluate.batch_size 1 ({err})") from err
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch_size //= 2
            print(f"{what}: out of memory, retrying with evaluate.batch_size {batch_size}")


def _eval_sets(cfg: Config, tokenizer, tokenized_eval: str, processed_eval: str, source: dict | None) -> dict:
    """{name: {"path", "rows", "dataset"}}: the eval split, and the extra source tokenized like it."""
    import datasets

    sets = {"eval_split": {"path": processed_eval, "rows": read_jsonl(Path(processed_eval))}}
    sets["eval_split"]["dataset"] = load_split(tokenized_eval)
    if source:
        rows = read_jsonl(Path(source["rows"]))
        encoded = [tokenize_row(tokenizer, cfg.tokenize, row) for row in rows]
        kept = [(ids, labels) for ids, labels, status in encoded if status != "dropped"]
        columns = {"input_ids": [ids for ids, _ in kept], "labels": [labels for _, labels in kept]}
        sets["source"] = {"path": source["rows"], "rows": rows, "dataset": datasets.Dataset.from_dict(columns)}
    return sets


def eval_key(cfg: Config, rows_file: str) -> str:
    """Identifies the rows and settings figures come from; equal keys = comparable figures."""
    settings = cfg.evaluate.model_dump(exclude={"batch_size", "source"})
    parts = [cfg.model.base, cfg.model.revision, cfg.tokenize.model_dump(), settings, content_hash(Path(rows_file))]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _score(model, tokenizer, sets: dict, cfg: Config) -> dict:
    """{set: {"figures", "answers"}} for one model."""
    size, out = cfg.evaluate.batch_size, {}
    for name, eval_set in sets.items():
        loss = with_smaller_batches(lambda b, s=eval_set: eval_loss(model, tokenizer, s["dataset"], b), size, "loss")
        rows = eval_set["rows"][: cfg.evaluate.rows]
        prompts = [build_prompt(cfg.tokenize.template, row["input"]) for row in rows]
        answers = with_smaller_batches(
            lambda b, p=prompts: generate_answers(model, tokenizer, p, cfg, b), size, "generation"
        )
        means, per_row = answer_figures(answers, [row["output"] for row in rows])
        scored = [{**a, **scores} for a, scores in zip(answers, per_row, strict=True)]
        out[name] = {"figures": {**loss_figures(loss), **means}, "answers": scored}
    return out


def _comparable(cfg: Config, key: str, champion: dict) -> str | None:
    """Why the champion needs no scoring here, or None when it must be scored on these rows."""
    if champion.get("eval_key") == key:
        return "registered (same rows and settings)"
    if (champion.get("base_model"), champion.get("base_revision")) != (cfg.model.base, str(cfg.model.revision)):
        return f"not comparable: trained on base {champion.get('base_model')!r}"
    return None


def _champion(cfg: Config, base, tokenizer, sets: dict, key: str, champion: dict) -> tuple[dict | None, str]:
    """(champion's scores on these sets, or None when there is nothing to score; where its figures
    come from). Merges the champion's adapter into `base`."""
    comparable = _comparable(cfg, key, champion)
    if comparable is not None:
        return None, comparable
    from chat_doctor.registry import download_adapter

    with tempfile.TemporaryDirectory() as tmp:
        adapter = download_adapter(cfg.registry.model_name, champion["version"], Path(tmp))
        merged = load_adapter(base, adapter).merge_and_unload()
    return _score(merged, tokenizer, sets, cfg), "scored again on these rows"


def _score_full(cfg: Config, tokenizer, sets: dict, key: str, merged: str, champion: dict | None):
    """Base, tuned (the merged model) and champion in full precision: what an export would serve."""
    scores = {}
    base = load_base_model(cfg.model, quantized=False, dtype_name=cfg.merge.dtype)
    scores["base"] = _score(base, tokenizer, sets, cfg)
    champion_scores, champion_figures = None, None
    if champion:
        champion_scores, champion_figures = _champion(cfg, base, tokenizer, sets, key, champion)  # reuses the base
    del base
    tuned = load_merged(merged, cfg.merge.dtype)
    scores["tuned"] = _score(tuned, tokenizer, sets, cfg)
    return scores, champion_scores, champion_figures


def _score_4bit(cfg: Config, tokenizer, sets: dict, key: str, merged: str, champion: dict | None):
    """Base, tuned and champion as QLoRA serves them: one 4-bit base, the adapters switched on it."""
    from chat_doctor.registry import download_adapter

    model = load_adapter(load_base_model(cfg.model, quantized=True), Path(merged).parent / "adapter")
    model.eval()
    with model.disable_adapter():
        scores = {"base": _score(model, tokenizer, sets, cfg)}
    scores["tuned"] = _score(model, tokenizer, sets, cfg)
    if not champion:
        return scores, None, None
    if (comparable := _comparable(cfg, key, champion)) is not None:
        return scores, None, comparable
    with tempfile.TemporaryDirectory() as tmp:
        load_adapter(model, download_adapter(cfg.registry.model_name, champion["version"], Path(tmp)), "champion")
    return scores, _score(model, tokenizer, sets, cfg), "scored again on these rows"


def run_evaluate(
    cfg: Config,
    tokenized_eval: str,
    processed_eval: str,
    merged: str,
    eval_source: dict | None = None,
    champion: dict | None = None,
) -> dict:
    """Score base, tuned (and champion); write the report files; return their paths."""
    tokenizer = load_tokenizer(cfg.model, merged)
    sets = _eval_sets(cfg, tokenizer, tokenized_eval, processed_eval, eval_source)
    gate = "source" if eval_source else "eval_split"
    key = eval_key(cfg, sets[gate]["path"])
    score_models = _score_4bit if cfg.evaluate.load_in_4bit else _score_full
    scores, champion_scores, champion_figures = score_models(cfg, tokenizer, sets, key, merged, champion)
    if champion_scores:
        scores["champion"] = champion_scores
    report = {
        "base_model": base_location(cfg.model),
        "gate_set": gate,
        "eval_key": key,
        "generation": cfg.evaluate.model_dump(include={"max_new_tokens", "repetition_penalty", "rows"}),
        "champion": {"version": champion["version"], "figures": champion_figures} if champion else None,
        "sets": {
            name: {
                "rows": len(eval_set["dataset"]),
                "generated": min(cfg.evaluate.rows, len(eval_set["rows"])),
                "source": eval_set["path"],
                "models": {model: scores[model][name]["figures"] for model in scores},
            }
            for name, eval_set in sets.items()
        },
    }
    if eval_source:
        report["sets"]["source"]["cleaning"] = json.loads(Path(eval_source["report"]).read_text())
    if champion and champion.get("eval_key") == key:  # its registered figures come from these very rows
        report["sets"][gate]["models"]["champion"] = champion["figures"]
    samples = [
        {"set": name, "query": row["input"], "reference": row["output"]}
        | {model: scores[model][name]["answers"][i] for model in scores}
        for name, eval_set in sets.items()
        for i, row in enumerate(eval_set["rows"][: cfg.evaluate.rows])
    ]
    out = Path(merged).parent / "eval"
    write_jsonl(out / "samples.jsonl", samples)
    write_text(out / "summary.md", markdown_summary(report, samples))
    plot_chart(report, out / "chart.png")
    write_json(out / "report.json", report)  # last: its presence means the evaluation is complete
    files = {"report": "report.json", "samples": "samples.jsonl", "summary": "summary.md", "chart": "chart.png"}
    return {name: str(out / file) for name, file in files.items()}


PER_ANSWER = [name for name, m in METRICS.items() if m.per_answer]  # per-row columns of the MLflow table


def log_evaluation(mlflow_run_id: str, paths: dict[str, str]) -> None:
    """Figures as MLflow metrics (`eval/` for the eval split, `eval_source/` for the extra rows), the
    files as artifacts, and the per-row answers as an MLflow table."""
    from chat_doctor.tracking import log_artifact, log_metrics, log_table

    report = json.loads(Path(paths["report"]).read_text())
    for name, result in report["sets"].items():
        prefix = "eval" if name == "eval_split" else "eval_source"
        figures = {f"{prefix}/{model}_{k}": v for model, fig in result["models"].items() for k, v in fig.items()}
        log_metrics(mlflow_run_id, figures)
    for path in paths.values():
        log_artifact(mlflow_run_id, path, "eval")
    rows = [
        {"set": r["set"], "query": r["query"], "reference": r["reference"]}
        | {f"{m}_{k}": r[m][k] for m in ("base", "tuned") for k in ("answer", "stopped", *PER_ANSWER)}
        for r in read_jsonl(Path(paths["samples"]))
    ]
    log_table(mlflow_run_id, rows, "eval/answers.json")
