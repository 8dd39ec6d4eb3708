"""The shared servers a run writes to, checked before any data step: the MLflow tracking server
(MLFLOW_TRACKING_URI), the object store behind the default DVC remote and the checkpoint store
(CHAT_DOCTOR_CHECKPOINTS). Each one that does not answer, or refuses the keys, is named with the
variable or setting to fix, all at once. Local stores (the demo's defaults) need no check."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from urllib.parse import urlparse

from chat_doctor.tracking.mlflow_runs import tracking_uri

CHECKPOINTS_ENV = "CHAT_DOCTOR_CHECKPOINTS"  # s3://bucket/prefix: checkpoints that any worker resumes from
KEYS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"


class ServerError(RuntimeError):
    """A shared server does not answer or refuses this run; the message says which and what to set."""


def _tracking_problem() -> str | None:
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10):
            return None
    except (OSError, urllib.error.URLError) as error:
        return f"the MLflow tracking server at {uri} does not answer ({error}): start it, or fix MLFLOW_TRACKING_URI"


def s3_problem(url: str, endpoint: str | None, where: str) -> str | None:
    """Whether the bucket of `url` (s3://bucket/prefix) can be listed with the environment's keys."""
    import boto3
    import botocore.exceptions

    bucket = urlparse(url).netloc
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    at = f" at {endpoint}" if endpoint else ""
    if not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
        return f"{where} {url}: set {KEYS} (the object store's keys)"
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        config=botocore.config.Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}),
    )
    try:
        s3.list_objects_v2(Bucket=bucket, MaxKeys=1)
    except botocore.exceptions.EndpointConnectionError:
        endpoint_from = "AWS_ENDPOINT_URL, or the DVC remote's endpointurl"
        return f"{where} {url}: the object store{at} does not answer (the endpoint: {endpoint_from})"
    except botocore.exceptions.ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return f"{where} {url}: bucket {bucket!r} does not exist in the object store{at}"
        return f"{where} {url}: the object store{at} refuses these keys ({code}): check {KEYS}"
    return None


def _dvc_remote_problem() -> str | None:
    from dvc.repo import Repo

    with Repo(".") as repo:
        name = repo.config["core"].get("remote")
        remote = dict(repo.config["remote"].get(name, {})) if name else {}
    url = str(remote.get("url", ""))
    if not url.startswith("s3://"):
        return None
    return s3_problem(url, remote.get("endpointurl"), f"DVC remote `{name}`")


def check_servers() -> None:
    """Raise ServerError naming every shared server this run cannot use."""
    problems = [_tracking_problem(), _dvc_remote_problem()]
    checkpoints = os.environ.get(CHECKPOINTS_ENV, "")
    if checkpoints.startswith("s3://"):
        problems.append(s3_problem(checkpoints, None, CHECKPOINTS_ENV))
    found = [p for p in problems if p]
    if found:
        raise ServerError("Shared servers this run needs:\n- " + "\n- ".join(found))
