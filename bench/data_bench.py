"""Data benchmark: sample + validate + clean + tokenize from a 112k-row source (run by hand).

Builds a synthetic HealthCareMagic-shaped JSONL of 112,000 rows whose lengths follow the real
data (query median ~350 characters, answer ~560, long tails to ~2,500), then times the sample step
(strict validation of every source row, cleaning, dedupe, seeded sample of 5,000, 90/10 split)
and the tokenize step (Mistral v1 tokenizer), as the `mistral-7b` preset runs them.

    python bench/data_bench.py [--rows 112000] [--sample 5000]
Goal: at most 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chat_doctor.config import ModelConfig, TokenizeConfig, build_config
from chat_doctor.data.synthetic import conditions, synthetic_row
from tasks.sample import run_sample
from tasks.tokenize import run_tokenize


def _stretch(rng: random.Random, text: str, target: int) -> str:
    """Repeat sentence-shaped filler until the text reaches about `target` characters."""
    filler = [c.advice for c in conditions()]
    while len(text) < target:
        text += f" Also, {rng.choice(filler)}."
    return text


def write_source(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            row = synthetic_row(rng)
            row["input"] = _stretch(rng, row["input"], int(min(rng.lognormvariate(5.85, 0.6), 2500)))
            row["output"] = _stretch(rng, row["output"], int(min(rng.lognormvariate(6.33, 0.5), 2300)))
            if i % 3 == 0:
                row["output"] = "Hi, thanks for using Chat Doctor. " + row["output"]  # the scraper's artefact
            fh.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=112_000)
    parser.add_argument("--sample", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source.jsonl"
        write_source(source, args.rows)
        data = build_config({"data": {"source": str(source), "rows": args.sample, "strict": True}}).data
        start = time.perf_counter()
        processed = run_sample(data, Path(tmp) / "processed")
        sampled = time.perf_counter()
        tokenized = run_tokenize(TokenizeConfig(), ModelConfig(), processed, Path(tmp) / "tokenized")
        done = time.perf_counter()
        report = json.loads(processed.report.read_text())
        tokens = json.loads(tokenized.report.read_text())["splits"]
        source_mb = round(source.stat().st_size / 2**20, 1)
    figures = {
        "source_rows": args.rows,
        "source_mb": source_mb,
        "sampled_rows": args.sample,
        "sample_validate_clean_s": round(sampled - start, 1),
        "tokenize_s": round(done - sampled, 1),
        "total_s": round(done - start, 1),
        "artefacts_removed": report["changed"].get("Chat Doctor artefact in output", 0),
        "train_tokens": tokens["train"]["tokens"],
        "padding_share_if_padded_to_512": tokens["train"]["padding_share_if_padded"],
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
