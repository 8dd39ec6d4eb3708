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

from chat_doctor.config import ChatConfig, Config, ModelConfig, is_local
from chat_doctor.modeling import load_adapter, load_base_model, load_tokenizer
from chat_doctor.prompts import build_prompt


class InputTooLong(ValueError):
    """The user's message is over `chat.max_input_chars`."""


@dataclass
class ChatModel:
    model: object
    tokenizer: object
    template: str
    label: str  # what was loaded, e.g. "chat-doctor-adapter v3 (@champion)"
    card: str  # the model card (markdown)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _from_folder(folder: Path, cfg: Config) -> tuple[ModelConfig, Path | None, str, str]:
    """(base config, adapter folder or None, template, card) of a local adapter or merged folder."""
    card = (folder / "README.md").read_text() if (folder / "README.md").is_file() else ""
    saved = folder / "chat_doctor_config.json"  # written by training beside the adapter
    trained = json.loads(saved.read_text()) if saved.is_file() else {}
    template = trained.get("tokenize", {}).get("template", cfg.tokenize.template)
    if (folder / "adapter_config.json").is_file():
        base = trained.get("model") or cfg.model.model_dump()
        return ModelConfig(**{**base, "trust_remote_code": cfg.model.trust_remote_code}), folder, template, card
    if (folder / "config.json").is_file():  # a merged model is its own base
        return cfg.model.model_copy(update={"base": str(folder), "revision": None}), None, template, card
    raise FileNotFoundError(f"chat.model: {folder} holds neither a PEFT adapter nor a model (no config.json)")


def _from_registry(spec: str, cfg: Config, cache: Path) -> tuple[ModelConfig, Path, str, str, str]:
    from chat_doctor.registry import download_adapter, resolve
    from chat_doctor.tracking import client

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
    return model_cfg, adapter, template, version.description or "", label


Located = tuple[ModelConfig, Path | None, str, str, str]  # base config, adapter or None, template, card, label


def locate(spec: str, cfg: Config, cache: Path, key: str = "chat.model") -> Located:
    """(base config, adapter folder or None, template, card, label) of `spec`: an alias or version of
    `registry.model_name` (its adapter downloaded under `cache`), or a local adapter or merged folder."""
    folder = Path(spec).expanduser()
    if is_local(spec):
        if not folder.exists():
            raise FileNotFoundError(f"{key}: {spec!r}: no such folder")
        return (*_from_folder(folder, cfg), str(folder))
    return _from_registry(spec, cfg, cache)


def located_tokenizer(model_cfg: ModelConfig, adapter: Path | None):
    """The tokenizer saved beside the adapter if there is one (the registry keeps it elsewhere), else the base's."""
    has_tokenizer = adapter is not None and (adapter / "tokenizer_config.json").is_file()
    return load_tokenizer(model_cfg, str(adapter) if has_tokenizer else None)


def load_chat_model(spec: str, cfg: Config, cache: Path) -> ChatModel:
    """`spec`: an alias or version of `registry.model_name`, or a local adapter or merged folder."""
    model_cfg, adapter, template, card, label = locate(spec, cfg, cache)
    tokenizer = located_tokenizer(model_cfg, adapter)
    model = load_base_model(model_cfg, quantized=_on_gpu())  # 4 bit as trained on a GPU; fp32 on a CPU
    if adapter is not None:
        model = load_adapter(model, adapter)
    model.eval()
    return ChatModel(model, tokenizer, template, label, card)


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
