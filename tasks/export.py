"""Step `export` (off by default: `export.gguf`): the champion as GGUF files and an Ollama Modelfile.

Reads params sections `export`, `registry` and `chat` (the Modelfile's generation defaults). Input:
the registry's champion after this run's registration. Outputs in `export.dir`: one GGUF file per
`export.types`, the Modelfile (and with `export.lora` the adapter as a GGUF LoRA), also logged as
MLflow artifacts (`gguf/`) of the run that made the champion.
"""

from __future__ import annotations

from pathlib import Path

from chat_doctor.config import Config
from chat_doctor.gguf_export import export_gguf, log_export


def run_export(cfg: Config) -> dict[str, list[str]]:
    """Export the champion; {"files": [...]} (empty when there is no champion yet)."""
    from chat_doctor.registry import aliased_version

    champion = aliased_version(cfg.registry.model_name, cfg.registry.champion_alias)
    if champion is None:
        print(f"export: no {cfg.registry.champion_alias} yet; nothing exported")
        return {"files": []}
    out, types = Path(cfg.export.dir), tuple(cfg.export.types)
    files = export_gguf(cfg.registry.champion_alias, out, cfg, types, cfg.export.lora)
    log_export(champion.run_id, files)
    return {"files": [str(f) for f in files]}
