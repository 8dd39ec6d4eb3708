"""Prompt templates, shared by tokenization, evaluation and the chat UI so they never drift apart.

A prompt ends without a trailing space: the answer is joined with one space, which the tokenizer
folds into the answer's first token ("▁Hi"). A prompt ending in a space would give the model a lone
"▁" token at inference that it never saw in training. A chat template's prompt ends with a newline
(the assistant's turn), and the answer follows it directly.
"""

from __future__ import annotations

TEMPLATES = {
    # The original Chat-Doctor notebook's template.
    "original": (
        "### The following is a doctor's opinion on a person's query: \n"
        "### Patient query: {input} \n"
        "### Doctor opinion:"
    ),
    # Mistral's instruct format (the BOS token comes from the tokenizer).
    "mistral-inst": "[INST] {input} [/INST]",
    # ChatML, as SmolLM2-Instruct was trained (its tokenizer's chat template, with the dataset's own
    # instruction as the system message). The answer ends with <|im_end|>, the model's EOS.
    "chatml": (
        "<|im_start|>system\nIf you are a doctor, please answer the medical questions based on the patient's "
        "description.<|im_end|>\n<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
    ),
}


def build_prompt(template: str, query: str) -> str:
    """The text the model sees before the doctor's answer."""
    return TEMPLATES[template].format(input=query.strip())


def build_example(template: str, query: str, answer: str) -> tuple[str, int]:
    """Full training text and the character offset where the answer starts."""
    prompt = build_prompt(template, query)
    joiner = "" if prompt.endswith("\n") else " "  # a chat turn starts on its own line
    return f"{prompt}{joiner}{answer.strip()}", len(prompt)
