"""The names the config accepts for choices whose implementations live higher up the house. Config
validates and documents with these; each registry named below defines exactly them
(tests/test_architecture.py checks that both sides agree).

- EMBEDDED: embedded bases (chat_doctor.models.embedded BUILDERS)
- TEMPLATES: prompt templates (chat_doctor.data.prompts TEMPLATES)
- SOURCE_KINDS: what data.source and evaluate.source can be (chat_doctor.data.sources HUB + SOURCES)
- RANKED_METRICS: metrics promotion can compare (chat_doctor.evaluation.metrics METRICS with a direction)
"""

from __future__ import annotations

from typing import Literal, get_args

TINY = "tiny"  # a tiny random Mistral from a fixed seed (fast tests of every code path)
SMOLLM2 = "smollm2-135m"  # SmolLM2-135M-Instruct, a real small model (the demo)
EMBEDDED = (TINY, SMOLLM2)  # built offline under models/ on first use

Template = Literal["original", "mistral-inst", "chatml"]
TEMPLATES: tuple[str, ...] = get_args(Template)

HUB_DATASET = "hub dataset id"
SAVE_TO_DISK = "save_to_disk folder"
JSON_LINES = ".json / .jsonl (JSON Lines)"
CSV = ".csv"
PARQUET = ".parquet"
SOURCE_KINDS = (HUB_DATASET, SAVE_TO_DISK, JSON_LINES, CSV, PARQUET)

RankedMetric = Literal["loss", "perplexity", "rougeL", "similarity", "eos_rate", "repetition"]
RANKED_METRICS: tuple[str, ...] = get_args(RankedMetric)

VARLEN = "varlen"  # train.attention: flash attention over each packed row (chat_doctor.training.attention)
