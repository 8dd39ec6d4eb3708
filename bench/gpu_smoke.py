"""GPU smoke run of the pipeline's steps with Mistral-7B shapes (random weights: no hub needed).

Runs sample -> tokenize -> train (NF4 4-bit through bitsandbytes, paged 8-bit AdamW, bf16,
gradient checkpointing: the `mistral-7b-original` preset) -> merge (bf16, logit check) -> evaluate, and
prints one JSON line of figures: step times, real tokens/s, peak GPU memory, losses.

    python bench/gpu_smoke.py --base mistral-7b-random --steps 30 --out /tmp/smoke
    python bench/gpu_smoke.py --base tiny --steps 4      # the same code path on a CPU

`--tokenizer DIR` gives a saved tokenizer folder to use for the random model (default: the
embedded Mistral v1 tokenizer, which needs the mistral-common package).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chat_doctor.config import build_config
from chat_doctor.models.embedded import MISTRAL_7B_SHAPE


def build_random_7b(folder: Path, tokenizer_dir: Path | None) -> Path:
    """Mistral-7B's architecture with seeded random weights, saved as bf16 safetensors."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = MistralForCausalLM(MistralConfig(**MISTRAL_7B_SHAPE, dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    if tokenizer_dir:
        for file in tokenizer_dir.iterdir():
            shutil.copy(file, folder / file.name)
    else:
        from chat_doctor.models.embedded import write_tokenizer

        write_tokenizer(folder)
    return folder


def _peak_gib() -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="mistral-7b-random", help="`mistral-7b-random`, `tiny` or a model folder")
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("/tmp/chat-doctor-smoke"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    figures: dict = {}
    start = time.perf_counter()
    base = args.base
    if base == "mistral-7b-random":
        base = str(build_random_7b(args.out / "mistral-7b-random", args.tokenizer))
        figures["build_s"] = round(time.perf_counter() - start, 1)
    cfg = build_config(
        {
            "preset": "mistral-7b-original" if args.base != "tiny" else "cpu-tiny",
            "runs_dir": str(args.out / "runs"),
            "model": {"base": base},
            "data": {"source": "data/raw/synthetic_healthcaremagic.jsonl", "rows": 400},
            "train": {"max_steps": args.steps, "save_steps": max(args.steps // 3, 1), "logging_steps": 5},
            "evaluate": {"rows": 16, "max_new_tokens": 64},
        }
    )
    timings = {}

    def timed(name, fn, *a):
        t0 = time.perf_counter()
        result = fn(*a)
        timings[name] = round(time.perf_counter() - t0, 1)
        figures[f"{name}_peak_gib"] = _peak_gib()
        return result

    # The tasks (and through them the orchestration stack) only here: build_random_7b is imported by
    # benches that run where Prefect and boto3 are not installed.
    from tasks.evaluate import run_evaluate
    from tasks.merge import run_merge
    from tasks.sample import run_sample
    from tasks.tokenize import run_tokenize
    from tasks.train import run_train

    processed = timed("sample", run_sample, cfg.data, args.out / "processed")
    tokenized = timed("tokenize", run_tokenize, cfg.tokenize, cfg.model, processed, args.out / "tokenized")
    trained = timed("train", run_train, cfg, tokenized)
    merged = timed("merge", run_merge, cfg, trained)
    report = timed("evaluate", run_evaluate, cfg, tokenized, processed, merged, None, None, args.out / "eval")
    state = json.loads((trained.run.checkpoints / f"checkpoint-{args.steps}" / "trainer_state.json").read_text())
    logs = [e for e in state["log_history"] if "loss" in e]
    figures.update(
        timings_s=timings,
        train_losses=[round(e["loss"], 3) for e in logs],
        grad_norms=[round(e["grad_norm"], 3) for e in logs],
        real_tokens=state.get("num_input_tokens_seen"),
        real_tokens_per_s_incl_load=round(state.get("num_input_tokens_seen", 0) / timings["train"], 1),
        merge_logit_error=merged.logit_error,
        eval=json.loads(report.report.read_text()),
        samples=[json.loads(line) for line in report.samples.read_text().splitlines()[:2]],
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
