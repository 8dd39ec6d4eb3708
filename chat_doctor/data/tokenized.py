"""Tokenizing a row, and the tokenized-split format shared by the tokenize, train and evaluate steps.

A split is an Arrow IPC stream with `input_ids` and `labels` (int32 lists): deterministic bytes for
DVC, memory-mapped on load (`datasets.Dataset.from_file`), so no copy is held in RAM.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from chat_doctor.config import TokenizeConfig
from chat_doctor.core.files import atomic_path
from chat_doctor.data.prompts import build_example

IGNORE_INDEX = -100  # label value the loss skips


def write_split(path: Path, columns: dict[str, list]) -> None:
    """Token columns (lists of ids; `input_ids` and `labels` for a split) as an int32 Arrow stream."""
    schema = pa.schema([(name, pa.list_(pa.int32())) for name in columns])
    table = pa.table(columns, schema=schema)
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table)


def load_split(path: str | Path):
    """A tokenized split as a memory-mapped `datasets.Dataset`."""
    import datasets

    return datasets.Dataset.from_file(str(path))


MIN_ANSWER_TOKENS = 8  # rows whose prompt leaves less room than this are dropped, not trained on


def tokenize_row(tokenizer, cfg: TokenizeConfig, row: dict) -> tuple[list[int], list[int], str | None]:
    """(input_ids, labels, status) for one row; status is None, "truncated" or "dropped"."""
    text, answer_start = build_example(cfg.template, row["input"], row["output"])
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids = list(encoded["input_ids"])
    # Tokens that start before the answer's first character belong to the prompt.
    n_prompt = sum(1 for start, _ in encoded["offset_mapping"] if start < answer_start)
    if n_prompt > cfg.max_length - MIN_ANSWER_TOKENS:
        return [], [], "dropped"
    status = None
    if len(ids) + 1 > cfg.max_length:
        ids, status = ids[: cfg.max_length - 1], "truncated"
    ids.append(tokenizer.eos_token_id)
    labels = list(ids)
    if cfg.loss_on == "completion":
        labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
    return ids, labels, status
