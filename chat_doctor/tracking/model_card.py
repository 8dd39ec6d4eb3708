"""The model card (README.md) written beside the adapter and the merged model and shown in the registry:
what the model is, where it came from, how it scored, and what it must not be used for."""

from __future__ import annotations

import json
from pathlib import Path

from chat_doctor.config import Config, ModelConfig, section_hash
from chat_doctor.core.choices import EMBEDDED
from chat_doctor.core.files import is_local, write_text
from chat_doctor.evaluation.report import figures_table
from chat_doctor.models.embedded import LICENCE, PROVENANCE

DISCLAIMER = (
    "This model is a research demonstration. Its answers are not medical advice, can be wrong or "
    "dangerous, and must not replace a doctor. In an emergency call your local emergency number."
)


def base_provenance(model: ModelConfig) -> str:
    """Where the base came from, in words, for the card and the registry."""
    if model.base in EMBEDDED:
        return f"embedded base `{model.base}`: {PROVENANCE[model.base]}"
    if is_local(model.base):
        return f"the local folder `{model.base}`"
    return (
        f"the hub model `{model.base}` (revision `{model.revision or 'default'}`); its licence is on its "
        f"model card, https://huggingface.co/{model.base}"
    )


def render_card(
    cfg: Config, lineage: dict, report: dict | None, promotion: str | None, kind: str, front_matter: bool = True
) -> str:
    """Markdown with a Hugging Face-style front matter (left out for MLflow, which shows it as text);
    `kind` is `adapter` or `merged`."""
    library = "peft" if kind == "adapter" else "transformers"
    licence = f"license: {LICENCE[cfg.model.base]}\n" if cfg.model.base in LICENCE else ""
    data_hashes = "\n".join(f"- `{k.removeprefix('dvc.')}`: `{v}`" for k, v in lineage.items() if k.startswith("dvc."))
    others = {k: v for k, v in lineage.items() if not k.startswith("dvc.")}
    lora = cfg.lora.model_dump()
    quantized = f"4 bit ({cfg.model.quant_type})" if cfg.model.load_in_4bit else "full precision"
    parts = [
        f"---\nbase_model: {cfg.model.base}\n{licence}library_name: {library}\npipeline_tag: text-generation\n"
        "tags: [medical, qlora, chat-doctor]\n---\n"
        if front_matter
        else "",
        f"# chat-doctor {kind}\n",
        f"A {'LoRA adapter' if kind == 'adapter' else 'merged full-precision model'} fine-tuned from "
        f"`{cfg.model.base}` (revision `{cfg.model.revision or 'default'}`) to answer patient questions "
        f"in the style of doctors' replies, with the `{cfg.tokenize.template}` prompt template.\n",
        f"## Base model\n\n{base_provenance(cfg.model)}.\n",
        f"## Not medical advice\n\n{DISCLAIMER}\n",
        "## Intended use\n\nResearch on domain fine-tuning and evaluation of chat assistants. Not for "
        "diagnosis, treatment or any decision about a person's health.\n",
        f"## Training data\n\nSource `{cfg.data.source}`, {cfg.data.rows} rows sampled with seed "
        f"{cfg.data.seed}, {cfg.data.eval_fraction:.0%} held out. DVC hashes (`dvc.lock`):\n\n"
        f"{data_hashes or '- not recorded'}\n",
        f"## Training\n\nLoRA r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']} on "
        f"{', '.join(lora['target_modules'])}; {_length(cfg.train)}, learning rate "
        f"{cfg.train.learning_rate}, base in {quantized}. "
        f"Config hash `{section_hash(cfg)[:16]}`.\n",
    ]
    if report:
        for name, result in report["sets"].items():
            parts.append(f"## Evaluation: {name} ({result['rows']} rows, {result['generated']} answered)\n")
            parts.append(figures_table(result["models"]))
    else:
        parts.append("## Evaluation\n\nNot evaluated yet.\n")
    if promotion:
        parts.append(f"## Promotion\n\n{promotion}\n")
    if others:
        parts.append("## Lineage\n\n" + "\n".join(f"- {k}: `{v}`" for k, v in sorted(others.items())) + "\n")
    return "\n".join(part for part in parts if part)


def write_cards(
    cfg: Config, folders: dict[str, Path], lineage: dict, report_path: Path | None, promotion: str | None = None
) -> str:
    """README.md into each {kind: folder}; returns the adapter's card text without its front matter
    (the registry's description)."""
    report = json.loads(report_path.read_text()) if report_path else None
    for kind, folder in folders.items():
        write_text(Path(folder) / "README.md", render_card(cfg, lineage, report, promotion, kind))
    return render_card(cfg, lineage, report, promotion, "adapter", front_matter=False)


def _length(train) -> str:
    return f"{train.max_steps} steps" if train.max_steps is not None else f"{train.epochs:g} epoch(s)"
