"""Dotted overrides (`train.max_steps=20`) as nested dicts, and each command-line value taken as typed.

A value goes to a text key (`data.source`, `data.revision`, `preset`, ...) as the text after `=`,
whatever YAML would make of it (a path with ` #`, `yes`, `0123`, `2024-01-01`); `null` clears an
optional one. Every other key's value is read as YAML 1.2 (`20`, `1e-4`, `true`, `[q_proj, v_proj]`,
`{input: question}`).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from chat_doctor.config.common import ConfigError

# How a key's value is read: "text", "optional text" (null clears it) or "yaml".
KeyKind = Callable[[str], str]


def cli_overrides(items: list[str], kind_of: KeyKind) -> dict[str, Any]:
    """`["train.max_steps=20"]` -> `{"train.max_steps": 20}`, each value read as `kind_of(key)` says."""
    flat: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.max_steps=20")
        kind = kind_of(key)
        if kind == "text" or (kind == "optional text" and raw not in ("null", "~")):
            flat[key] = raw
        elif kind == "optional text":
            flat[key] = None
        else:
            flat[key] = _yaml(key, raw) if raw else ""
    return flat


def _yaml(key: str, raw: str) -> Any:
    try:
        return YAML(typ="safe", pure=True).load(io.StringIO(raw))  # YAML 1.2: `yes` and `0123` stay as typed
    except YAMLError as err:
        raise ConfigError(f"override {key}={raw!r}: not a value ({str(err).splitlines()[0]})") from None


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"train.max_steps": 20} -> {"train": {"max_steps": 20}}."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override")
        node[leaf] = value
    return nested
