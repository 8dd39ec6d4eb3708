"""Step `tokenize`: prompt template + tokenizer -> token ids and labels, EOS kept.

Reads params sections `tokenize` and `model` (for the tokenizer). Inputs: `data/processed/
{train,eval}.jsonl`. Outputs in `data/tokenized/`: `train.arrow`, `eval.arrow` (Arrow IPC streams
with `input_ids` and `labels`, loadable with `datasets.Dataset.from_file`) and `report.json`.
Every row ends in EOS and its label is kept, so the model learns to stop; with `loss_on:
completion` the prompt's labels are -100. Rows longer than `max_length` lose the end of the answer
but keep the EOS. This is dvc.yaml's `tokenize` stage (`python -m tasks.tokenize`): the flow's `data`
step runs it in the run's DVC experiment (tasks/data.py), `dvc repro` in the workspace.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from chat_doctor.config import ModelConfig, TokenizeConfig, load_config
from chat_doctor.core.files import read_jsonl, write_json
from chat_doctor.core.layout import PROCESSED_DIR, TOKENIZED_DIR
from chat_doctor.core.records import Processed, Tokenized
from chat_doctor.data.tokenized import IGNORE_INDEX, tokenize_row, write_split
from chat_doctor.models.loading import load_tokenizer


def run_tokenize(
    cfg: TokenizeConfig, model_cfg: ModelConfig, processed: Processed, out_dir: Path = TOKENIZED_DIR
) -> Tokenized:
    """Tokenize the train and eval rows of `processed` into `out_dir`."""
    tokenizer = load_tokenizer(model_cfg)
    out = Tokenized.at(out_dir)
    report: dict[str, Any] = {"template": cfg.template, "max_length": cfg.max_length, "splits": {}}
    for split, rows, arrow in (("train", processed.train, out.train), ("eval", processed.eval, out.eval)):
        columns: dict[str, list] = {"input_ids": [], "labels": []}
        counts = {"rows": 0, "truncated": 0, "dropped": 0, "tokens": 0, "loss_tokens": 0}
        for row in read_jsonl(rows):
            ids, labels, status = tokenize_row(tokenizer, cfg, row)
            if status:
                counts[status] += 1
            if status == "dropped":
                continue
            columns["input_ids"].append(ids)
            columns["labels"].append(labels)
            counts["rows"] += 1
            counts["tokens"] += len(ids)
            counts["loss_tokens"] += sum(1 for label in labels if label != IGNORE_INDEX)
        if not counts["rows"]:
            raise ValueError(f"tokenize.max_length = {cfg.max_length}: every {split} row's prompt is too long")
        # The share of compute the original recipe spent on padding (every row padded to max_length).
        padding = round(1 - counts["tokens"] / (counts["rows"] * cfg.max_length), 4)
        write_split(arrow, columns)
        report["splits"][split] = {**counts, "padding_share_if_padded": padding}
    write_json(out.report, report)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tokenize the processed data (params section `tokenize`).")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tokenize.max_length=256")
    args = parser.parse_args(argv)
    cfg = load_config(overrides=args.overrides)
    print(run_tokenize(cfg.tokenize, cfg.model, Processed.at(PROCESSED_DIR)))


if __name__ == "__main__":
    main()
