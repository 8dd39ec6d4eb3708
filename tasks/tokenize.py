"""Step `tokenize`: prompt template + tokenizer -> token ids and labels, EOS kept.

Reads params sections `tokenize` and `model` (for the tokenizer). Inputs: `data/processed/
{train,eval}.jsonl`. Outputs in `data/tokenized/`: `train.arrow`, `eval.arrow` (Arrow IPC streams
with `input_ids` and `labels`, loadable with `datasets.Dataset.from_file`) and `report.json`.
Every row ends in EOS and its label is kept, so the model learns to stop; with `loss_on:
completion` the prompt's labels are -100. Rows longer than `max_length` lose the end of the answer
but keep the EOS. Run alone with `python -m tasks.tokenize`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chat_doctor.config import PROCESSED_DIR, TOKENIZED_DIR, ModelConfig, TokenizeConfig, load_config
from chat_doctor.files import read_jsonl, write_json
from chat_doctor.modeling import load_tokenizer
from chat_doctor.tokenized import IGNORE_INDEX, tokenize_row, write_split


def run_tokenize(
    cfg: TokenizeConfig, model_cfg: ModelConfig, processed: dict[str, str], out_dir: Path = TOKENIZED_DIR
) -> dict[str, str]:
    """Tokenize the `train` and `eval` JSONL files of `processed`; return the output paths."""
    tokenizer = load_tokenizer(model_cfg)
    out_dir = Path(out_dir)
    report: dict[str, dict] = {"template": cfg.template, "max_length": cfg.max_length, "splits": {}}
    paths = {}
    for split in ("train", "eval"):
        columns: dict[str, list] = {"input_ids": [], "labels": []}
        counts = {"rows": 0, "truncated": 0, "dropped": 0, "tokens": 0, "loss_tokens": 0}
        for row in read_jsonl(Path(processed[split])):
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
        counts["padding_share_if_padded"] = round(1 - counts["tokens"] / (counts["rows"] * cfg.max_length), 4)
        paths[split] = out_dir / f"{split}.arrow"
        write_split(paths[split], columns)
        report["splits"][split] = counts
    paths["report"] = out_dir / "report.json"
    write_json(paths["report"], report)
    return {name: str(path) for name, path in paths.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tokenize the processed data (params section `tokenize`).")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tokenize.max_length=256")
    args = parser.parse_args(argv)
    cfg = load_config(overrides=args.overrides)
    processed = {split: str(PROCESSED_DIR / f"{split}.jsonl") for split in ("train", "eval")}
    print(run_tokenize(cfg.tokenize, cfg.model, processed))


if __name__ == "__main__":
    main()
