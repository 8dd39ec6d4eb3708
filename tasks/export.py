"""Step `export` (off by default: `export.gguf`): the champion as GGUF files and an Ollama Modelfile.

Reads params sections `export`, `registry` and `chat` (the Modelfile's generation defaults). Input:
the registry's champion after this run's registration. Outputs in `export.dir`: one GGUF file per
`export.types`, the Modelfile (and with `export.lora` the adapter as a GGUF LoRA), also logged as
MLflow artifacts (`gguf/`) of the run that made the champion.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from chat_doctor.config import Config
from chat_doctor.core.logs import get_logger
from chat_doctor.core.records import Exported
from chat_doctor.serving.gguf_export import export_gguf, log_export
from chat_doctor.tracking.registry import aliased_version

logger = get_logger(__name__)


def run_export(cfg: Config) -> Exported:
    """Export the champion (nothing when there is no champion yet)."""
    champion = aliased_version(cfg.registry.model_name, cfg.registry.champion_alias)
    if champion is None:
        logger.info("export: no %s yet; nothing exported", cfg.registry.champion_alias)
        return Exported()
    out, types = Path(cfg.export.dir), tuple(cfg.export.types)
    files = export_gguf(cfg.registry.champion_alias, out, cfg, types, cfg.export.lora)
    log_export(champion.run_id, files)
    return Exported(files=files)


@task(name="export")
def export(cfg: Config) -> Exported:
    return run_export(cfg)
