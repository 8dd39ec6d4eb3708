"""Checkpoints in the object store, so that a training cut short on one machine resumes on any other.

With $CHAT_DOCTOR_CHECKPOINTS = s3://bucket/prefix (the team set-up), each complete checkpoint of
`runs/run-<hash>/` is uploaded to `<prefix>/run-<hash>/checkpoint-N/` as soon as it is saved (its
`.complete` marker last, so a cut-short upload is never taken for a checkpoint), and a training that
finds no checkpoint of its own first downloads the newest complete one there. The run folder's name
is a hash of the data and settings, so only the same training finds them. The endpoint and keys are
the environment's (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); unset, nothing leaves
the machine.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from chat_doctor.core.layout import RunFolder
from chat_doctor.core.logs import get_logger
from chat_doctor.tracking.servers import CHECKPOINTS_ENV
from chat_doctor.training.plan import COMPLETE, latest_checkpoint

logger = get_logger(__name__)


def store_url(run_name: str) -> str | None:
    """Where run `run_name`'s checkpoints go, or None when no store is set."""
    root = os.environ.get(CHECKPOINTS_ENV, "").rstrip("/")
    return f"{root}/{run_name}" if root else None


def _filesystem():
    import s3fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint} if endpoint else {}, skip_instance_cache=True)


def upload(checkpoint: Path) -> str | None:
    """Upload a complete checkpoint folder (runs/<run>/checkpoints/checkpoint-N); its URL, or None."""
    url = store_url(checkpoint.parent.parent.name)
    if url is None:
        return None
    fs, target = _filesystem(), f"{url}/{checkpoint.name}"
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != COMPLETE)
    for path in files:
        fs.put_file(str(path), f"{target}/{path.relative_to(checkpoint).as_posix()}")
    fs.put_file(str(checkpoint / COMPLETE), f"{target}/{COMPLETE}")  # last: the upload is whole
    return target


def restore(run: RunFolder) -> str | None:
    """The newest complete checkpoint of `run` from the store, when this machine has none; its path."""
    url = store_url(run.root.name)
    if url is None or latest_checkpoint(run.checkpoints):
        return None
    fs = _filesystem()
    if not fs.exists(url):
        return None
    stored = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(url, refresh=True)]
    complete = [n for n in stored if n.startswith("checkpoint-") and fs.exists(f"{url}/{n}/{COMPLETE}")]
    if not complete:
        return None
    newest = max(complete, key=lambda n: int(n.split("-")[1]))
    partial = run.checkpoints / f".{newest}.download"
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    fs.get(f"{url}/{newest}/", str(partial), recursive=True)
    partial.rename(run.checkpoints / newest)  # whole, or not there
    logger.info("checkpoint %s of %s downloaded from %s: training resumes from it", newest, run.root.name, url)
    return str(run.checkpoints / newest)
