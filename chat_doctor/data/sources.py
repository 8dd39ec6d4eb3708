"""Opening a data source: a hub dataset, a local JSON/JSONL/CSV/Parquet file or a save_to_disk folder.

Every problem is a DataError that names the `data.*` key and, where it can, the file and line.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chat_doctor.core.choices import CSV, HUB_DATASET, JSON_LINES, PARQUET, SAVE_TO_DISK
from chat_doctor.core.files import content_hash, is_local

if TYPE_CHECKING:
    from chat_doctor.config import DataConfig


class DataError(ValueError):
    """The source cannot give what the config asks; the message names the file, row or key."""


@dataclass(frozen=True)
class SourceKind:
    name: str
    matches: Callable[[Path], bool]  # given the source as a local path (a hub id is the last entry)
    read: Callable[[DataConfig, Path, str], Any]  # (config, path, key errors name) -> datasets.Dataset


def _read_folder(cfg: DataConfig, path: Path, key: str):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(f"{key}: {cfg.source!r} is not a save_to_disk folder ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if cfg.split not in loaded:
            raise DataError(f"data.split: {cfg.split!r} not in {cfg.source} (has {sorted(loaded)})")
        loaded = loaded[cfg.split]
    return loaded


def _file_reader(builder: str, text: bool, **options):
    """A reader through one of `datasets`' packaged builders (`options` go to it, e.g. a CSV
    delimiter); text files are checked for UTF-8 first."""

    def read(cfg: DataConfig, path: Path, key: str):
        import datasets

        if text:
            _check_utf8(path, key)
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
        except Exception as err:  # the loaders raise many types; the message is what the user needs
            detail = _locate_json_error(path) if builder == "json" else None
            raise DataError(f"{key}: {cfg.source}: cannot be read as {builder}: {detail or err}") from None

    return read


def _read_hub(cfg: DataConfig, path: Path, key: str):
    import datasets

    return datasets.load_dataset(cfg.source, revision=cfg.revision, split=cfg.split)


def _suffix(*suffixes: str) -> Callable[[Path], bool]:
    return lambda path: path.is_file() and path.suffix.lower() in suffixes


# Every kind of source `data.source` and `evaluate.source` accept, tried in order: a new format is one
# entry here and its name in chat_doctor/core/choices.py SOURCE_KINDS (the config's description).
SOURCES = (
    SourceKind(SAVE_TO_DISK, Path.is_dir, _read_folder),
    SourceKind(JSON_LINES, _suffix(".json", ".jsonl"), _file_reader("json", text=True)),
    SourceKind(CSV, _suffix(".csv"), _file_reader("csv", text=True)),
    SourceKind(PARQUET, _suffix(".parquet"), _file_reader("parquet", text=False)),
)
HUB = SourceKind(HUB_DATASET, lambda path: False, _read_hub)


def source_kinds() -> str:
    return ", ".join(kind.name for kind in (HUB, *SOURCES))


def open_source(cfg: DataConfig, key: str = "data.source"):
    """The source as a memory-mapped `datasets.Dataset` (no copy of the rows held in RAM).

    `key` is the config key errors name (the eval step reads `evaluate.source` through here too).
    """
    if not is_local(cfg.source):
        return HUB.read(cfg, Path(cfg.source), key)
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise DataError(f"{key}: {cfg.source!r} does not exist")
    kind = next((kind for kind in SOURCES if kind.matches(path)), None)
    if kind is None:
        raise DataError(f"{key}: {cfg.source!r}: unsupported file type, use one of: {source_kinds()}")
    return kind.read(cfg, path, key)


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
