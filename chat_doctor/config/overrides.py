"""Dotted command-line overrides (`train.max_steps=20`) as nested dicts."""

from __future__ import annotations

from typing import Any

import yaml

from chat_doctor.config.common import ConfigError


def cli_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.max_steps=20"]` -> `{"train.max_steps": 20}`; values parse as YAML."""
    flat: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.max_steps=20")
        flat[key] = yaml.safe_load(raw) if raw else ""
    return flat


def parse_overrides(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """Dotted overrides (`KEY=VALUE` strings or a {key: value} dict) -> nested dict."""
    flat = cli_overrides(items) if isinstance(items, list) else dict(items or {})
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
