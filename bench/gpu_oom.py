"""Real out-of-memory recovery on a GPU: Mistral-7B shapes (random weights) at a micro-batch too large
for the card, retried the way the flow's Prefect task retries it (half the micro-batch, twice the
accumulation, resume from the last complete checkpoint) until it fits.

    python bench/gpu_oom.py --tokenizer <saved tokenizer folder> --micro-batch 64 --steps 3
    python bench/gpu_oom.py --base tiny --micro-batch 4 --steps 4   # CPU, with CHAT_DOCTOR_FAULTS=oom_at_step=2

Prints one line per attempt and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data_bench import write_source
from bench.gpu_smoke import build_random_7b
from chat_doctor.config import build_config
from tasks.sample import run_sample
from tasks.tokenize import run_tokenize
from tasks.train import OutOfMemory, run_train

RETRIES = 4  # as many halvings as the flow's train task allows, plus one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="mistral-7b-random")
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/chat-doctor-oom"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.base
    if base == "mistral-7b-random":
        base = str(build_random_7b(args.out / "mistral-7b-random", args.tokenizer))
    source = args.out / "long_rows.jsonl"
    write_source(source, 2000)  # realistic lengths: a few hundred tokens a row
    cfg = build_config(
        {
            "preset": "mistral-7b-original" if args.base != "tiny" else "cpu-tiny",
            "runs_dir": str(args.out / "runs"),
            "model": {"base": base},
            "data": {"source": str(source), "rows": 1000},
            "tokenize": {"max_length": 1024},
            "train": {
                "max_steps": args.steps,
                "micro_batch_size": args.micro_batch,
                "grad_accum": 1,
                "save_steps": 1,
                "logging_steps": 1,
                "gradient_checkpointing": False,  # activations at full size: the micro-batch decides
            },
        }
    )
    processed = run_sample(cfg.data, args.out / "processed")
    tokenized = run_tokenize(cfg.tokenize, cfg.model, processed, args.out / "tokenized")
    attempts = []
    for attempt in range(1, RETRIES + 2):
        start = time.perf_counter()
        try:
            result = run_train(cfg, tokenized)
        except OutOfMemory as err:
            attempts.append({"attempt": attempt, "outcome": str(err), "seconds": round(time.perf_counter() - start)})
            print(f"attempt {attempt}: {err}", flush=True)
            continue
        attempts.append(
            {
                "attempt": attempt,
                "outcome": "completed",
                "resumed_from": result.resumed_from,
                "seconds": round(time.perf_counter() - start),
            }
        )
        print(f"attempt {attempt}: completed, resumed from {result.resumed_from or 'the start'}", flush=True)
        break
    run = result.run
    state = json.loads((run.checkpoints / f"checkpoint-{args.steps}" / "trainer_state.json").read_text())
    used = json.loads(run.attempt.read_text())["config"]["train"]
    summary = {
        "attempts": attempts,
        "micro_batch_used": used["micro_batch_size"],
        "grad_accum_used": used["grad_accum"],
        "losses": [round(e["loss"], 3) for e in state["log_history"] if "loss" in e],
        "tokens_seen": state.get("num_input_tokens_seen"),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
