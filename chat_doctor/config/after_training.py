"""Sections `merge`, `evaluate`, `registry`, `chat` and `export`: what happens to an adapter once trained."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from chat_doctor.config.common import Section
from chat_doctor.core.choices import RankedMetric
from chat_doctor.core.files import is_local
from chat_doctor.core.layout import RUNS_ROOT


class MergeConfig(Section):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Full-precision base the adapter is merged into; auto = bf16 on GPU, fp32 on CPU."
    )
    device: Literal["auto", "cpu"] = Field(
        "auto",
        description="auto = the GPU when there is one; cpu = in host memory, for a GPU smaller than the "
        "full-precision base (7B in bf16: ~15 GB of host memory, ~1 minute).",
    )


class EvaluateConfig(Section):
    batch_size: int = Field(8, gt=0, description="Rows per eval forward pass and per generation batch (halved on OOM).")
    rows: int = Field(
        40, gt=0, description="Eval rows each model answers (generation is the slow part); loss uses every row."
    )
    max_new_tokens: int = Field(125, gt=0, description="Generation limit per answer (the original's 125).")
    repetition_penalty: float = Field(1.15, ge=1.0, description="The original notebook's setting; 1.0 = off.")
    load_in_4bit: bool = Field(
        False,
        description="Score the models as QLoRA serves them: the 4-bit base, with the adapter for the tuned "
        "model, instead of the full-precision base and merged model (7B: ~5 GiB of GPU memory, not ~16).",
    )
    source: str | None = Field(
        None,
        description="Extra eval rows besides the eval split, e.g. held-out real rows: a local file or folder "
        "or hub id (formats and columns as data.*). When set, promotion is judged on these rows.",
    )

    @field_validator("source")
    @classmethod
    def _source_exists(cls, value: str | None) -> str | None:
        if value and is_local(value) and not Path(value).expanduser().exists():
            raise ValueError(f"{value!r} does not exist")
        return value


class RegisterConfig(Section):
    experiment: str = Field("chat-doctor", min_length=1, description="MLflow experiment.")
    model_name: str = Field("chat-doctor-adapter", description="Registered model name (letters, digits, . _ -).")
    alias: str = Field("candidate", description="Alias moved to each new version.")
    champion_alias: str = Field(
        "champion", min_length=1, description="Alias moved only when a version beats the base and the champion."
    )
    promote_metric: RankedMetric = Field(
        "loss", description="What promotion compares. Loss is the least noisy on small eval sets."
    )
    min_improvement: float = Field(
        0.0, ge=0, description="How much better (in the metric's units) a version must be to be promoted."
    )
    register_merged: bool = Field(
        False, description="Also register the merged full-precision model as `<model_name>-merged` (14 GB for 7B)."
    )

    @field_validator("model_name")
    @classmethod
    def _registry_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", value):
            raise ValueError("use letters, digits, '.', '_' and '-', starting with a letter or digit")
        return value

    @field_validator("alias", "champion_alias")
    @classmethod
    def _alias_mlflow_takes(cls, value: str) -> str:
        # MLflow refuses these as aliases, but only once a version is registered: refuse them here.
        if not re.fullmatch(r"[A-Za-z_][\w-]*", value):
            raise ValueError("use letters, digits, '_' and '-', starting with a letter or '_'")
        if value == "latest" or re.fullmatch(r"[vV]\d+", value):
            raise ValueError(f"{value!r} names a version in MLflow; choose another alias")
        return value

    @field_validator("champion_alias")
    @classmethod
    def _aliases_differ(cls, value: str, info: ValidationInfo) -> str:
        if value == info.data.get("alias"):
            raise ValueError("must differ from registry.alias (the newest version's alias)")
        return value


class ChatConfig(Section):
    model: str = Field(
        "champion",
        min_length=1,
        description="Registry alias (champion), version (3 or v3), or a local adapter or merged folder.",
    )
    host: str = Field("127.0.0.1", description="Address the UI binds; 0.0.0.0 exposes it to the network.")
    port: int = Field(7860, ge=1, le=65535, description="Port of the chat UI (Gradio's usual 7860).")
    max_input_chars: int = Field(2000, gt=0, description="Longer messages are refused with a message.")
    max_new_tokens: int = Field(125, gt=0, le=2048, description="Answer length limit (the original's 125).")
    repetition_penalty: float = Field(1.15, ge=1.0, le=2.0, description="The original's setting.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy (the original); above 0 samples.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling, used when temperature > 0.")


class ExportConfig(Section):
    gguf: bool = Field(
        False,
        description="After registering, export the champion as GGUF with an Ollama Modelfile (the export "
        "step; `chat-doctor-models export SPEC --gguf DIR` does the same by hand). Merges in host memory: "
        "7B takes ~30 GB of RAM and ~15 GB of disk per f16 file.",
    )
    types: list[Literal["f16", "bf16", "q8_0", "f32"]] = Field(
        ["f16", "q8_0"], min_length=1, description="GGUF files written; the Modelfile uses the last one."
    )
    lora: bool = Field(False, description="Also write the adapter alone as a GGUF LoRA (llama.cpp --lora).")
    dir: str = Field("runs/export", description="Where the files go (inside runs/, like every output).")

    @field_validator("dir")
    @classmethod
    def _inside_runs(cls, value: str) -> str:
        parts = Path(value).parts
        if Path(value).is_absolute() or ".." in parts or not parts or parts[0] != RUNS_ROOT:
            raise ValueError(f"outputs stay in the project's {RUNS_ROOT}/ folder: use {RUNS_ROOT}/<name>")
        return value
