"""The embedded base model `tiny`: a small Mistral built from a fixed seed, with the real tokenizer.

It runs offline on a CPU and goes through exactly the loading path of the real Mistral-7B
(`from_pretrained` + `BitsAndBytesConfig`), so every code path is exercised without a hub.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_DIR = Path("models/tiny-mistral")
TINY_SEED = 1234
MISTRAL_7B_SHAPE = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    sliding_window=4096,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
# Mistral-7B's shape, scaled down: same vocabulary, grouped-query attention, SwiGLU, RMSNorm.
TINY_SHAPE = {
    **MISTRAL_7B_SHAPE,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "sliding_window": None,
}
_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
    "model_max_length": 32768,
}


def mistral_v1_tokenizer_file() -> Path:
    """The Mistral-7B v1 sentencepiece model that the mistral-common package ships."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall mistral-common")
    return path


def write_tokenizer(folder: Path) -> None:
    """A folder that AutoTokenizer loads as the Mistral v1 tokenizer (32,000 tokens)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as raw:
        shutil.copy(mistral_v1_tokenizer_file(), Path(raw) / "tokenizer.model")
        (Path(raw) / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2))
        tokenizer = AutoTokenizer.from_pretrained(raw)
    tokenizer.save_pretrained(folder)


def ensure_tiny_model(folder: Path = TINY_DIR) -> Path:
    """Build the tiny base once (a few seconds); later calls return the saved folder."""
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        torch.manual_seed(TINY_SEED)
        model = MistralForCausalLM(MistralConfig(**TINY_SHAPE))
        model.save_pretrained(staging, safe_serialization=True)
        write_tokenizer(staging)
        # Rename is atomic: a crash never leaves a half-built model where loaders look.
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
