"""Training speed on one GPU: the original recipe, plain packing, unsloth and our presets, side by side.

    python bench/gpu_speed.py --rows <real rows> [--rows ...] --tokenizer <tokenizer folder> \\
        [--peer-path <site folder holding unsloth>] [--record]

Every recipe trains Mistral-7B's shapes (seeded random weights: no hub) in its own process, one
after the other on the same card, on the same real rows tokenized once (original template,
max_length 512, EOS kept). Each reports real (non-padding) tokens/s over the steps after a
warm-up and its peak GPU memory. Checks: every grad norm is above 0, the loss falls, and each of
our recipes' losses after N steps match its reference on the same batches within noise: `plain`
for the recipes that count rows (16 a micro-batch, 4 a step), `fast` for those that pack rows
into token bins (16 bins of <= 1,536 tokens a step: ~24k tokens).
Steps differ in size, so their counts are scaled to about the same tokens: --steps for the row
recipes, 4x for the notebook (4 rows a step), half for the bin recipes and 2x for unsloth (8k).
At the default 25 timed steps the whole list is long; it can run in two parts, e.g. the notebook,
plain, fast, unsloth and lean, then the levers (--recipes plain,+bf16,+liger,-ckpt,fast-rows).
It prints a table with ratios to `original` and to `unsloth`; --record appends it, with card,
versions, date and command, to bench/RESULTS.md. `--generate` adds the evaluate step's generation
speed on the merged bf16 model at several batch sizes; `--generation --gen-preset smollm2-135m`
runs that part alone (also on a CPU, on the demo's real model) to see how batching changes answers.

--rows takes a `save_to_disk` folder, a .json array or a .jsonl file of {instruction, input, output}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (how it runs, what it is). `ours` recipes are a preset plus overrides, trained by the
# pipeline's own build_trainer; each lever is added to the one before it. Each starts from its preset
# as it was before train.fp8 and compiled layers became the Mistral presets' defaults (issue 32), so
# every lever keeps the meaning its figures in bench/RESULTS.md have; `shipped` recipes take the
# preset exactly as it is now.
BEFORE_FP8 = {"train.fp8": False, "train.compile": False, "train.kernels": "liger"}
# Rows, not bins: 16 rows a micro-batch (however long), 4 a step, as the notebook counts.
ROWS = {"train.pack_length": 0, "train.micro_batch_size": 16, "train.grad_accum": 4, "train.compile": False}
LIGER_ROWS = {**ROWS, "train.kernels": "liger"}
PLAIN = {
    **ROWS,
    "lora.dropout": 0.05,
    "lora.adapter_dtype": "float32",
    "train.upcast_layers": True,
    "train.kernels": "none",
    "train.gradient_checkpointing": True,
    "train.optim": "paged_adamw_8bit",
    "train.attention": "sdpa",
}
RECIPES: dict[str, dict] = {
    "original": {"kind": "original", "what": "the notebook: pad to 512, micro-batch 4, + lm_head adapter, "
                 "fp32 norms, checkpointing, paged 8-bit AdamW"},
    "plain": {"kind": "ours", "preset": "mistral-7b", "set": PLAIN,
              "what": "transformers + peft + bitsandbytes, packed 16 rows (<= 8,192 tokens), checkpointing"},
    "+bf16": {"kind": "ours", "preset": "mistral-7b",
              "set": {**PLAIN, "lora.dropout": 0.0, "lora.adapter_dtype": "compute", "train.upcast_layers": False,
                      "train.attention": "sdpa"},
              "what": "plain, bf16 norms/lm_head/adapters, no LoRA dropout"},
    "+liger": {"kind": "ours", "preset": "mistral-7b",
               "set": {**LIGER_ROWS, "train.gradient_checkpointing": True, "train.optim": "paged_adamw_8bit",
                       "train.attention": "sdpa"},
               "what": "+bf16, liger RMSNorm/SwiGLU/RoPE + fused lm_head loss"},
    "-ckpt": {"kind": "ours", "preset": "mistral-7b", "set": {**LIGER_ROWS, "train.attention": "sdpa"},
              "what": "+liger, no checkpointing, fused AdamW"},
    "fast-rows": {"kind": "ours", "preset": "mistral-7b", "set": LIGER_ROWS,
                  "what": "-ckpt, torch's varlen flash attention per packed row (no mask)"},
    "fast": {"kind": "ours", "preset": "mistral-7b", "set": {}, "bins": True,
             "what": "preset mistral-7b before issue 32 (bf16, liger's kernels, uncompiled): fast-rows, "
             "micro-batches of 4 bins of <= 1,536 tokens (whole rows), 4 a step"},
    "fast-2048": {"kind": "ours", "preset": "mistral-7b", "set": {"train.pack_length": 2048}, "bins": True,
                  "what": "fast with bins of <= 2,048 tokens"},
    "fast+flex": {"kind": "ours", "preset": "mistral-7b", "set": {"train.attention": "flex_attention"},
                  "bins": True, "reference": "fast",
                  "what": "fast with flex attention (skips the blocks between packed rows)"},
    "fast+compile": {"kind": "ours", "preset": "mistral-7b", "set": {"train.kernels": "none", "train.compile": True},
                     "bins": True, "reference": "fast",
                     "what": "fast with each decoder layer torch.compile'd instead of liger's kernels (train.compile)"},
    "fast+compile+loss": {"kind": "ours", "preset": "mistral-7b", "bins": True, "reference": "fast",
                          "set": {"train.kernels": "liger-loss", "train.compile": True},
                          "what": "fast+compile, keeping liger's fused lm_head + loss (train.kernels: liger-loss)"},
    "fast+compile-again": {"kind": "ours", "preset": "mistral-7b", "bins": True, "reference": "fast",
                           "set": {"train.kernels": "none", "train.compile": True},
                           "what": "fast+compile once more: the inductor part of the compile comes from its cache"},
    # train.fp8 (issue 32): the frozen base's products in fp8 (chat_doctor/training/fp8.py); the loss check
    # against `fast` on the same batches is the numerics check.
    "fast+fp8": {"kind": "ours", "preset": "mistral-7b", "set": {"train.fp8": True}, "bins": True,
                 "reference": "fast", "what": "fast with the frozen base's products in fp8 e4m3, rowwise scales "
                 "(train.fp8)"},
    "fast+fp8+compile+loss": {"kind": "ours", "preset": "mistral-7b", "bins": True, "reference": "fast",
                              "set": {"train.fp8": True, "train.kernels": "liger-loss", "train.compile": True},
                              "what": "fast+fp8 with compiled decoder layers and liger's fused lm_head + loss"},
    "mistral-7b": {"kind": "ours", "preset": "mistral-7b", "set": {}, "shipped": True, "bins": True,
                   "reference": "fast", "what": "preset mistral-7b as shipped: fast with train.fp8 auto (on here), "
                   "compiled decoder layers and liger's fused lm_head + loss (= fast+fp8+compile+loss)"},
    "lean+fp8": {"kind": "ours", "preset": "mistral-7b-lean", "bins": True,
                 "set": {"train.fp8": True, "train.fp8_weights": "fp8"},
                 "reference": "fast", "what": "lean with the frozen base's products in fp8, one fp8 copy of the "
                 "weights (train.fp8)"},
    "lean+fp8-4bit": {"kind": "ours", "preset": "mistral-7b-lean", "bins": True, "reference": "fast",
                      "set": {"train.fp8": True, "train.fp8_weights": "4bit"},
                      "what": "lean with fp8 products from the 4-bit weights, quantized for each product "
                      "(train.fp8_weights: 4bit)"},
    "mistral-7b-lean": {"kind": "ours", "preset": "mistral-7b-lean", "set": {}, "shipped": True, "bins": True,
                        "reference": "fast", "what": "preset mistral-7b-lean as shipped (train.fp8 off: = lean)"},
    "lean": {"kind": "ours", "preset": "mistral-7b-lean", "set": {}, "bins": True, "reference": "fast",
             "what": "preset mistral-7b-lean before issue 32: fast's micro-batches, recomputing each layer from "
             "its input kept in CPU memory, paged 8-bit AdamW"},
    "lean+compile": {"kind": "ours", "preset": "mistral-7b-lean", "bins": True, "reference": "fast",
                     "set": {"train.kernels": "liger-loss", "train.compile": True},
                     "what": "lean with compiled decoder layers and liger's fused lm_head + loss only"},
    "lean-gpu": {"kind": "ours", "preset": "mistral-7b-lean", "bins": True, "reference": "fast",
                 "set": {"train.checkpoint_offload": False},
                 "what": "lean with the checkpointed layer inputs kept on the GPU"},
    "lean-8bins": {"kind": "ours", "preset": "mistral-7b-lean", "bins": True, "reference": "fast",
                   "set": {"train.micro_batch_size": 8, "train.grad_accum": 2},
                   "what": "lean with 8 bins a micro-batch"},
    "lean-2bins": {"kind": "ours", "preset": "mistral-7b-lean", "bins": True, "reference": "fast",
                   "set": {"train.micro_batch_size": 2, "train.grad_accum": 8, "train.checkpoint_offload": False},
                   "what": "lean-gpu with 2 bins a micro-batch (the lean preset before)"},
    # The peer takes 3 micro-batches of 4 bins of <= 2,048 tokens a step: ~24k tokens, as `fast` does.
    "unsloth": {"kind": "unsloth", "seq": 2048, "batch": 4, "grad_accum": 3, "checkpointing": "unsloth",
                "what": "unsloth as it runs on this torch (varlen off: SDPA looped over rows), 3 x 4 bins of "
                "<= 2,048, its offloaded checkpointing (reference only)"},
    "unsloth-fair": {"kind": "unsloth", "seq": 2048, "batch": 4, "grad_accum": 3, "checkpointing": "unsloth",
                     "fair": True, "what": "unsloth with the varlen GQA work-around, its offloaded checkpointing"},
    "unsloth-fair-nockpt": {"kind": "unsloth", "seq": 2048, "batch": 4, "grad_accum": 3, "checkpointing": "off",
                            "fair": True, "what": "unsloth with the varlen GQA work-around, no checkpointing"},
}  # fmt: skip
# The fair peer of each memory class: a recipe of ours not compared with it in the same run fails.
PEER = {
    **dict.fromkeys(["fast", "fast+fp8", "fast+fp8+compile+loss", "mistral-7b"], "unsloth-fair-nockpt"),
    **dict.fromkeys(["lean", "lean+fp8", "lean+fp8-4bit", "mistral-7b-lean"], "unsloth-fair"),
}
REFERENCE = "plain"  # our recipes' losses are checked against this one unless they name theirs


def read_rows(sources: list[str]) -> list[dict]:
    rows: list[dict] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            import datasets

            rows += list(datasets.load_from_disk(str(path), keep_in_memory=True))
        elif path.suffix == ".jsonl":
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            rows += json.loads(path.read_text())
    return [r for r in rows if r.get("input") and r.get("output")]


def prepare(args) -> dict:
    """The random 7B model folder and the tokenized rows (ours, and the notebook's padded form)."""
    from bench.gpu_smoke import build_random_7b
    from chat_doctor.config import ModelConfig, TokenizeConfig
    from chat_doctor.data.tokenized import IGNORE_INDEX, tokenize_row, write_split
    from chat_doctor.models.loading import load_tokenizer

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.base == "mistral-7b-random":
        model_dir = build_random_7b(work / "mistral-7b-random", args.tokenizer)
    else:  # e.g. the embedded tiny model, to try the harness on a CPU
        from chat_doctor.models.loading import base_location

        model_dir = Path(base_location(ModelConfig(base=args.base)))
    tokenizer = load_tokenizer(ModelConfig(base=str(model_dir)))
    tok_cfg = TokenizeConfig(template="original", max_length=512, loss_on="completion")
    ids_col, labels_col = [], []
    source = read_rows(args.rows)
    for row in source:
        ids, labels, status = tokenize_row(tokenizer, tok_cfg, row)
        if status != "dropped":
            ids_col.append(ids)
            labels_col.append(labels)
    kept, tokens = len(ids_col), sum(len(i) for i in ids_col)
    # Cycle the real rows until every recipe's warm-up and timed steps find new rows to read.
    for i in range(10**7):
        if tokens >= args.tokens:
            break
        ids_col.append(ids_col[i % kept])
        labels_col.append(labels_col[i % kept])
        tokens += len(ids_col[-1])
    write_split(work / "train.arrow", {"input_ids": ids_col, "labels": labels_col})
    # The notebook: every row padded to 512 with pad = eos, loss on all tokens, and every eos
    # (the real one too) masked as padding.
    eos, n = tokenizer.eos_token_id, 512
    padded = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids in ids_col:
        padded["input_ids"].append(ids + [eos] * (n - len(ids)))
        padded["attention_mask"].append([1] * len(ids) + [0] * (n - len(ids)))
        padded["labels"].append([IGNORE_INDEX if t == eos else t for t in padded["input_ids"][-1]])
    write_split(work / "original.arrow", padded)
    return {
        "model": str(model_dir),
        "source_rows": kept,
        "rows": len(ids_col),
        "tokens": tokens,
        "padding_share": 1 - tokens / (n * len(ids_col)),
    }


def _recipe_config(name: str, model: str, steps: int, warmup: int):
    from chat_doctor.config import build_config, deep_merge, parse_overrides

    recipe = RECIPES[name]
    if recipe["kind"] == "original":
        raw = {"preset": "mistral-7b-original", "lora": {"target_modules": [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]}}  # fmt: skip
    else:
        overrides = recipe["set"] if recipe.get("shipped") else {**BEFORE_FP8, **recipe["set"]}
        raw = deep_merge({"preset": recipe["preset"]}, parse_overrides(overrides))
    raw = deep_merge(raw, {
        "runs_dir": "runs/bench", "model": {"base": model},
        "train": {"max_steps": warmup + steps, "logging_steps": 1, "save_steps": 10**6, "gpus": 1},
    })  # fmt: skip
    return build_config(raw, source=f"recipe {name}")


def _timed_steps(name: str, steps: int) -> int:
    """Timed optimizer steps: `steps` for every recipe (~24k tokens a step for bins and the peer,
    ~17k for 64 rows); 4x as many for the notebook, whose steps hold 4 rows."""
    return steps * 4 if RECIPES[name]["kind"] == "original" else steps


def run_one(args) -> None:
    """Child process: train one recipe of ours (or the original) and emit its figures."""
    from bench.speed_probe import StepTimer, emit
    from chat_doctor.training.trainer import build_trainer

    name = args.run
    original = RECIPES[name]["kind"] == "original"
    cfg = _recipe_config(name, args.model, _timed_steps(name, args.steps), args.warmup)
    timer = StepTimer(args.warmup)
    data = str(args.work / ("original.arrow" if original else "train.arrow"))
    trainer = build_trainer(cfg, data, args.work / "checkpoints" / name, [timer])
    trainer.train()
    if args.save_adapter:
        trainer.model.save_pretrained(args.save_adapter, safe_serialization=True)
    emit({**timer.figures(), "micro_batch": cfg.train.micro_batch_size, "grad_accum": cfg.train.grad_accum})


def generation_speed(args) -> None:
    """Child process: the evaluate step's own generation (tasks/evaluate.py generate_answers, greedy,
    repetition penalty 1.15, up to 125 new tokens, prompts batched by length) of --gen-rows real
    prompts at each of --gen-batches, with the bf16 model (--adapter merged into it when given); each
    set of answers is compared with the first's. On a CPU too (--gen-preset smollm2-135m: a real model)."""
    import torch

    from bench.speed_probe import emit
    from chat_doctor.config import build_config
    from chat_doctor.data.prompts import build_prompt
    from chat_doctor.evaluation.scoring import generate_answers
    from chat_doctor.models.loading import load_adapter, load_base_model, load_tokenizer

    cuda = torch.cuda.is_available()
    cfg = build_config({"preset": args.gen_preset, **({"model": {"base": args.model}} if args.model else {})})
    tokenizer = load_tokenizer(cfg.model)
    rows = read_rows(args.rows)
    prompts = [build_prompt(cfg.tokenize.template, rows[i % len(rows)]["input"]) for i in range(args.gen_rows)]
    model = load_base_model(cfg.model, quantized=False, dtype_name=args.gen_dtype)
    if args.adapter:
        model = load_adapter(model, args.adapter).merge_and_unload()
    model = model.eval()
    generate_answers(model, tokenizer, prompts[:8], cfg, 8)  # warm-up
    figures, baseline = {}, None
    for batch in args.gen_batches:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        start = time.perf_counter()
        answers = generate_answers(model, tokenizer, prompts, cfg, batch)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        texts = [a["answer"] for a in answers]
        baseline = baseline or texts
        figures[f"batch {batch}"] = {
            "seconds": round(seconds, 1),
            "new_tokens_per_s": round(sum(a["new_tokens"] for a in answers) / seconds, 1),
            "same_answers_as_first": round(sum(a == b for a, b in zip(texts, baseline, strict=True)) / len(texts), 3),
            "shared_words_with_first": round(_shared_prefix_share(texts, baseline), 3),
            "stopped": round(sum(a["stopped"] for a in answers) / len(answers), 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        }
        print(json.dumps({f"batch {batch}": figures[f"batch {batch}"]}), flush=True)
    emit({"rows": len(prompts), "model": str(cfg.model.base), "dtype": args.gen_dtype, "forms": figures})


def generation_table(gen: dict) -> str:
    lines = [
        f"| evaluate-step generation, {gen['model']} {gen['dtype']}, {gen['rows']} real prompts | seconds "
        "| new tokens/s | same answers as the first | words shared with the first | stopped | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in gen["forms"].items():
        peak = f"{v['peak_gib']:.1f}" if v.get("peak_gib") is not None else "-"
        lines.append(
            f"| {name} | {v['seconds']:.1f} | {v['new_tokens_per_s']:,.0f} | {v['same_answers_as_first']:.1%} "
            f"| {v['shared_words_with_first']:.1%} | {v['stopped']:.1%} | {peak} |"
        )
    return "\n".join(lines)


def _shared_prefix_share(texts: list[str], baseline: list[str]) -> float:
    """Of the baseline's words, the share that each answer repeats before it first differs."""
    shared = total = 0
    for text, base in zip(texts, baseline, strict=True):
        a, b = text.split(), base.split()
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        shared, total = shared + same, total + max(len(b), 1)
    return shared / total


def _child(cmd: list[str], env: dict, timeout: int, log: Path) -> dict:
    """Run a child, keep its log, return its RESULT line (or the error at its end)."""
    from bench.speed_probe import last_result

    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output, code = f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {timeout} s", -1
    log.write_text(output if isinstance(output, str) else output.decode(errors="replace"))
    result = last_result(output)
    if code == 0 and result is not None:
        return {**result, "wall_s": round(time.perf_counter() - start, 1)}
    return {"error": "\n".join(output.strip().splitlines()[-6:])}


def checks(results: dict) -> dict[str, str]:
    """Training really happens and our recipes match their reference on the same batches. A verdict
    names what it compared and what it could not; "ok" alone is never said."""
    verdicts = {}
    for name, r in results.items():
        if "losses" not in r:
            continue
        problems, compared, skipped = [], [], []
        losses, grad_norms = r["losses"], r.get("grad_norms", [])
        if r.get("timed_steps", 0) < 20 and r.get("timed_tokens", 0) < 300_000:
            problems.append(f"only {r.get('timed_steps')} timed steps, {r.get('timed_tokens')} tokens")
        if len(losses) < 2 or not grad_norms:
            skipped.append(f"too few steps ({len(losses)} losses, {len(grad_norms)} grad norms)")
        else:
            compared.append(f"{len(losses)} steps train")
            if not all(g > 0 for g in grad_norms):
                problems.append("a grad norm is 0")
            if not losses[-1] < losses[0]:
                problems.append(f"loss did not fall ({losses[0]} -> {losses[-1]})")
        reference = RECIPES[name].get("reference", REFERENCE)
        if RECIPES[name]["kind"] == "ours" and name != reference:
            ref = results.get(reference, {}).get("losses")
            if RECIPES[reference].get("bins") != RECIPES[name].get("bins"):
                skipped.append(f"loss against {reference} (other batches)")
            elif not ref or len(ref) != len(losses):
                skipped.append(f"loss against {reference} (no losses of the same steps in this run)")
            else:
                gap = max(abs(a - b) / b for a, b in zip(losses, ref, strict=True))
                r[f"max_rel_loss_gap_to_{reference}"] = round(gap, 4)
                compared.append(f"loss within {gap:.2%} of {reference}")
                if gap > 0.03:  # bf16 vs fp32 paths and dropout differ; a broken recipe is off by far more
                    problems.append(f"loss differs from {reference} by {gap:.1%}")
        peer = PEER.get(name)
        if peer:
            theirs = results.get(peer, {}).get("tokens_per_s")
            if theirs and "tokens_per_s" in r:
                compared.append(f"{r['tokens_per_s'] / theirs:.2f}x {peer}")
            else:
                problems.append(f"not compared with its peer {peer} (no figure for it in this run)")
        if not compared:
            problems.append("compared with nothing")
        verdict = "FAILED: " + "; ".join(problems) if problems else f"ok: {', '.join(compared)}"
        verdicts[name] = verdict + (f"; not compared: {', '.join(skipped)}" if skipped else "")
    return verdicts


def table(results: dict, verdicts: dict) -> str:
    base = results.get("original", {}).get("tokens_per_s")
    fair = {p: results.get(p, {}).get("tokens_per_s") for p in ("unsloth-fair-nockpt", "unsloth-fair")}
    lines = [
        "| recipe | what | tokens a step | real tokens/s | median step (p10-p90) | peak GiB | first step s "
        "| host waits a step | x original | x unsloth fair, no ckpt | x unsloth fair, ckpt | check |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        if "tokens_per_s" not in r:
            failed = f"| {name} | {RECIPES[name]['what']} | | failed |" + " |" * 7
            lines.append(f"{failed} {r.get('error', '')[-200:]!r} |")
            continue
        tps = r["tokens_per_s"]
        ratios = [f"{tps / ref:.2f}" if ref else "-" for ref in (base, *fair.values())]
        low, high = r.get("step_tokens_per_s_p10_p90", ["-", "-"])
        first, waits = (f"{r[k]:.1f}" if r.get(k) is not None else "-" for k in ("first_step_s", "host_waits_per_step"))
        lines.append(
            f"| {name} | {RECIPES[name]['what']} | {r.get('tokens_per_step', 0):,} | {tps:,.0f} | "
            f"{r.get('median_step_tokens_per_s', 0):,.0f} ({low:,.0f}-{high:,.0f}) | {r['peak_gib']:.1f} | {first} | "
            f"{waits} | {' | '.join(ratios)} | {verdicts.get(name, '-')} |"
        )
    return "\n".join(lines)


def versions(env_path: str | None = None) -> str:
    code = (
        "import importlib.metadata as m, torch;"
        "print(torch.cuda.get_device_name(0), '|', ', '.join(f'{p} {m.version(p)}' for p in "
        "['torch', 'transformers', 'peft', 'bitsandbytes', 'liger-kernel', 'unsloth', 'trl'] "
        "if __import__('importlib.util').util.find_spec(p.replace('-', '_'))))"
    )
    env = {**os.environ, **({"PYTHONPATH": env_path} if env_path else {})}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", action="append", required=True)
    parser.add_argument("--base", default="mistral-7b-random", help="mistral-7b-random, or tiny to try it on a CPU")
    parser.add_argument("--tokenizer", type=Path, default=None, help="saved tokenizer folder for the random model")
    parser.add_argument("--peer-path", default=None, help="PYTHONPATH holding unsloth and its needs (the peer)")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    # 25 steps of 64 rows span two of the length-grouped sampler's megabatches (800 rows each, longest
    # rows first), so the timed rows have the data's average length.
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per recipe (4x for the notebook)")
    parser.add_argument("--tokens", type=int, default=700_000, help="real rows are cycled up to this many tokens")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--generate", action="store_true", help="also time generation, 4-bit + adapter vs merged")
    parser.add_argument("--gen-rows", type=int, default=500, help="answers per setting (the evaluate step's 500)")
    parser.add_argument("--gen-batches", type=lambda v: [int(x) for x in v.split(",")], default=[16, 64, 128])
    parser.add_argument("--gen-dtype", default="bfloat16", help="the model's dtype (the evaluate step: bfloat16)")
    parser.add_argument("--gen-preset", default="mistral-7b", help="whose template and evaluate settings")
    parser.add_argument("--work", type=Path, default=Path("/tmp/chat-doctor-speed"))
    parser.add_argument("--logs", type=Path, default=None, help="folder for each child's full log")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per recipe")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    # Child modes.
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--generation", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--save-adapter", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return run_one(args)
    if args.generation:
        return generation_speed(args)

    started = time.strftime("%Y-%m-%d")
    data = prepare(args)
    print(f"prepared: {data}", flush=True)
    logs = args.logs or args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    common = ["--work", str(args.work), "--model", data["model"], "--steps", str(args.steps),
              "--warmup", str(args.warmup)] + [a for r in args.rows for a in ("--rows", r)]  # fmt: skip
    adapter = args.work / "adapter-fast"
    # Every child compiles into the project's cache (chat_doctor/training/compile_cache.py), as the
    # train step's child does, whatever folder this runs from; a user's own setting wins. The first
    # recipe that compiles a graph pays for it, a later one loads it (its first step says how fast).
    from chat_doctor.training.compile_cache import COMPILE_CACHE

    child_env = {"TORCHINDUCTOR_CACHE_DIR": str(ROOT / COMPILE_CACHE), **os.environ}
    for name in filter(None, args.recipes.split(",")):
        recipe = RECIPES[name]
        env = dict(child_env)
        if recipe["kind"] == "unsloth":
            if not args.peer_path:
                results[name] = {"error": "no --peer-path given"}
                continue
            env["PYTHONPATH"] = f"{args.peer_path}:{ROOT}"
            cmd = [sys.executable, str(ROOT / "bench" / "peer_unsloth.py"), "--model", data["model"],
                   "--data", str(args.work / "train.arrow"), "--seq", str(recipe["seq"]),
                   "--batch", str(recipe["batch"]), "--steps", str(_timed_steps(name, args.steps)),
                   "--warmup", str(args.warmup), "--grad-accum", str(recipe["grad_accum"]),
                   "--checkpointing", recipe["checkpointing"],
                   *(["--varlen-gqa"] if recipe.get("fair") else [])]  # fmt: skip
        else:
            extra = ["--save-adapter", str(adapter)] if name == "fast" else []
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run", name, *common, *extra]
        results[name] = _child(cmd, env, args.timeout, logs / f"{name.replace('+', '_plus_')}.log")
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        (args.work / "results.json").write_text(json.dumps({"data": data, "results": results}))
    verdicts = checks(results)
    report = table(results, verdicts)
    if args.generate and adapter.is_dir():
        cmd = [sys.executable, str(Path(__file__).resolve()), "--generation", *common, "--adapter", str(adapter),
               "--gen-rows", str(args.gen_rows), "--gen-batches", ",".join(map(str, args.gen_batches))]  # fmt: skip
        gen = _child(cmd, dict(os.environ), 2 * args.timeout, logs / "generate.log")
        print(f"generate: {json.dumps(gen)}", flush=True)
        if "error" not in gen:
            report += "\n\n" + generation_table(gen)
    print(report)
    (args.work / "results.json").write_text(json.dumps({"data": data, "results": results, "checks": verdicts}))
    if args.record:
        peer = versions(f"{args.peer_path}:{ROOT}") if args.peer_path else "-"
        record(
            args.work,
            f"Training speed on one GPU: original recipe, plain, unsloth, our presets ({started})",
            f"- Card and versions: {versions()}; peer: {peer}\n- Command: `{command_line('gpu_speed.py')}`\n"
            f"- Data: {data['source_rows']:,} real rows cycled to {data['rows']:,} ({data['tokens']:,} tokens; "
            f"padding to 512 would add {data['padding_share']:.0%}); {args.warmup} warm-up steps, then "
            f"{args.steps} timed optimizer steps per recipe ({_timed_steps('original', args.steps)} of 4 rows "
            f"for the notebook); tokens per step in the table.\n\n{report}\n",
        )


def command_line(script: str) -> str:
    """This command as RESULTS.md shows it: absolute paths by their last part only."""
    shown = (a if not a.startswith("/") else "<" + Path(a).name + ">" for a in sys.argv[1:])
    return f"python bench/{script} " + " ".join(shown)


def record(work: Path, title: str, body: str) -> None:
    """The entry into <work>/entry.md and at the end of bench/RESULTS.md."""
    entry = f"\n## {title}\n\n{body}"
    (work / "entry.md").write_text(entry)
    with open(ROOT / "bench" / "RESULTS.md", "a") as f:
        f.write(entry)


if __name__ == "__main__":
    main()
