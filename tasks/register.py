"""Step `register`: log the adapter to the flow run's MLflow run and register it.

Reads params sections `model` and `registry`. Inputs: the adapter folder, the eval report and the
lineage tags (data hashes, git commit, Prefect flow-run id). Output: a new version of
`registry.model_name` (PEFT adapter + tokenizer, base referenced, not copied) with the lineage as
version tags and the alias `registry.alias` moved to it. Loads back with
`mlflow.transformers.load_model("models:/chat-doctor-adapter@candidate")`.
"""

from __future__ import annotations

import json
from pathlib import Path

from chat_doctor.config import Config
from chat_doctor.modeling import base_location, load_base_model, load_tokenizer
from chat_doctor.tracking import client

# What loading the logged model needs; listed so MLflow does not guess (and import torchvision).
PIP_REQUIREMENTS = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "sentencepiece"]


def _eval_tags(report_path: str) -> dict[str, str]:
    report = json.loads(Path(report_path).read_text())
    return {
        f"eval.{model}.{metric}": f"{report[model][metric]:.4f}"
        for model in ("base", "tuned")
        for metric in ("loss", "perplexity")
    }


def run_register(cfg: Config, mlflow_run_id: str, adapter: str, eval_report: str, lineage: dict) -> dict:
    """Log and register the adapter; return {"name", "version", "uri"}."""
    import mlflow
    from peft import PeftModel

    mlflow_client = client()
    tokenizer = load_tokenizer(cfg.model, adapter)
    # The 4-bit base is enough here: MLflow saves only the adapter and references the base.
    model = PeftModel.from_pretrained(load_base_model(cfg.model, quantized=True), adapter)
    local_base = base_location(cfg.model)
    with mlflow.start_run(run_id=mlflow_run_id):
        mlflow.log_artifact(eval_report, artifact_path="eval")
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="adapter",
            task="text-generation",
            base_model_path=local_base if Path(local_base).is_dir() else None,
            pip_requirements=PIP_REQUIREMENTS,
        )
    tags = {**{k: str(v) for k, v in lineage.items()}, **_eval_tags(eval_report), "base_model": cfg.model.base}
    version = mlflow.register_model(info.model_uri, cfg.registry.model_name, tags=tags)
    mlflow_client.set_registered_model_alias(cfg.registry.model_name, cfg.registry.alias, version.version)
    return {
        "name": cfg.registry.model_name,
        "version": int(version.version),
        "uri": f"models:/{cfg.registry.model_name}@{cfg.registry.alias}",
    }
