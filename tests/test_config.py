"""Config: presets, overrides and errors that name the key, before anything is loaded."""

from pathlib import Path

import pytest

from chat_doctor.config import (
    PRESETS,
    ConfigError,
    build_config,
    cli_overrides,
    flatten,
    load_config,
    split_for_processes,
)

REPO = Path(__file__).resolve().parents[1]


def write_params(path: Path, choices: dict) -> None:
    """Set keys (`preset`, `data.rows`) in a params.yaml, as a user editing it would."""
    import yaml

    params = yaml.safe_load(path.read_text())
    for key, value in choices.items():
        section, _, leaf = key.rpartition(".")
        if section:
            params[section] = {**(params.get(section) or {}), leaf: value}
        else:
            params[leaf] = value
    path.write_text(yaml.safe_dump(params))


def test_params_yaml_is_the_smollm2_demo():
    """A fresh clone fine-tunes the real small model; the tests' projects use the tiny one."""
    from tests.conftest import TEST_PRESET

    cfg = load_config(REPO / "params.yaml")
    assert (cfg.preset, cfg.model.base, cfg.tokenize.template) == ("smollm2-135m", "smollm2-135m", "chatml")
    assert cfg.data.source == "data/raw/synthetic_healthcaremagic.jsonl"
    tiny = load_config(REPO / "params.yaml", {"preset": TEST_PRESET})
    assert (tiny.model.base, tiny.tokenize.template) == ("tiny", "original")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_shipped_params_yaml_gives_each_preset_its_own_recipe(preset, tmp_path):
    """`python -m flows.finetune preset=X`, and `preset: X` written in params.yaml, both give preset
    X exactly: the shipped file holds no values of its own that would win over it."""
    recipe = build_config({"preset": preset})
    assert load_config(REPO / "params.yaml", {"preset": preset}) == recipe
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    write_params(params, {"preset": preset})
    assert load_config(params) == recipe
    if preset.startswith("mistral-7b"):
        assert recipe.model.base == "mistralai/Mistral-7B-v0.1"
        assert (recipe.data.source, recipe.data.rows) == ("lavita/ChatDoctor-HealthCareMagic-100k", 5000)
        assert recipe.train.learning_rate <= 2.5e-4 and recipe.evaluate.rows == 500


def test_a_choice_in_params_yaml_wins_over_the_preset(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    write_params(params, {"preset": "mistral-7b", "data.rows": 1000})
    cfg = load_config(params)
    assert (cfg.data.rows, cfg.data.source, cfg.train.epochs) == (1000, "lavita/ChatDoctor-HealthCareMagic-100k", 1)
    write_params(params, {"train.max_steps": 20})  # steps set by hand win over the preset's epochs
    assert (load_config(params).train.max_steps, load_config(params).train.epochs) == (20, None)
    with pytest.raises(ConfigError, match=r"set train.max_steps or train.epochs, not both"):
        load_config(params, {"train.epochs": 2})  # both set by hand
    assert load_config(params, {"train.epochs": 2, "train.max_steps": None}).train.epochs == 2


def test_mistral_7b_preset_is_the_fast_recipe():
    cfg = build_config({"preset": "mistral-7b"})
    assert cfg.model.base == "mistralai/Mistral-7B-v0.1"
    assert (cfg.model.quant_type, cfg.model.double_quant, cfg.model.compute_dtype) == ("nf4", True, "auto")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.adapter_dtype) == (32, 64, 0.0, "compute")
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    t = cfg.train
    assert (t.packing, t.attention, t.kernels, t.upcast_layers, t.gradient_checkpointing) == (
        True,
        "varlen",
        "auto",
        False,
        False,
    )
    # fp8 products where the GPU has them (bf16 elsewhere), one fp8 copy of the base; compiled layers.
    assert (t.fp8, t.fp8_weights, t.compile) == ("auto", "fp8", True)
    # kernels: auto = liger's fused loss beside the compiled layers, all of liger's kernels without
    # them (liger's layer kernels do not compile), none on a CPU.
    assert t.kernels_in_use(cuda=True) == "liger-loss"
    uncompiled = build_config({"preset": "mistral-7b", "train": {"compile": False}}).train
    assert uncompiled.kernels_in_use(cuda=True) == "liger"
    assert t.kernels_in_use(cuda=False) == "none"
    assert build_config({"train": {"kernels": "liger"}}).train.kernels_in_use(cuda=False) == "liger"
    assert (t.pack_length, t.micro_batch_size, t.grad_accum, t.gpus, t.strategy) == (1536, 4, 4, "auto", "ddp")
    assert (cfg.data.rows, cfg.data.eval_fraction, cfg.data.source) == (
        5000,
        0.1,
        "lavita/ChatDoctor-HealthCareMagic-100k",
    )


def test_lean_and_original_presets():
    lean = build_config({"preset": "mistral-7b-lean"})
    assert lean.train.gradient_checkpointing and lean.train.attention == "varlen"
    fast = build_config({"preset": "mistral-7b"}).train
    assert (lean.train.pack_length, lean.train.epochs) == (fast.pack_length, fast.epochs) == (1536, 1)
    assert (lean.train.micro_batch_size, lean.train.grad_accum) == (4, 4)  # mistral-7b's micro-batches
    assert lean.train.checkpoint_offload and lean.train.optim == "paged_adamw_8bit"
    # fp8 off until measured on it; turned on, made from the 4-bit weights (no fp8 copy); not compiled.
    assert (lean.train.fp8, lean.train.fp8_weights, lean.train.compile, lean.train.kernels) == (
        False,
        "4bit",
        False,
        "liger",
    )
    # No step needs more GPU memory than training: the merge in host memory, evaluation in 4 bit.
    assert (lean.merge.device, lean.merge.dtype, lean.evaluate.load_in_4bit) == ("cpu", "bfloat16", True)
    assert (fast.max_steps, build_config({"preset": "mistral-7b"}).merge.device) == (None, "auto")
    original = build_config({"preset": "mistral-7b-original"})
    assert (original.lora.dropout, original.lora.adapter_dtype) == (0.05, "float32")
    assert original.train.upcast_layers and original.train.gradient_checkpointing and not original.train.packing
    assert (original.train.micro_batch_size, original.train.max_steps, original.train.learning_rate) == (4, 500, 2.5e-4)


@pytest.mark.parametrize(
    ("micro", "accum", "processes", "split"),
    [
        (16, 4, 1, (16, 4)),
        (16, 4, 2, (16, 2)),
        (16, 4, 4, (16, 1)),
        (16, 4, 8, (8, 1)),
        (4, 2, 8, (1, 1)),
        (6, 1, 4, None),
    ],
)
def test_effective_batch_is_kept_over_processes(micro, accum, processes, split):
    train = build_config({"train": {"micro_batch_size": micro, "grad_accum": accum}}).train
    if split is None:
        with pytest.raises(ConfigError, match="6 rows per step cannot be split over 4 GPUs"):
            split_for_processes(train, processes)
        return
    assert split_for_processes(train, processes) == split
    assert split[0] * split[1] * processes == micro * accum


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
        (
            {"model.base": "not a model"},
            "is neither an embedded base (tiny, smollm2-135m), a hub id like org/name, nor an existing folder",
        ),
        ({"train.learning_rate": -1}, "`train.learning_rate` = -1"),
        ({"data.eval_fraction": 1.5}, "`data.eval_fraction` = 1.5: Input should be less than 1"),
        ({"tokenize.template": "alpaca"}, "`tokenize.template` = 'alpaca'"),
        ({"train.max_stepz": 3}, "unknown key `train.max_stepz`"),
        ({"preset": "llama-70b"}, "`preset` = 'llama-70b': choose one of ['cpu-tiny', 'mistral-7b', "),
        ({"train.attention": "varlen"}, "train.attention = varlen needs train.packing: true"),
        ({"train.strategy": "fsdp"}, "train.strategy = fsdp needs train.upcast_layers: false"),
        ({"train.strategy": "fsdp", "train.upcast_layers": False}, "fsdp needs lora.adapter_dtype: compute"),
        ({"train.gpus": 0}, "`train.gpus` = 0: must be auto or at least 1"),
        ({"train.nnodes": 2, "train.node_rank": 2}, "`train.node_rank` = 2: must be below train.nnodes = 2"),
        ({"train.kernels": "apex"}, "`train.kernels` = 'apex'"),
        (
            {"train.kernels": "liger", "train.compile": True},
            "train.compile needs train.kernels: none, liger-loss or auto (torch.compile rejects liger's layer kernels)",
        ),
        # Values the schema once let through for a library to refuse later, naming no key.
        ({"data.seed": -1}, "`data.seed` = -1: Input should be greater than or equal to 0"),
        ({"train.seed": -1}, "`train.seed` = -1: Input should be greater than or equal to 0"),
        ({"train.seed": 2**32}, "`train.seed` = 4294967296: Input should be less than 4294967296"),
        ({"train.rdzv_endpoint": "node0"}, "`train.rdzv_endpoint` = 'node0': must be host:port"),
        ({"registry.model_name": "my model's"}, '`registry.model_name` = "my model\'s": use letters, digits'),
        ({"registry.champion_alias": "v2"}, "`registry.champion_alias` = 'v2': 'v2' names a version in MLflow"),
        ({"registry.alias": "latest"}, "`registry.alias` = 'latest': 'latest' names a version in MLflow"),
        ({"registry.alias": "new one"}, "`registry.alias` = 'new one': use letters, digits, '_' and '-'"),
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


def test_compiled_layers_keep_liger_fused_loss_only():
    """liger-loss goes with train.compile, and asks liger for its lm_head + loss kernel alone."""
    from chat_doctor.training.trainer import LIGER_LOSS_ONLY

    cfg = build_config({"preset": "mistral-7b", "train": {"kernels": "liger-loss", "compile": True}})
    assert (cfg.train.kernels, cfg.train.compile) == ("liger-loss", True)
    assert [k for k, on in LIGER_LOSS_ONLY.items() if on] == ["fused_linear_cross_entropy"]


def test_presets_are_valid():
    for name in PRESETS:
        assert build_config({"preset": name}).preset == name


def test_every_key_is_documented_and_the_reference_is_current():
    """docs/config.md is rendered from the schema; a field without a description, or a schema change
    without a new render, fails here."""
    from chat_doctor.config.reference import REFERENCE_FILE, render, sections

    undocumented = [f"{s}.{k}" for s, m in sections().items() for k, f in m.model_fields.items() if not f.description]
    assert undocumented == []
    rendered = render()
    assert "| `train.learning_rate` | float | `0.002` | Peak learning rate. |" in rendered
    assert "- `mistral-7b-lean`: " in rendered and '`merge.device="cpu"`' in rendered
    committed = (Path(__file__).resolve().parents[1] / REFERENCE_FILE).read_text()
    assert committed == rendered, "run: python -m chat_doctor.config.reference > docs/config.md"


def test_an_optimizer_transformers_lacks_is_refused_before_the_data_steps():
    from chat_doctor.training.preflight import check_before_data

    with pytest.raises(
        ConfigError, match=r"train.optim = 'adam': not an optimizer of transformers; use auto or one of"
    ):
        check_before_data(build_config({"train": {"optim": "adam"}}))


@pytest.mark.parametrize(
    ("item", "key", "value"),
    [
        ("data.source=/data/my rows #2.jsonl", "data.source", "/data/my rows #2.jsonl"),  # not a comment
        ("data.source=yes", "data.source", "yes"),  # not a boolean
        ("data.revision=0123", "data.revision", "0123"),  # not a number
        ("data.revision=2024-01-01", "data.revision", "2024-01-01"),  # not a date
        ("model.base=  ./my model", "model.base", "  ./my model"),
        ("data.revision=null", "data.revision", None),  # an optional text key can still be cleared
        ("train.learning_rate=1e-4", "train.learning_rate", 1e-4),  # other keys: YAML 1.2
        ("train.packing=true", "train.packing", True),
        ("data.rows=0123", "data.rows", 123),
        ("lora.target_modules=[q_proj, v_proj]", "lora.target_modules", ["q_proj", "v_proj"]),
        ("data.columns={input: question}", "data.columns", {"input": "question"}),
    ],
)
def test_command_line_values_are_taken_as_typed(item, key, value):
    assert cli_overrides([item]) == {key: value}


def test_a_command_line_value_that_is_not_yaml_names_its_key():
    with pytest.raises(ConfigError, match=r"override lora.target_modules='\[q_proj': not a value"):
        cli_overrides(["lora.target_modules=[q_proj"])
