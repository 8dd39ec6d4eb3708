"""What every config module shares: the section base class and the config's own error."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
