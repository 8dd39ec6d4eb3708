"""The config reference (docs/config.md), rendered from the schema itself so it cannot drift:
every params.yaml key with its type, default and effect, and what each preset sets.

    python -m chat_doctor.config.reference > docs/config.md
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from chat_doctor.config import Config, Section, build_config, flatten
from chat_doctor.config.presets import PRESETS

REFERENCE_FILE = "docs/config.md"


def type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _value(value: Any) -> str:
    return f"`{json.dumps(value)}`"


def sections() -> dict[str, type[Section]]:
    return {
        name: f.annotation
        for name, f in Config.model_fields.items()
        if isinstance(f.annotation, type) and issubclass(f.annotation, Section)
    }


def render() -> str:
    out = [
        "# Configuration reference\n",
        "Generated from the schema by `python -m chat_doctor.config.reference`; do not edit by hand.",
        "Defaults below are the field defaults (the `cpu-tiny` preset); a preset then sets the keys listed",
        "at the end, and params.yaml and overrides (`KEY=VALUE`) win over both.\n",
        "| key | type | default | effect |",
        "| --- | --- | --- | --- |",
    ]
    by_section = sections()
    for name, field in Config.model_fields.items():
        if name not in by_section:
            out.append(f"| `{name}` | {type_name(field.annotation)} | {_value(field.default)} | {field.description} |")
    for section, model in by_section.items():
        out += [f"\n## `{section}`\n", "| key | type | default | effect |", "| --- | --- | --- | --- |"]
        defaults = model().model_dump()
        for key, field in model.model_fields.items():
            effect = (field.description or "").replace("|", "\\|")
            out.append(f"| `{section}.{key}` | {type_name(field.annotation)} | {_value(defaults[key])} | {effect} |")
    out.append("\n## Presets: the keys each one sets\n")
    base = flatten(Config())
    for preset in PRESETS:
        changed = {
            k: v for k, v in flatten(build_config({"preset": preset})).items() if base.get(k) != v and k != "preset"
        }
        out.append(
            f"- `{preset}`: " + (", ".join(f"`{k}={json.dumps(v)}`" for k, v in changed.items()) or "the defaults")
        )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
