"""Step `register`: decide promotion, write the model cards, log and register the adapter.

Reads params sections `model` and `registry`. Inputs: the adapter and merged folders, the eval
report and the lineage (data hashes, git commit, Prefect flow-run id, config hash). Output: a new
version of `registry.model_name` (PEFT adapter + tokenizer; the base is referenced, not copied) whose
tags hold the lineage, the eval figures and the promotion decision with its reason, and whose
description is the model card. `registry.alias` (candidate) moves to it; `registry.champion_alias`
only when it beats the base and the champion on `registry.promote_metric`. If any of this fails,
the new version is deleted again: a run registers all of it or nothing.
Loads back with `mlflow.transformers.load_model("models:/chat-doctor-adapter@champion")`.
"""

from __future__ import annotations

import json
from pathlib import Path

from chat_doctor.config import Config
from chat_doctor.eval_report import gate_models
from chat_doctor.model_card import write_cards
from chat_doctor.modeling import base_location, load_base_model, load_tokenizer, resolve_dtype
from chat_doctor.registry import aliased_version, decide_promotion, figure_tags
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
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(cfg.model, folder)
    local_base = base_location(cfg.model)
    if kind == "adapter":
        from peft import PeftModel

        # The 4-bit base is enough here: MLflow saves only the adapter and references the base.
        model = PeftModel.from_pretrained(load_base_model(cfg.model, quantized=True), folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(cfg.merge.dtype), use_safetensors=True)
    client()
    with mlflow.start_run(run_id=mlflow_run_id):
        return mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name=kind,
            task="text-generation",
            base_model_path=local_base if kind == "adapter" and Path(local_base).is_dir() else None,
            pip_requirements=PIP_REQUIREMENTS,
        )


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
        "promotion.metric": reg.promote_metric,
        "promotion.decision": "promoted" if promote else "not promoted",
        "promotion.reason": reason,
    }
    logged = {reg.model_name: _log_model(cfg, mlflow_run_id, adapter, "adapter").model_uri}
    if reg.register_merged:
        logged[f"{reg.model_name}-merged"] = _log_model(cfg, mlflow_run_id, merged, "merged").model_uri
    mlflow_client = client()
    created = []  # (name, version) made so far, deleted again if anything below fails
    aliases = [reg.alias, *([reg.champion_alias] if promote else [])]
    before = {}  # alias -> version it pointed at, to put back if this registration fails
    try:
        for name, uri in logged.items():
            created.append((name, mlflow.register_model(uri, name, tags=tags).version))
            mlflow_client.update_model_version(name, created[-1][1], description=card)
        # Aliases last: a version only becomes visible under an alias once everything else is in place.
        before = {(name, alias): aliased_version(name, alias) for name, _ in created for alias in aliases}
        for name, version in created:
            for alias in aliases:
                mlflow_client.set_registered_model_alias(name, alias, version)
    except BaseException:
        for name, version in created:
            mlflow_client.delete_model_version(name, version)
        for (name, alias), old in before.items():
            if old is not None:  # put back what the deleted version took over
                mlflow_client.set_registered_model_alias(name, alias, old.version)
        raise
    return {
        "name": reg.model_name,
        "version": int(created[0][1]),
        "aliases": aliases,
        "uri": f"models:/{reg.model_name}/{created[0][1]}",
        "promotion": decision,
    }
