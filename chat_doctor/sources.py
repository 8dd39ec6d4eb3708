"""Opening a data source: a hub dataset, a local JSON/JSONL/CSV/Parquet file or a save_to_disk folder.

Every problem is a DataError that names the `data.*` key and, where it can, the file and line.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

from chat_doctor.config import DataConfig, is_local
from chat_doctor.files import content_hash

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """The source cannot give what the config asks; the message names the file, row or key."""


def open_source(cfg: DataConfig, key: str = "data.source"):
    """The source as a memory-mapped `datasets.Dataset` (no copy of the rows held in RAM).

    `key` is the config key errors name (the eval step reads `evaluate.source` through here too).
    """
    import datasets

    source = Path(cfg.source).expanduser()
    if not is_local(cfg.source):
        return datasets.load_dataset(cfg.source, revision=cfg.revision, split=cfg.split)
    if not source.exists():
        raise DataError(f"{key}: {cfg.source!r} does not exist")
    if source.is_dir():
        try:
            loaded = datasets.load_from_disk(str(source))
        except FileNotFoundError as err:
            raise DataError(f"{key}: {cfg.source!r} is not a save_to_disk folder ({err})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.split not in loaded:
                raise DataError(f"data.split: {cfg.split!r} not in {cfg.source} (has {sorted(loaded)})")
            loaded = loaded[cfg.split]
        return loaded
    builder = LOCAL_BUILDERS.get(source.suffix.lower())
    if builder is None:
        raise DataError(f"{key}: {cfg.source!r}: unsupported file type, use one of {sorted(LOCAL_BUILDERS)}")
    if builder in ("json", "csv"):
        _check_utf8(source, key)
    try:
        return datasets.load_dataset(builder, data_files=str(source), split="train")
    except Exception as err:  # the loaders raise many types; the message is what the user needs
        detail = _locate_json_error(source) if builder == "json" else None
        raise DataError(f"{key}: {cfg.source}: cannot be read as {builder}: {detail or err}") from None


def source_fingerprint(cfg: DataConfig, dataset) -> str:
    if is_local(cfg.source):
        return "sha256:" + content_hash(Path(cfg.source).expanduser())
    return f"hub:{cfg.source}@{cfg.revision or 'main'}:{dataset._fingerprint}"


def _check_utf8(path: Path, key: str) -> None:
    """Text sources must be UTF-8; name the line of the first byte that is not."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            try:
                text = decoder.decode(block)
            except UnicodeDecodeError as err:
                line += block[: err.start].count(b"\n")
                raise DataError(
                    f"{key}: {path} line {line}: not valid UTF-8 (byte 0x{block[err.start]:02x}); "
                    "re-save the file as UTF-8"
                ) from None
            line += text.count("\n")


def _locate_json_error(path: Path) -> str | None:
    """For JSON Lines, the first line that is not a JSON object; for a JSON file, what it holds."""
    text = path.read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if whole is not None:
        if isinstance(whole, list) and all(isinstance(row, dict) for row in whole):
            return None
        return "expected a JSON array of objects or one object per line"
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number}: not valid JSON ({err.msg})"
        if not isinstance(row, dict):
            return f"line {number}: expected a JSON object, got {type(row).__name__}"
    return None
