"""Prefect caches the data steps on their inputs, but their outputs live in fixed folders
(data/processed, data/tokenized) that a run with other inputs overwrites: run A, then B, then A
again would find A's cached result pointing at B's data. So each data step records, here in the
project, the cache key it ran under and the content hash of what it wrote; a cached result is used
only while its folder still holds exactly that."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from chat_doctor.core.files import content_hash, write_json
from chat_doctor.core.layout import STATE_DIR

STAMPS = STATE_DIR / "data-steps"


def cache_key(step: str, *parts: str) -> str:
    """A data step's cache key from what names its inputs. The project folder is part of every key:
    outputs live there, and another clone has its own."""
    return hashlib.sha256("|".join([str(Path.cwd()), step, *parts]).encode()).hexdigest()


def record(step: str, key: str, folder: Path) -> None:
    write_json(STAMPS / f"{step}.json", {"key": key, "outputs": content_hash(folder)})


def still_holds(step: str, key: str, folder: Path) -> bool:
    """True when `folder` is, byte for byte, what `step` wrote under `key`."""
    stamp = STAMPS / f"{step}.json"
    if not stamp.is_file() or not Path(folder).is_dir():
        return False
    recorded = json.loads(stamp.read_text())
    return recorded["key"] == key and recorded["outputs"] == content_hash(folder)
