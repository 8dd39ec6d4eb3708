"""Config: presets, overrides and errors that name the key, before anything is loaded."""

from pathlib import Path

import pytest

from chat_doctor.config import PRESETS, ConfigError, build_config, cli_overrides, flatten, load_config

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_is_the_cpu_tiny_default():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.preset == "cpu-tiny"
    assert cfg.model.base == "tiny"
    assert cfg.data.source == "data/raw/synthetic_healthcaremagic.jsonl"
    assert cfg.tokenize.template == "original"


def test_mistral_7b_preset_is_the_original_recipe():
    cfg = build_config({"preset": "mistral-7b"})
    assert cfg.model.base == "mistralai/Mistral-7B-v0.1"
    assert (cfg.model.quant_type, cfg.model.double_quant, cfg.model.compute_dtype) == ("nf4", True, "auto")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (32, 64, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg.train.learning_rate == 2.5e-4
    assert (cfg.train.micro_batch_size, cfg.train.max_steps, cfg.tokenize.max_length) == (4, 500, 512)
    assert cfg.train.optim == "paged_adamw_8bit" and cfg.train.gradient_checkpointing
    assert (cfg.data.rows, cfg.data.eval_fraction, cfg.data.source) == (
        5000,
        0.1,
        "lavita/ChatDoctor-HealthCareMagic-100k",
    )


def test_overrides_parse_as_yaml_and_win():
    cfg = load_config(REPO / "params.yaml", cli_overrides(["train.max_steps=7", "lora.target_modules=[q_proj]"]))
    assert cfg.train.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj"]
    assert flatten(cfg)["train.max_steps"] == 7


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"lora.r": 0}, "`lora.r` = 0: Input should be greater than 0"),
        ({"model.base": "/no/such/model"}, "`model.base` = '/no/such/model': '/no/such/model' is not a model folder"),
        ({"model.base": "not a model"}, "is neither `tiny`, a hub id like org/name, nor an existing folder"),
        ({"train.learning_rate": -1}, "`train.learning_rate` = -1"),
        ({"data.eval_fraction": 1.5}, "`data.eval_fraction` = 1.5: Input should be less than 1"),
        ({"tokenize.template": "alpaca"}, "`tokenize.template` = 'alpaca'"),
        ({"train.max_stepz": 3}, "unknown key `train.max_stepz`"),
        ({"preset": "llama-70b"}, "`preset` = 'llama-70b': choose one of ['cpu-tiny', 'mistral-7b']"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "params.yaml", override)
    assert expected in str(err.value)
    assert "params.yaml + overrides" in str(err.value)


def test_malformed_cli_override():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        cli_overrides(["train.max_steps"])


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "params.yaml")


def test_presets_are_valid():
    for name in PRESETS:
        assert build_config({"preset": name}).preset == name
