"""Sections `model`, `data` and `tokenize`: which base, which rows, and how they become tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from chat_doctor.config.common import HUB_ID, Section
from chat_doctor.core.choices import EMBEDDED, SOURCE_KINDS, TINY, Template
from chat_doctor.core.files import is_local


class ModelConfig(Section):
    base: str = Field(
        TINY, description="`tiny` or `smollm2-135m` (embedded, built offline), a hub id, or a local folder."
    )
    revision: str | None = Field(None, description="Hub revision (commit, tag) of `base`.")
    load_in_4bit: bool = Field(True, description="QLoRA: base weights in 4 bit. False = plain LoRA, more memory.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="nf4 suits normally distributed weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants: ~0.4 bit/param saved.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto = bf16 on GPUs that have it, else fp16; float32 on CPU."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub model. Keep off unless needed.")

    @field_validator("base")
    @classmethod
    def _base_exists(cls, value: str) -> str:
        if value in EMBEDDED:
            return value
        if is_local(value):
            path = Path(value).expanduser()
            if not (path / "config.json").is_file():
                raise ValueError(f"{value!r} is not a model folder (no config.json there)")
            return value
        if not HUB_ID.match(value):
            raise ValueError(
                f"{value!r} is neither an embedded base ({', '.join(EMBEDDED)}), a hub id like org/name, "
                "nor an existing folder"
            )
        return value


Column = Literal["instruction", "input", "output"]  # the fields of a row (HealthCareMagic's schema)
DEFAULT_COLUMNS: dict[Column, str] = {"instruction": "instruction", "input": "input", "output": "output"}


class DataConfig(Section):
    source: str = Field(
        "data/raw/synthetic_healthcaremagic.jsonl",
        description=f"Where the rows come from: {', '.join(SOURCE_KINDS)}.",
    )
    revision: str | None = Field(None, description="Hub dataset revision; pin it for reproducibility.")
    split: str = Field("train", description="Split of a hub dataset (or of a DatasetDict folder).")
    rows: int = Field(400, gt=0, description="Rows sampled from the source (before the split).")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of the sample held out for evaluation.")
    seed: int = Field(42, ge=0, description="Sampling and split seed: same seed + same source = same files.")
    columns: dict[Column, str] = Field(
        DEFAULT_COLUMNS,
        description="Source column for each field; e.g. {input: question, output: answer}. instruction is optional.",
    )
    strict: bool = Field(
        False,
        description="True: any invalid row in the source is an error. False: invalid rows are dropped and counted.",
    )
    max_chars: int = Field(20000, gt=0, description="Longer queries or answers are invalid (scraping accidents).")
    clean_artefacts: bool = Field(True, description='Remove the scraper\'s "Chat Doctor" artefacts.')
    dedupe: bool = Field(True, description="Drop exact and near-exact (case, spacing, punctuation) duplicate rows.")
    drop_cut_off: bool = Field(
        False, description="Drop answers that stop mid-sentence (counted either way); costs rows."
    )

    @field_validator("columns")
    @classmethod
    def _fill_columns(cls, value: dict[Column, str]) -> dict[Column, str]:
        return {**DEFAULT_COLUMNS, **value}  # name only the columns that differ


class TokenizeConfig(Section):
    template: Template = Field(
        "original",
        description="`original`: the Chat-Doctor prompt; `mistral-inst`: [INST] ... [/INST]; `chatml`: "
        "<|im_start|>user ... <|im_end|> (SmolLM2, Qwen and other ChatML instruct models).",
    )
    max_length: int = Field(512, ge=16, description="Tokens per row incl. EOS; longer answers are cut, EOS kept.")
    loss_on: Literal["completion", "all"] = Field(
        "completion", description="completion = prompt tokens masked (learn answers, not questions)."
    )
