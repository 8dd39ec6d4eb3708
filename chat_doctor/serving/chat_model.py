"""A fine-tuned model ready to chat: loaded from the registry (alias or version) or a local folder
through the same loading code as the pipeline, and answers streamed token by token.

4 bit on a GPU (as trained), full precision on a CPU. Each question is answered on its own, in the
prompt template the model was trained with: the training data holds single questions, not dialogues.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chat_doctor.config import ChatConfig, Config, ModelConfig
from chat_doctor.core.files import is_local
from chat_doctor.data.prompts import build_prompt
from chat_doctor.models.loading import load_adapter, load_base_model, load_tokenizer
from chat_doctor.tracking.mlflow_runs import client
from chat_doctor.tracking.registry import download_adapter, resolve


class InputTooLong(ValueError):
    """The user's message is over `chat.max_input_chars`."""


@dataclass
class ChatModel:
    model: Any  # a transformers model (with its adapter)
    tokenizer: Any
    template: str
    label: str  # what was loaded, e.g. "chat-doctor-adapter v3 (@champion)"
    card: str  # the model card (markdown)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class Located:
    """What a model spec resolved to: the base to load, the adapter on it (None for a merged
    folder, which is its own base), its prompt template, model card and a label for people."""

    model: ModelConfig
    adapter: Path | None
    template: str
    card: str
    label: str


def _from_folder(folder: Path, cfg: Config) -> Located:
    """A local adapter or merged folder."""
    card = (folder / "README.md").read_text() if (folder / "README.md").is_file() else ""
    saved = folder / "chat_doctor_config.json"  # written by training beside the adapter
    trained = json.loads(saved.read_text()) if saved.is_file() else {}
    template = trained.get("tokenize", {}).get("template", cfg.tokenize.template)
    if (folder / "adapter_config.json").is_file():
        base = trained.get("model") or cfg.model.model_dump()
        model = ModelConfig(**{**base, "trust_remote_code": cfg.model.trust_remote_code})
        return Located(model, folder, template, card, str(folder))
    if (folder / "config.json").is_file():  # a merged model is its own base
        model = cfg.model.model_copy(update={"base": str(folder), "revision": None})
        return Located(model, None, template, card, str(folder))
    raise FileNotFoundError(f"chat.model: {folder} holds neither a PEFT adapter nor a model (no config.json)")


def _from_registry(spec: str, cfg: Config, cache: Path) -> Located:
    name = cfg.registry.model_name
    version = resolve(name, spec)
    adapter = download_adapter(name, version.version, cache / f"{name}-v{version.version}")
    params = client().get_run(version.run_id).data.params
    revision = version.tags.get("base_revision")
    model_cfg = cfg.model.model_copy(
        update={"base": version.tags["base_model"], "revision": None if revision in (None, "None") else revision}
    )
    template = params.get("tokenize.template", cfg.tokenize.template)
    label = f"{name} v{version.version}" + (f" (@{spec})" if not spec.removeprefix("v").isdigit() else "")
    return Located(model_cfg, adapter, template, version.description or "", label)


def locate(spec: str, cfg: Config, cache: Path, key: str = "chat.model") -> Located:
    """`spec`: an alias or version of `registry.model_name` (its adapter downloaded under `cache`),
    or a local adapter or merged folder."""
    folder = Path(spec).expanduser()
    if is_local(spec):
        if not folder.exists():
            raise FileNotFoundError(f"{key}: {spec!r}: no such folder")
        return _from_folder(folder, cfg)
    return _from_registry(spec, cfg, cache)


def located_tokenizer(found: Located):
    """The tokenizer saved beside the adapter if there is one (the registry keeps it elsewhere), else the base's."""
    adapter = found.adapter
    has_tokenizer = adapter is not None and (adapter / "tokenizer_config.json").is_file()
    return load_tokenizer(found.model, str(adapter) if has_tokenizer else None)


def load_chat_model(spec: str, cfg: Config, cache: Path) -> ChatModel:
    """`spec`: an alias or version of `registry.model_name`, or a local adapter or merged folder."""
    found = locate(spec, cfg, cache)
    tokenizer = located_tokenizer(found)
    model = load_base_model(found.model, quantized=_on_gpu())  # 4 bit as trained on a GPU; fp32 on a CPU
    if found.adapter is not None:
        model = load_adapter(model, found.adapter)
    model.eval()
    return ChatModel(model, tokenizer, found.template, found.label, found.card)


def check_input(message: str, chat_cfg: ChatConfig) -> str:
    text = (message or "").strip()
    if not text:
        raise InputTooLong("Please type a question.")
    if len(text) > chat_cfg.max_input_chars:
        raise InputTooLong(
            f"Your message is {len(text)} characters long; the limit is {chat_cfg.max_input_chars} "
            "(chat.max_input_chars). Please shorten it."
        )
    return text


class _NewTokens:
    """A transformers streamer that hands over every new token id as it is generated. (The stock
    TextIteratorStreamer holds text back until a space, so a reply without spaces would arrive
    in one piece.)"""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.queue.put(value.view(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self):
        while (ids := self.queue.get()) is not None:
            yield ids


def stream_answer(chat: ChatModel, message: str, settings: dict) -> Iterator[dict]:
    """Yield {"text": answer so far, "finish": None} per token, then a last one with finish `eos`
    or `limit` and the number of new tokens. `settings`: max_new_tokens, repetition_penalty,
    temperature, top_p."""
    tokenizer = chat.tokenizer
    inputs = tokenizer(build_prompt(chat.template, message), return_tensors="pt").to(chat.model.device)
    streamer = _NewTokens()
    sampling = settings["temperature"] > 0
    kwargs = {
        **inputs,
        "streamer": streamer,
        "max_new_tokens": int(settings["max_new_tokens"]),
        "repetition_penalty": float(settings["repetition_penalty"]),
        "do_sample": sampling,
        **({"temperature": float(settings["temperature"]), "top_p": float(settings["top_p"])} if sampling else {}),
        "use_cache": True,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    failure: list[BaseException] = []

    def generate() -> None:
        try:
            chat.model.generate(**kwargs)
        except BaseException as err:  # handed to the caller below
            failure.append(err)
            streamer.end()

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    new: list[int] = []
    for ids in streamer:
        new.extend(ids)
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        if text and tokenizer.eos_token_id not in ids:
            yield {"text": text, "finish": None}
    worker.join()
    if failure:
        raise failure[0]
    finish = "eos" if tokenizer.eos_token_id in new else "limit"
    tokens = new.index(tokenizer.eos_token_id) if finish == "eos" else len(new)
    yield {"text": tokenizer.decode(new[:tokens], skip_special_tokens=True).strip(), "finish": finish, "tokens": tokens}
