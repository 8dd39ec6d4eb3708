"""The tokenized-split format shared by the tokenize, train and evaluate steps.

A split is an Arrow IPC stream with `input_ids` and `labels` (int32 lists): deterministic bytes for
DVC, memory-mapped on load (`datasets.Dataset.from_file`), so no copy is held in RAM.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from chat_doctor.files import atomic_path

IGNORE_INDEX = -100  # label value the loss skips
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])


def write_split(path: Path, columns: dict[str, list]) -> None:
    table = pa.table(columns, schema=SCHEMA)
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        writer.write_table(table)


def load_split(path: str):
    """A tokenized split as a memory-mapped `datasets.Dataset`."""
    import datasets

    return datasets.Dataset.from_file(path)
