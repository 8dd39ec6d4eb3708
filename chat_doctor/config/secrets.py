"""Keeping the hub token out of config, logs and error messages."""

from __future__ import annotations

import os
import re

HUB_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # read by huggingface_hub; never part of config
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{20,}")
SECRET_KEY = re.compile(r"token|secret|password|api_key", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the hub token of the environment, and anything shaped like one, masked."""
    for name in HUB_TOKEN_ENV:
        token = os.environ.get(name)
        if token and len(token) >= 8:
            text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)
