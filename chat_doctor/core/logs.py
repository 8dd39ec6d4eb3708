"""Module loggers. chat-doctor's loggers report at INFO (what a step read, decided and wrote); in a
flow run Prefect sends them to the run's logs (pyproject.toml: [tool.prefect.logging] extra_loggers)."""

from __future__ import annotations

import logging


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name`; its top-level package logs at INFO unless the application set a level."""
    top = logging.getLogger(name.partition(".")[0])
    if top.level == logging.NOTSET:
        top.setLevel(logging.INFO)
    return logging.getLogger(name)
