"""Row checks and cleaning, one path for training rows (`data.source`) and extra eval rows
(`evaluate.source`): what makes a row invalid, what the rules change, which rows are duplicates."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from chat_doctor.data.cleaning import looks_cut_off, near_duplicate_key, normalise, remove_artefacts
from chat_doctor.config import Column, DataConfig
from chat_doctor.data.sources import DataError

REQUIRED: tuple[Column, ...] = ("input", "output")  # the patient's query and the doctor's answer


@dataclass(frozen=True)
class Problem:
    field: Column
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
    checked, problem = check_row(raw, cfg)
    if checked is None:
        assert problem is not None
        return None, f"{problem.field}: {problem.reason.split(' (')[0]}", []
    row, rules = clean_row(checked, cfg)
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


@dataclass
class Cleaned:
    """The rows kept by `clean_rows` and what happened to the others."""

    rows: list[dict] = dataclasses.field(default_factory=list)
    read: int = 0
    dropped: Counter = dataclasses.field(default_factory=Counter)
    changed: Counter = dataclasses.field(default_factory=Counter)
    cut_off: int = 0  # answers that stop mid-sentence, kept or (with data.drop_cut_off) dropped

    def counts(self) -> dict:
        return {
            "rows_read": self.read,
            "rows_kept": len(self.rows),
            "dropped": dict(sorted(self.dropped.items())),
            "changed": dict(sorted(self.changed.items())),
            "answers_cut_off": self.cut_off,
        }


def clean_rows(cfg: DataConfig, dataset, order: list[int], limit: int | None = None, key: str = "data.source"):
    """Walk `dataset` in `order` until `limit` valid, cleaned, distinct rows are kept (all rows when
    None), by the data.* rules; each drop and change is counted."""
    check_columns(cfg, dataset.column_names, key)
    if cfg.strict:
        validate_all(cfg, dataset, key)
    out, seen_exact, seen_near = Cleaned(), set(), set()
    for _, raw in in_batches(dataset, order):
        if len(out.rows) == limit:
            break
        out.read += 1
        row, drop, rules = prepare_row(raw, cfg)
        out.changed.update(rules)
        if row is None:
            out.dropped[drop] += 1
            continue
        if looks_cut_off(row["output"]):
            out.cut_off += 1
            if cfg.drop_cut_off:
                out.dropped["answer cut off mid-sentence"] += 1
                continue
        exact, near = (row["input"], row["output"]), near_duplicate_key(row["input"], row["output"])
        if cfg.dedupe and (exact in seen_exact or near in seen_near):
            out.dropped["duplicate (exact)" if exact in seen_exact else "duplicate (near-exact)"] += 1
            continue
        seen_exact.add(exact)
        seen_near.add(near)
        out.rows.append(row)
    return out
