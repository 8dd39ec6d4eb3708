"""The MLflow model registry as chat-doctor uses it: the promotion rule, aliases, and a CLI.

Each version of `chat-doctor-adapter` carries its lineage and eval figures as tags
(`eval.tuned.loss`, `eval.base.rougeL`, ..., `eval.key` = which rows and settings produced them) and
the promotion decision with its reason (`promotion.decision`, `promotion.reason`; changes made by
hand go to `promotion.manual`). `candidate` is the newest
version; `champion` moves only by the rule in `decide_promotion` or by hand. A version is created
with `registration: incomplete` and marked `complete` only once its tags and card are in place;
an incomplete one (a registration cut short by a crash or a lost store) is never resolved, and the
retry of the run that made it deletes it:

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

from chat_doctor.config import PARAMS_FILE, load_config
from chat_doctor.metrics import METRICS
from chat_doctor.tracking import client

SHOWN = tuple(name for name, m in METRICS.items() if m.listed)  # columns of `list`
REGISTRATION = "registration"  # version tag: `incomplete` until everything but the aliases is in place


def is_complete(version) -> bool:
    # Only our own registration marks a version incomplete; one without the tag (made by hand) is complete.
    return version.tags.get(REGISTRATION) != "incomplete"


def versions_of_run(name: str, run_id: str) -> list:
    """The versions of `name` that the MLflow run `run_id` registered, oldest first."""
    found = client().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return sorted(found, key=lambda v: int(v.version))


def figure_tags(model: str, figures: dict[str, float]) -> dict[str, str]:
    # Full precision (repr): a champion's figures read back from its tags must compare equal to the
    # same figures computed again, or a retrained copy of the champion would "beat" it by rounding.
    return {f"eval.{model}.{metric}": repr(float(figures[metric])) for metric in METRICS if metric in figures}


def figures_from_tags(tags: dict[str, str], model: str = "tuned") -> dict[str, float]:
    prefix = f"eval.{model}."
    return {key.removeprefix(prefix): float(value) for key, value in tags.items() if key.startswith(prefix)}


def _better(a: float, b: float, higher_is_better: bool, margin: float) -> bool:
    return a - b > margin if higher_is_better else b - a > margin


def decide_promotion(
    metric: str,
    tuned: dict[str, float],
    base: dict[str, float],
    champion: dict[str, float] | None,
    champion_version: int | None,
    min_improvement: float = 0.0,
) -> tuple[bool, str]:
    """(promote?, why). The version must beat the base and the current champion on `metric`."""
    higher = METRICS[metric].higher_is_better
    direction = METRICS[metric].direction
    value = tuned[metric]
    if not _better(value, base[metric], higher, min_improvement):
        return False, f"{metric} {value:.4g} does not beat the base's {base[metric]:.4g} ({direction} is better)"
    if champion is None:
        return True, f"{metric} {value:.4g} beats the base's {base[metric]:.4g}; there was no champion"
    if metric not in champion:
        return False, f"champion v{champion_version} has no {metric} figure on these rows; compare by hand"
    if not _better(value, champion[metric], higher, min_improvement):
        return False, (
            f"{metric} {value:.4g} does not beat champion v{champion_version}'s {champion[metric]:.4g} "
            f"({direction} is better, margin {min_improvement})"
        )
    return True, (
        f"{metric} {value:.4g} beats the base's {base[metric]:.4g} "
        f"and champion v{champion_version}'s {champion[metric]:.4g}"
    )


def aliased_version(name: str, alias: str):
    """The ModelVersion behind `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_record(name: str, alias: str) -> dict | None:
    """What evaluation needs to know about the current champion, or None when there is none."""
    version = aliased_version(name, alias)
    if version is None:
        return None
    tags = version.tags
    return {
        "version": int(version.version),
        "eval_key": tags.get("eval.key"),
        "base_model": tags.get("base_model"),
        "base_revision": tags.get("base_revision"),
        "figures": figures_from_tags(tags),
    }


def resolve(name: str, spec: str):
    """A version number, `vN` or an alias -> ModelVersion; a clear error when there is none."""
    number = spec.removeprefix("v")
    if number.isdigit():
        from mlflow.exceptions import MlflowException

        try:
            version = client().get_model_version(name, number)
        except MlflowException:
            raise SystemExit(f"{name}: no version {number}") from None
    else:
        version = aliased_version(name, spec)
        if version is None:
            raise SystemExit(f"{name}: no version has the alias {spec!r}")
    if not is_complete(version):
        raise SystemExit(
            f"{name} v{version.version}: its registration was cut short (tag {REGISTRATION}: incomplete); "
            "retry the flow run that made it, which removes it"
        )
    return version


def download_adapter(name: str, version: int | str, dst: Path) -> Path:
    """The version's PEFT adapter folder (adapter_config.json + weights), downloaded under `dst`."""
    import mlflow

    client()  # sets the tracking URI
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))
    adapter = local / "peft"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{name} v{version}: no PEFT adapter in its artifacts ({local})")
    return adapter


def promote_by_hand(name: str, alias: str, version: int | str, reason: str) -> None:
    mlflow_client = client()
    mlflow_client.set_registered_model_alias(name, alias, str(version))
    mlflow_client.set_model_version_tag(name, str(version), "promotion.manual", f"{alias} by hand: {reason}")


def demote_by_hand(name: str, alias: str) -> str:
    """Remove `alias`; return the version it pointed at."""
    version = resolve(name, alias).version
    mlflow_client = client()
    mlflow_client.delete_registered_model_alias(name, alias)
    mlflow_client.set_model_version_tag(name, version, "promotion.manual", f"{alias} removed by hand")
    return version


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
    from chat_doctor.files import is_local
    from chat_doctor.gguf_export import export_gguf, log_export

    cfg = load_config(args.params)
    files = export_gguf(args.spec, args.gguf, cfg, tuple(args.types.split(",")), args.lora)
    if not is_local(args.spec):
        log_export(resolve(cfg.registry.model_name, args.spec).run_id, files)
    print("\n".join(str(f) for f in files))
    print(f"Ollama: ollama create chat-doctor -f {args.gguf / 'Modelfile'}")


if __name__ == "__main__":
    main(sys.argv[1:])
