"""Scoring one model on eval rows: loss over the answer tokens, batched greedy answers, and the
figures of the metrics registry; batches halve on out-of-memory."""

from __future__ import annotations

import time

from chat_doctor.config import Config
from chat_doctor.core import faults
from chat_doctor.core.logs import get_logger
from chat_doctor.data.prompts import build_prompt
from chat_doctor.data.tokenized import IGNORE_INDEX
from chat_doctor.evaluation.metrics import answer_figures, loss_figures

logger = get_logger(__name__)


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
    return [result for _, result in sorted(zip(order, results, strict=True), key=lambda pair: pair[0])]


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
            logger.warning("%s: out of memory, retrying with evaluate.batch_size %d", what, batch_size)


def score_model(model, tokenizer, sets: dict, cfg: Config, label: str = "model") -> dict:
    """{set: {"figures", "answers"}} for one model (`label` names it in the log)."""
    size = cfg.evaluate.batch_size
    out: dict[str, dict] = {}
    for name, eval_set in sets.items():
        started = time.perf_counter()
        loss = with_smaller_batches(lambda b, s=eval_set: eval_loss(model, tokenizer, s["dataset"], b), size, "loss")
        loss_done = time.perf_counter()
        rows = eval_set["rows"][: cfg.evaluate.rows]
        prompts = [build_prompt(cfg.tokenize.template, row["input"]) for row in rows]
        answers = with_smaller_batches(
            lambda b, p=prompts: generate_answers(model, tokenizer, p, cfg, b), size, "generation"
        )
        answers_done = time.perf_counter()
        means, per_row = answer_figures(answers, [row["output"] for row in rows])
        # Where evaluation's time goes: generation dominates, and grows with answers that never stop.
        new_tokens, stopped = sum(a["new_tokens"] for a in answers), sum(a["stopped"] for a in answers)
        logger.info(
            "%s on %s: loss over %d rows in %.1f s; %d answers (%d new tokens, %d stopped) in %.1f s; scored in %.1f s",
            label, name, len(eval_set["dataset"]), loss_done - started, len(answers), new_tokens, stopped,
            answers_done - loss_done, time.perf_counter() - answers_done,
        )  # fmt: skip
        scored = [{**a, **scores} for a, scores in zip(answers, per_row, strict=True)]
        out[name] = {"figures": {**loss_figures(loss), **means}, "answers": scored}
    return out
