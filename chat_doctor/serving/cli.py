"""`chat-doctor-models`: the registered versions by hand (list, show, promote, demote, download) and
any version or local folder exported as GGUF.

    chat-doctor-models list
    chat-doctor-models show champion
    chat-doctor-models promote 3 --reason "reviewed answers by hand"
    chat-doctor-models demote champion
    chat-doctor-models download champion --to ./adapter
    chat-doctor-models export champion --gguf out/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chat_doctor.config import load_config
from chat_doctor.core.files import is_local
from chat_doctor.core.layout import PARAMS_FILE
from chat_doctor.evaluation.metrics import METRICS
from chat_doctor.serving.gguf_export import export_gguf, log_export
from chat_doctor.tracking.mlflow_runs import client
from chat_doctor.tracking.registry import (
    demote_by_hand,
    download_adapter,
    figures_from_tags,
    is_complete,
    promote_by_hand,
    resolve,
)

SHOWN = tuple(name for name, m in METRICS.items() if m.listed)  # columns of `list`


def _list(name: str) -> str:
    mlflow_client = client()
    versions = sorted(mlflow_client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    if not versions:
        return f"{name}: no versions registered yet"
    aliases: dict[str, list[str]] = {}
    for alias, version in mlflow_client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    lines = [" ".join(["ver".ljust(4), "aliases".ljust(20), *(m.rjust(10) for m in SHOWN), "  promotion"])]
    for v in versions:
        figures = figures_from_tags(v.tags)
        cells = [f"{figures[m]:10.4f}" if m in figures else " " * 9 + "-" for m in SHOWN]
        names = ",".join(sorted(aliases.get(str(v.version), []))) or "-"
        reason = _reason(v.tags) if is_complete(v) else "INCOMPLETE registration (retry its flow run)"
        lines.append(" ".join([f"v{v.version}".ljust(4), names.ljust(20), *cells, "  " + reason]))
    return "\n".join(lines)


def _reason(tags: dict) -> str:
    return tags.get("promotion.manual") or tags.get("promotion.reason", "")


def _show(version) -> str:
    tags = "\n".join(f"  {key}: {value}" for key, value in sorted(version.tags.items()))
    return f"{version.name} v{version.version} (aliases: {', '.join(version.aliases) or '-'})\n{tags}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chat-doctor-models", description="Registered adapters: list, promote.")
    parser.add_argument("--params", default=PARAMS_FILE, help="params.yaml naming the registered model")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="versions with their eval figures, aliases and promotion reason")
    show = commands.add_parser("show", help="one version's tags (lineage, figures, promotion)")
    show.add_argument("spec", help="version number, vN or alias")
    promote = commands.add_parser("promote", help="move the champion alias (or --alias) to a version by hand")
    promote.add_argument("spec")
    promote.add_argument("--alias", default=None)
    promote.add_argument("--reason", default="promoted by hand")
    demote = commands.add_parser("demote", help="remove an alias (the version stays registered)")
    demote.add_argument("alias")
    download = commands.add_parser("download", help="fetch a version's adapter folder")
    download.add_argument("spec")
    download.add_argument("--to", default=".", type=Path)
    export = commands.add_parser("export", help="a version (or local folder) as GGUF + Ollama Modelfile")
    export.add_argument("spec", help="alias, version, or a local adapter or merged folder")
    export.add_argument("--gguf", required=True, type=Path, help="folder for the .gguf files and the Modelfile")
    export.add_argument("--types", default="f16,q8_0", help="comma-separated: f16, bf16, q8_0, f32")
    export.add_argument("--lora", action="store_true", help="also the adapter alone as a GGUF LoRA")
    args = parser.parse_args(argv)

    registry = load_config(args.params).registry
    name = registry.model_name
    if args.command == "list":
        print(_list(name))
    elif args.command == "show":
        print(_show(resolve(name, args.spec)))
    elif args.command == "promote":
        version = resolve(name, args.spec).version
        alias = args.alias or registry.champion_alias
        promote_by_hand(name, alias, version, args.reason)
        print(f"{name}@{alias} -> v{version}")
    elif args.command == "demote":
        print(f"{name}@{args.alias} removed (was v{demote_by_hand(name, args.alias)})")
    elif args.command == "download":
        print(download_adapter(name, resolve(name, args.spec).version, args.to))
    elif args.command == "export":
        _export(args)


def _export(args) -> None:
    cfg = load_config(args.params)
    files = export_gguf(args.spec, args.gguf, cfg, tuple(args.types.split(",")), args.lora)
    if not is_local(args.spec):
        log_export(resolve(cfg.registry.model_name, args.spec).run_id, files)
    print("\n".join(str(f) for f in files))
    print(f"Ollama: ollama create chat-doctor -f {args.gguf / 'Modelfile'}")


if __name__ == "__main__":
    main(sys.argv[1:])
