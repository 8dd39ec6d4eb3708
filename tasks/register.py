"""Step `register`: decide promotion, write the model cards, log and register the adapter.

Reads params sections `model` and `registry`. Inputs: the adapter and merged folders, the eval
report and the lineage (data hashes, git commit, Prefect flow-run id, config hash). Output: a new
version of `registry.model_name` (PEFT adapter + tokenizer; the base is referenced, not copied) whose
tags hold the lineage, the eval figures and the promotion decision with its reason, and whose
description is the model card. `registry.alias` (candidate) moves to it; `registry.champion_alias`
only when it beats the base and the champion on `registry.promote_metric`. If any of this fails,
the new version is deleted again: a run registers all of it or nothing. When even that cannot
happen (the process killed, the tracking store gone), the version stays tagged `registration:
incomplete`, is never resolved, and the retry of the run deletes it before registering again.
Loads back with `mlflow.transformers.load_model("models:/chat-doctor-adapter@champion")`.
"""

from __future__ import annotations

import json
from pathlib import Path

from chat_doctor import faults
from chat_doctor.config import Config
from chat_doctor.eval_report import gate_models
from chat_doctor.model_card import base_provenance, write_cards
from chat_doctor.modeling import (
    base_location,
    load_adapter,
    load_base_model,
    load_merged,
    load_tokenizer,
)
from chat_doctor.registry import (
    REGISTRATION,
    aliased_version,
    decide_promotion,
    figure_tags,
    is_complete,
    versions_of_run,
)
from chat_doctor.tracking import client

# What loading the logged model needs; listed so MLflow does not guess (and import torchvision).
PIP_REQUIREMENTS = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "sentencepiece"]


def promotion(cfg: Config, report: dict) -> tuple[bool, str]:
    """Apply the promotion rule to the report's figures on its gate set."""
    models = gate_models(report)
    champion = report.get("champion")
    champion_figures = models.get("champion", {}) if champion else None  # {} = no comparable figures
    return decide_promotion(
        cfg.registry.promote_metric,
        models["tuned"],
        models["base"],
        champion_figures,
        champion["version"] if champion else None,
        cfg.registry.min_improvement,
    )


def _log_model(cfg: Config, mlflow_run_id: str, folder: str, kind: str):
    """Log the adapter (base referenced, not copied) or the merged model (all weights) to the run."""
    import mlflow

    tokenizer = load_tokenizer(cfg.model, folder)
    local_base = base_location(cfg.model)
    if kind == "adapter":
        # The 4-bit base is enough here: MLflow saves only the adapter and references the base.
        model = load_adapter(load_base_model(cfg.model, quantized=True), folder)
    else:
        model = load_merged(folder, cfg.merge.dtype, on_cpu=True)  # only saved, never run here
    mlflow_client = client()
    with mlflow.start_run(run_id=mlflow_run_id):
        logged = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name=kind,
            task="text-generation",
            base_model_path=local_base if kind == "adapter" and Path(local_base).is_dir() else None,
            pip_requirements=PIP_REQUIREMENTS,
        )
    # Leaving the block marked the run FINISHED; it runs on until registration is done, and a crash
    # before then must find it RUNNING to mark it FAILED.
    mlflow_client.update_run(mlflow_run_id, status="RUNNING")
    return logged


def _clear_earlier_attempt(names: list[str], mlflow_run_id: str) -> dict[str, str]:
    """What an earlier attempt of this run registered: incomplete versions (cut short by a crash or a
    lost store) are deleted, a complete one is kept and reused, so a retry registers nothing twice."""
    kept = {}
    for name in names:
        for version in versions_of_run(name, mlflow_run_id):
            if is_complete(version):
                kept[name] = version.version
            else:
                print(f"{name} v{version.version}: deleting the incomplete registration of an earlier attempt")
                client().delete_model_version(name, version.version)
    return kept


def _roll_back(created: list[tuple[str, str]], before: dict) -> None:
    mlflow_client = client()
    try:
        for name, version in created:
            mlflow_client.delete_model_version(name, version)
        for (name, alias), old in before.items():
            if old is not None:  # put back what the deleted version took over
                mlflow_client.set_registered_model_alias(name, alias, old.version)
    except Exception as err:  # the store itself is gone: the versions stay marked incomplete
        print(f"could not roll back {created} ({type(err).__name__}); the retry of this run deletes them")


def run_register(cfg: Config, mlflow_run_id: str, adapter: str, merged: str, eval_report: str, lineage: dict) -> dict:
    """Register the adapter (and optionally the merged model); return name, version, aliases, reason."""
    import mlflow

    report = json.loads(Path(eval_report).read_text())
    promote, reason = promotion(cfg, report)
    reg = cfg.registry
    decision = f"{'Promoted to' if promote else 'Not promoted to'} `{reg.champion_alias}`: {reason}."
    card = write_cards(cfg, {"adapter": adapter, "merged": merged}, lineage, eval_report, decision)
    models = gate_models(report)
    tags = {
        **{k: str(v) for k, v in lineage.items()},
        **figure_tags("base", models["base"]),
        **figure_tags("tuned", models["tuned"]),
        "eval.key": report["eval_key"],
        "eval.set": report["gate_set"],
        "base_model": cfg.model.base,
        "base_revision": str(cfg.model.revision),
        "base_source": base_provenance(cfg.model),
        "promotion.metric": reg.promote_metric,
        "promotion.decision": "promoted" if promote else "not promoted",
        "promotion.reason": reason,
        REGISTRATION: "incomplete",
    }
    folders = {reg.model_name: (adapter, "adapter")}
    if reg.register_merged:
        folders[f"{reg.model_name}-merged"] = (merged, "merged")
    versions = _clear_earlier_attempt(list(folders), mlflow_run_id)
    mlflow_client = client()
    created = []  # (name, version) made here, deleted again if anything below fails
    aliases = [reg.alias, *([reg.champion_alias] if promote else [])]
    before = {}  # alias -> version it pointed at, to put back if this registration fails
    try:
        for name, (folder, kind) in folders.items():
            if name in versions:
                print(f"{name} v{versions[name]}: registered by an earlier attempt of this run; reused")
                continue
            uri = _log_model(cfg, mlflow_run_id, folder, kind).model_uri
            versions[name] = mlflow.register_model(uri, name, tags=tags).version
            created.append((name, versions[name]))
            faults.kill_in_register(Path(adapter).parent)  # opt-in fault injection: nothing unless armed
            mlflow_client.update_model_version(name, versions[name], description=card)
            mlflow_client.set_model_version_tag(name, versions[name], REGISTRATION, "complete")
        # Aliases last: a version only becomes visible under an alias once everything else is in place.
        before = {(name, alias): aliased_version(name, alias) for name in versions for alias in aliases}
        for name, version in versions.items():
            for alias in aliases:
                mlflow_client.set_registered_model_alias(name, alias, version)
    except BaseException:
        _roll_back(created, before)
        raise
    version = versions[reg.model_name]
    return {
        "name": reg.model_name,
        "version": int(version),
        "aliases": aliases,
        "uri": f"models:/{reg.model_name}/{version}",
        "promotion": decision,
    }
