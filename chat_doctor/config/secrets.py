"""Keeping secrets out of config, logs and error messages: the hub token, the object store's keys,
the database password, and the password part of any URL."""

from __future__ import annotations

import os
import re

HUB_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # read by huggingface_hub; never part of config
# The team set-up's secrets, read from the environment by boto3, DVC, psycopg and the MLflow client.
SECRET_ENV = (
    *HUB_TOKEN_ENV,
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "CHAT_DOCTOR_DB_PASSWORD",
    "PGPASSWORD",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{20,}")
_URL_PASSWORD = re.compile(r"(\b[a-z][\w+.-]*://[^/\s:@]+:)[^@\s/]+@", re.IGNORECASE)  # scheme://user:pw@
SECRET_KEY = re.compile(r"token|secret|password|api_key|access_key|credential", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the secrets of the environment, anything shaped like a hub token and the
    password of any URL masked."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, "***")
    text = _URL_PASSWORD.sub(r"\1***@", text)
    return _TOKEN_LIKE.sub("hf_***", text)
