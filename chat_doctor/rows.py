"""Row checks and cleaning for the sample step: what makes a row invalid, and what the rules change."""

from __future__ import annotations

from dataclasses import dataclass

from chat_doctor.cleaning import normalise, remove_artefacts
from chat_doctor.config import DataConfig

REQUIRED = ("input", "output")  # the patient's query and the doctor's answer


@dataclass(frozen=True)
class Problem:
    field: str
    reason: str

    def describe(self, source: str, row_number: int, column: str) -> str:
        return f"data.source: {source} row {row_number}, field `{self.field}` (column {column!r}): {self.reason}"


def _is_undecodable(text: str) -> bool:
    # U+FFFD is what a lossy decoder leaves for bytes it could not read; lone surrogates, what
    # `surrogateescape` leaves. Neither is text a model should learn.
    return "\ufffd" in text or any("\ud800" <= ch <= "\udfff" for ch in text)


def check_row(raw: dict, cfg: DataConfig) -> tuple[dict | None, Problem | None]:
    """The row in our schema (instruction/input/output), or the first problem with it."""
    row = {}
    for field, column in cfg.columns.items():
        value = raw.get(column)
        if value is None:
            if field in REQUIRED:
                return None, Problem(field, "missing (null)")
            value = ""
        if not isinstance(value, str):
            return None, Problem(field, f"not a string ({type(value).__name__})")
        if _is_undecodable(value):
            return None, Problem(field, "undecodable text (replacement characters)")
        if len(value) > cfg.max_chars:
            return None, Problem(field, f"{len(value)} characters, over data.max_chars = {cfg.max_chars}")
        if field in REQUIRED and not value.strip():
            return None, Problem(field, "empty")
        row[field] = value
    return row, None


def clean_row(row: dict, cfg: DataConfig) -> tuple[dict, list[str]]:
    """Cleaned copy of a valid row and the names of the rules that changed it."""
    cleaned, changed = {}, []
    for field, text in row.items():
        new = normalise(text)
        if new != text:
            changed.append(f"whitespace/unicode in {field}")
        if cfg.clean_artefacts and field in REQUIRED:
            without = remove_artefacts(new)
            if without != new:
                changed.append(f"Chat Doctor artefact in {field}")
            new = without
        cleaned[field] = new
    return cleaned, changed
