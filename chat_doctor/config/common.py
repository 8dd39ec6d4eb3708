"""What every config module shares: project paths, embedded base names, the section base class."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from chat_doctor.files import is_local  # noqa: F401  (re-exported: config decides what is a path)

PARAMS_FILE = "params.yaml"
# Data outputs tracked by DVC (dvc.yaml names the same folders).
PROCESSED_DIR = Path("data/processed")
TOKENIZED_DIR = Path("data/tokenized")
TINY = "tiny"  # embedded: a tiny random Mistral from a fixed seed (fast tests of every code path)
SMOLLM2 = "smollm2-135m"  # embedded: SmolLM2-135M-Instruct, a real small model (the demo)
EMBEDDED = (TINY, SMOLLM2)  # built offline under models/ by chat_doctor/embedded.py
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


RUNS_ROOT = "runs"  # every output that config can place goes under this project folder


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
