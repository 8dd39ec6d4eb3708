"""Prompt templates, shared by tokenization, evaluation and the chat UI so they never drift apart.

A prompt ends without a trailing space: the answer is joined with one space, which the tokenizer
folds into the answer's first token ("▁Hi"). A prompt ending in a space would give the model a lone
"▁" token at inference that it never saw in training.
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
}


def build_prompt(template: str, query: str) -> str:
    """The text the model sees before the doctor's answer."""
    return TEMPLATES[template].format(input=query.strip())


def build_example(template: str, query: str, answer: str) -> tuple[str, int]:
    """Full training text and the character offset where the answer starts."""
    prompt = build_prompt(template, query)
    return f"{prompt} {answer.strip()}", len(prompt)
