"""Config: one typed config for the whole pipeline, read from params.yaml and validated once. May
import chat_doctor.core only (the names it validates come from core.choices).

Resolution order (later wins): the preset named by `preset` -> the sections of params.yaml ->
dotted overrides such as `train.max_steps=20`. Every error names the key to change.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from chat_doctor.config.after_training import ChatConfig, EvaluateConfig, ExportConfig, MergeConfig, RegisterConfig
from chat_doctor.config.common import ConfigError, Section
from chat_doctor.config.model_data import Column, DataConfig, ModelConfig, TokenizeConfig
from chat_doctor.config.overrides import cli_overrides as _cli_overrides
from chat_doctor.config.overrides import nest
from chat_doctor.config.presets import PRESETS, deep_merge
from chat_doctor.config.secrets import HUB_TOKEN_ENV, SECRET_KEY, redact
from chat_doctor.config.sweep import SweepConfig
from chat_doctor.config.training import LoraConfig, TrainConfig, effective_batch, split_for_processes
from chat_doctor.core.layout import PARAMS_FILE, RUNS_ROOT

__all__ = [
    "PRESETS",
    "ChatConfig",
    "Column",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvaluateConfig",
    "ExportConfig",
    "LoraConfig",
    "MergeConfig",
    "ModelConfig",
    "RegisterConfig",
    "SweepConfig",
    "TokenizeConfig",
    "TrainConfig",
    "build_config",
    "cli_overrides",
    "deep_merge",
    "effective_batch",
    "flatten",
    "is_config_key",
    "load_config",
    "parse_overrides",
    "read_params",
    "redact",
    "section_hash",
    "split_for_processes",
]


class Config(Section):
    preset: str = Field("cpu-tiny", description="Defaults the sections start from.")
    runs_dir: str = Field(
        RUNS_ROOT, description="Where checkpoints, adapters, merged models and reports go: runs or runs/<name>."
    )
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    merge: MergeConfig = MergeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegisterConfig = RegisterConfig()
    chat: ChatConfig = ChatConfig()
    export: ExportConfig = ExportConfig()
    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="after")
    def _sections_fit_together(self) -> Config:
        if self.train.strategy == "fsdp" and self.lora.adapter_dtype != "compute":
            raise ValueError("train.strategy = fsdp needs lora.adapter_dtype: compute (FSDP shards one dtype)")
        if 0 < self.train.pack_length < self.tokenize.max_length:
            raise ValueError(
                f"train.pack_length = {self.train.pack_length} is shorter than tokenize.max_length = "
                f"{self.tokenize.max_length}: a row of that length would fit no bin"
            )
        return self

    @field_validator("runs_dir")
    @classmethod
    def _inside_runs(cls, value: str) -> str:
        # Outputs are deleted and replaced by the steps: config must not aim them anywhere else.
        parts = Path(value).parts
        if Path(value).is_absolute() or ".." in parts or not parts or parts[0] != RUNS_ROOT:
            raise ValueError(
                f"outputs stay in the project's {RUNS_ROOT}/ folder: use {RUNS_ROOT} or {RUNS_ROOT}/<name> "
                f"(link {RUNS_ROOT}/ to another disk for space)"
            )
        return value


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden" and SECRET_KEY.search(key):
            lines.append(
                f"{source}: unknown key `{key}`: secrets never go in params.yaml or overrides; "
                f"the hub token is read from the environment ({' or '.join(HUB_TOKEN_ENV)})"
            )
        elif e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key `{key}`")
        elif isinstance(e.get("input"), dict):  # a check across keys: its message names them
            lines.append(f"{source}: {e['msg'].removeprefix('Value error, ')}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: `{key}` = {e.get('input')!r}: {msg}")
    return redact("\n".join(lines))


def build_config(raw: dict[str, Any], source: str = PARAMS_FILE) -> Config:
    """Preset defaults + `raw` -> validated Config. `raw` may name a preset."""
    preset = raw.get("preset", "cpu-tiny")
    if preset not in PRESETS:
        raise ConfigError(f"{source}: `preset` = {preset!r}: choose one of {sorted(PRESETS)}")
    defaults = copy.deepcopy(PRESETS[preset])
    train = raw.get("train")
    if isinstance(train, dict) and train.get("max_steps") is not None and "epochs" not in train:
        defaults.get("train", {}).pop("epochs", None)  # the steps you set win over the preset's epochs
    try:
        return Config.model_validate(deep_merge(defaults, raw))
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def _kind_of(key: str) -> str:
    """How a command-line value for `key` is read (chat_doctor/config/overrides.py): text keys as typed."""
    model: Any = Config
    annotation: Any = None
    for part in key.split("."):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return "yaml"  # not a key: validation names it
        annotation = field.annotation
        model = annotation
    if annotation is str:
        return "text"
    return "optional text" if annotation == str | None else "yaml"


def is_config_key(key: str) -> bool:
    """Whether a dotted key (`lora.r`) names a setting of the config (not a section)."""
    model: Any = Config
    for part in key.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        model = fields[part].annotation
    return not (isinstance(model, type) and issubclass(model, Section))


def cli_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.max_steps=20", "data.source=/my rows #2.jsonl"]` -> dotted keys and their values."""
    return _cli_overrides(items, _kind_of)


def parse_overrides(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """Dotted overrides (`KEY=VALUE` strings or a {key: value} dict) -> nested dict."""
    return nest(cli_overrides(items) if isinstance(items, list) else dict(items or {}))


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def load_config(path: str | Path = PARAMS_FILE, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    raw = deep_merge(read_params(path), parse_overrides(overrides))
    source = f"{path}" + (" + overrides" if overrides else "")
    return build_config(raw, source)


def flatten(config: Config) -> dict[str, Any]:
    """Dotted keys -> values, e.g. {"train.max_steps": 60}, for MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            out[prefix] = node

    walk("", config.model_dump())
    out["train.effective_batch_size"] = effective_batch(config.train)
    return out


def section_hash(*sections: BaseModel) -> str:
    """Stable hash of config sections, for cache keys and run folders."""
    payload = json.dumps([s.model_dump() for s in sections], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
