"""Step `register`: decide promotion, write the model cards, log and register the adapter.

Reads params sections `model` and `registry`. Inputs: the run folder (adapter and merged model), the
eval report and the lineage (data hashes, git commit, Prefect flow-run id, config hash). Output: a new
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

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from chat_doctor.config import Config, section_hash
from chat_doctor.core import faults
from chat_doctor.core.logs import get_logger
from chat_doctor.core.records import DataVersion, Evaluated, Merged, Registered
from chat_doctor.evaluation.report import gate_models
from chat_doctor.models.loading import (
    base_location,
    load_adapter,
    load_base_model,
    load_merged,
    load_tokenizer,
)
from chat_doctor.tracking.mlflow_runs import client, end_run, run_tags, tracking_uri
from chat_doctor.tracking.model_card import base_provenance, write_cards
from chat_doctor.tracking.registry import (
    REGISTRATION,
    aliased_version,
    decide_promotion,
    figure_tags,
    is_complete,
    versions_of_run,
)

logger = get_logger(__name__)

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


def _log_model(cfg: Config, mlflow_run_id: str, folder: Path, kind: str):
    """Log the adapter (base referenced, not copied) or the merged model (all weights) to the run."""
    import mlflow

    tokenizer = load_tokenizer(cfg.model, str(folder))
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
                logger.warning(
                    "%s v%s: deleting the incomplete registration of an earlier attempt", name, version.version
                )
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
        logger.error("could not roll back %s (%s); the retry of this run deletes them", created, type(err).__name__)


def run_register(cfg: Config, mlflow_run_id: str, merged: Merged, evaluated: Evaluated, lineage: dict) -> Registered:
    """Register the adapter (and optionally the merged model) with its lineage, figures and promotion."""
    import mlflow

    run = merged.run
    report = json.loads(evaluated.report.read_text())
    promote, reason = promotion(cfg, report)
    reg = cfg.registry
    decision = f"{'Promoted to' if promote else 'Not promoted to'} `{reg.champion_alias}`: {reason}."
    card = write_cards(cfg, {"adapter": run.adapter, "merged": run.merged}, lineage, evaluated.report, decision)
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
    folders = {reg.model_name: (run.adapter, "adapter")}
    if reg.register_merged:
        folders[f"{reg.model_name}-merged"] = (run.merged, "merged")
    versions = _clear_earlier_attempt(list(folders), mlflow_run_id)
    mlflow_client = client()
    created = []  # (name, version) made here, deleted again if anything below fails
    aliases = [reg.alias, *([reg.champion_alias] if promote else [])]
    before = {}  # alias -> version it pointed at, to put back if this registration fails
    try:
        for name, (folder, kind) in folders.items():
            if name in versions:
                logger.info("%s v%s: registered by an earlier attempt of this run; reused", name, versions[name])
                continue
            uri = _log_model(cfg, mlflow_run_id, folder, kind).model_uri
            versions[name] = mlflow.register_model(uri, name, tags=tags).version
            created.append((name, versions[name]))
            faults.kill_in_register(run.root)  # opt-in fault injection: nothing unless armed
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
    return Registered(
        name=reg.model_name,
        version=int(version),
        aliases=aliases,
        uri=f"models:/{reg.model_name}/{version}",
        promotion=decision,
    )


def summary(registered: Registered, run_id: str) -> str:
    aliases = ", ".join(f"`{a}`" for a in registered.aliases)
    return (
        f"## {registered.name} v{registered.version} ({aliases})\n\n{registered.promotion}\n\n"
        f"Load: `{registered.uri}`  \nMLflow run: `{run_id}` ({tracking_uri()})\n"
    )


@task(name="register")
def register(cfg: Config, run_id: str, merged: Merged, evaluated: Evaluated, data: DataVersion) -> Registered:
    lineage = {
        **data.tags,
        "git_commit": run_tags(run_id).get("git_commit", "unknown"),  # as it was when the run started
        "prefect.flow_run_id": str(flow_run.id),
        "config_hash": section_hash(cfg)[:16],
    }
    registered = run_register(cfg, run_id, merged, evaluated, lineage)
    end_run(run_id)
    create_markdown_artifact(
        key="finetune-result",
        markdown=summary(registered, run_id),
        description="Registered adapter, its aliases and the promotion decision",
    )
    return registered
