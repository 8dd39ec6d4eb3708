"""Row checks and cleaning for the sample step: what makes a row invalid, and what the rules change."""

from __future__ import annotations

from dataclasses import dataclass

from chat_doctor.cleaning import normalise, remove_artefacts
from chat_doctor.config import DataConfig
from chat_doctor.sources import DataError

REQUIRED = ("input", "output")  # the patient's query and the doctor's answer


@dataclass(frozen=True)
class Problem:
    field: str
    reason: str

    def describe(self, source: str, row_number: int, column: str, key: str = "data.source") -> str:
        return f"{key}: {source} row {row_number}, field `{self.field}` (column {column!r}): {self.reason}"


def _is_undecodable(text: str) -> bool:
    # U+FFFD is what a lossy decoder leaves for bytes it could not read; lone surrogates, what
    # `surrogateescape` leaves. Neither is text a model should learn.
    return "\ufffd" in text or any("\ud800" <= ch <= "\udfff" for ch in text)


def check_columns(cfg: DataConfig, column_names: list[str], key: str = "data.source") -> None:
    missing = [cfg.columns[f] for f in REQUIRED if cfg.columns[f] not in column_names]
    if missing:
        raise DataError(
            f"{key}: {cfg.source}: missing column(s) {missing}; it has {column_names} (map yours with data.columns)"
        )


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


def prepare_row(raw: dict, cfg: DataConfig) -> tuple[dict | None, str | None, list[str]]:
    """(cleaned row, None, rules that changed it), or (None, why it is dropped, rules)."""
    row, problem = check_row(raw, cfg)
    if problem:
        return None, f"{problem.field}: {problem.reason.split(' (')[0]}", []
    row, rules = clean_row(row, cfg)
    if not row["input"] or not row["output"]:
        return None, "empty after cleaning", rules
    return row, None, rules


def in_batches(dataset, indices: list[int], size: int = 1024):
    """(index, row) for `indices`, read a batch at a time from a memory-mapped dataset."""
    for start in range(0, len(indices), size):
        chunk = indices[start : start + size]
        yield from zip(chunk, dataset.select(chunk).to_list(), strict=True)


def validate_all(cfg: DataConfig, dataset, key: str = "data.source") -> None:
    """Strict mode: the first invalid row of the whole source is an error naming row and field."""
    for index, raw in in_batches(dataset, list(range(len(dataset))), 4096):
        _, problem = check_row(raw, cfg)
        if problem:
            raise DataError(problem.describe(cfg.source, index + 1, cfg.columns[problem.field], key))
