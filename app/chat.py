"""Chat with a fine-tuned chat-doctor model: a Gradio page, or a terminal chat.

    chat-doctor-chat                        # the champion, on http://127.0.0.1:7860
    chat-doctor-chat --model candidate      # or v3, or runs/run-.../adapter, or runs/run-.../merged
    chat-doctor-chat --terminal             # no browser needed

Reads params section `chat` (and `registry`, `model`). Binds 127.0.0.1 unless `chat.host` says
otherwise; set CHAT_DOCTOR_UI_USER and CHAT_DOCTOR_UI_PASSWORD to require a login.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from chat_doctor.config import ChatConfig, load_config
from chat_doctor.core.layout import PARAMS_FILE
from chat_doctor.serving.chat_model import ChatModel, InputTooLong, check_input, load_chat_model, stream_answer
from chat_doctor.tracking.model_card import DISCLAIMER

CACHE = Path("runs") / "chat-cache"  # registry downloads
AUTH_ENV = ("CHAT_DOCTOR_UI_USER", "CHAT_DOCTOR_UI_PASSWORD")
SETTINGS = ("max_new_tokens", "repetition_penalty", "temperature", "top_p")  # generation knobs of `chat`


def build_ui(chat: ChatModel, cfg: ChatConfig):
    import gradio as gr

    def checked(message: str) -> str:
        try:
            return check_input(message, cfg)
        except InputTooLong as err:
            raise gr.Error(str(err)) from None  # shown in the page, and raised by gradio_client

    def respond(message, history, *values):
        for part in stream_answer(chat, checked(message), dict(zip(SETTINGS, values, strict=True))):
            yield part["text"] or "…"

    def answer(message: str) -> dict:
        """One whole answer with how it ended: finish `eos` (the model stopped) or `limit`."""
        *_, last = stream_answer(chat, checked(message), cfg.model_dump(include=set(SETTINGS)))
        return {"answer": last["text"], "finish": last["finish"], "tokens": last["tokens"]}

    with gr.Blocks(title="chat-doctor") as page:
        gr.Markdown(f"# chat-doctor\n\n**{DISCLAIMER}**", elem_id="disclaimer")
        with gr.Row():
            with gr.Column(scale=3):
                settings = [  # rendered by ChatInterface inside its accordion
                    gr.Slider(1, 1024, value=cfg.max_new_tokens, step=1, label="max new tokens", render=False),
                    gr.Slider(
                        1.0, 2.0, value=cfg.repetition_penalty, step=0.05, label="repetition penalty", render=False
                    ),
                    gr.Slider(
                        0.0, 2.0, value=cfg.temperature, step=0.05, label="temperature (0 = greedy)", render=False
                    ),
                    gr.Slider(0.05, 1.0, value=cfg.top_p, step=0.05, label="top p (when sampling)", render=False),
                ]
                gr.ChatInterface(
                    respond,
                    additional_inputs=settings,
                    additional_inputs_accordion="Generation settings",
                    textbox=gr.Textbox(placeholder=f"Describe your symptoms (up to {cfg.max_input_chars} characters)"),
                    description="Each question is answered on its own, as the model was trained.",
                    api_name="chat",
                )
            with gr.Column(scale=2):
                gr.Markdown(f"**Model:** {chat.label}", elem_id="model-label")
                gr.Markdown(_strip_front_matter(chat.card) or "(no model card)", elem_id="model-card")
        gr.api(answer, api_name="answer")
    return page


def _strip_front_matter(card: str) -> str:
    if card.startswith("---\n"):
        return card.split("\n---\n", 1)[-1]
    return card


def _auth() -> tuple[str, str] | None:
    user, password = (os.environ.get(name) for name in AUTH_ENV)
    if bool(user) != bool(password):
        raise SystemExit(f"set both {AUTH_ENV[0]} and {AUTH_ENV[1]}, or neither")
    return (user, password) if user and password else None


def terminal_chat(chat: ChatModel, cfg: ChatConfig, stdin=sys.stdin, stdout=sys.stdout) -> None:
    """A line-by-line chat on the terminal; an empty line, `/quit` or end of input stops it."""
    print(f"chat-doctor: {chat.label}\n{DISCLAIMER}\n", file=stdout)
    settings = cfg.model_dump(include=set(SETTINGS))
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() in ("", "/quit"):
            break
        try:
            text = check_input(line, cfg)
        except InputTooLong as err:
            print(err, file=stdout)
            continue
        shown = ""
        print("doctor> ", end="", file=stdout, flush=True)
        for part in stream_answer(chat, text, settings):
            print(part["text"][len(shown) :], end="", file=stdout, flush=True)
            shown = part["text"]
        print(f"\n[{'stopped' if part['finish'] == 'eos' else 'reached max_new_tokens'}]\n", file=stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chat-doctor-chat", description="Chat with a fine-tuned model.")
    parser.add_argument("--model", help="alias, version or folder (default: chat.model, i.e. champion)")
    parser.add_argument("--terminal", action="store_true", help="chat in the terminal instead of a browser")
    parser.add_argument("--host", help="bind address (default chat.host = 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default chat.port)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub model")
    parser.add_argument("--params", default=PARAMS_FILE)
    args = parser.parse_args(argv)
    overrides = {f"chat.{k}": getattr(args, k) for k in ("model", "host", "port") if getattr(args, k) is not None}
    if args.trust_remote_code:
        overrides["model.trust_remote_code"] = True
    cfg = load_config(args.params, overrides)
    auth = _auth()  # before loading: a half-set login should fail at once
    chat = load_chat_model(cfg.chat.model, cfg, CACHE)
    if args.terminal:
        terminal_chat(chat, cfg.chat)
        return
    print(f"chat-doctor: {chat.label} on http://{cfg.chat.host}:{cfg.chat.port}", flush=True)
    build_ui(chat, cfg.chat).queue(default_concurrency_limit=1).launch(
        server_name=cfg.chat.host, server_port=cfg.chat.port, auth=auth, show_error=True, quiet=True
    )


if __name__ == "__main__":
    main()
