"""Text cleaning rules for patient queries and doctor answers; each rule reports whether it fired.

The HealthCareMagic scrape replaced names and signatures with "Chat Doctor" (289 of 500 answers),
mid-sentence as often as in greetings. Sentences that are only platform boilerplate around it
("Thanks for using Chat Doctor.") are dropped; elsewhere the words alone go, and the spacing and
punctuation around them are repaired so the sentence still reads.
"""

from __future__ import annotations

import re
import unicodedata

ARTEFACT = re.compile(r"chat\s*doctor", re.IGNORECASE)  # also glued: "HealthyChatDoctor"
# A sentence that mentions the artefact and is about the platform, not the patient.
BOILERPLATE = re.compile(
    r"\b(welcome|thank|thanks|using|choosing|posting|question on|asking|writing|contact|consult|"
    r"regards|take care|i am|site|bit\.ly|wish you|answering|get well)\b",
    re.IGNORECASE,
)
# In a long unpunctuated run-on the greeting cannot be dropped alone: cut "to Chat Doctor forum".
ARTEFACT_PHRASE = re.compile(r"(?:\b(?:to|on|at|in|using)\s+)?chat\s*doctor(?:\s+forum)?", re.IGNORECASE)
BOILERPLATE_MAX_WORDS = 20
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
ENDS_A_SENTENCE = re.compile(r"[.!?)\"'\]]\s*$")


# Control characters that separate words (tabs, line and record breaks) become a space; every other
# control or format character (NUL, zero-width space and joiners, soft hyphen, BOM, bidi marks,
# private-use and unassigned code points) is dropped, so a word it sat in stays one word.
SEPARATORS = frozenset("\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85")


def normalise(text: str) -> str:
    """NFKC unicode, no control or format characters, single spaces, trimmed (newlines as one space)."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(
        " " if ch in SEPARATORS else ch for ch in text if ch in SEPARATORS or unicodedata.category(ch)[0] != "C"
    )
    return re.sub(r"\s+", " ", text).strip()


def _tidy(sentence: str) -> str:
    sentence = re.sub(r"\s+([,.;:!?])", r"\1", sentence)  # "child ." -> "child."
    sentence = re.sub(r"([,;:])\s*([.!?])", r"\2", sentence)  # "regards, ." -> "regards."
    sentence = re.sub(r"^[\s,.;:]+", "", sentence)  # a sentence that now starts with punctuation
    return re.sub(r"\s{2,}", " ", sentence).strip()


def remove_artefacts(text: str) -> str:
    """Drop boilerplate sentences that carry "Chat Doctor"; cut the words out of the others."""
    if not ARTEFACT.search(text):
        return text
    kept = []
    for sentence in SENTENCE_END.split(text):
        if not ARTEFACT.search(sentence):
            kept.append(sentence)
            continue
        stripped = _tidy(ARTEFACT.sub(" ", sentence))
        short = len(stripped.split()) <= BOILERPLATE_MAX_WORDS
        if (short and BOILERPLATE.search(sentence)) or not re.search(r"[A-Za-z]{2}", stripped):
            continue
        kept.append(stripped if short else _tidy(ARTEFACT_PHRASE.sub(" ", sentence)))
    return _tidy(" ".join(kept))


def looks_cut_off(answer: str) -> bool:
    """An answer that stops mid-sentence (no closing punctuation)."""
    return not ENDS_A_SENTENCE.search(answer)


def near_duplicate_key(query: str, answer: str) -> str:
    """Rows equal up to case, spacing and punctuation share this key."""
    return re.sub(r"[\W_]+", "", f"{query}\x00{answer}".casefold())
