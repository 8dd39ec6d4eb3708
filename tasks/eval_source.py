"""Step `eval-source`: read the optional extra eval rows (`evaluate.source`) before training.

Reads params sections `evaluate` (source) and `data` (columns, strict, max_chars, cleaning rules).
Input: the source (same formats as `data.source`) and the processed train split (to count overlap).
Outputs in `runs/eval-sources/<content hash>/`: `rows.jsonl` (valid, cleaned, distinct rows) and
`report.json` (read, dropped, changed, overlap with the training rows). Runs before training so a
bad file fails in seconds, not after hours on a GPU.
"""

from __future__ import annotations

from pathlib import Path

from chat_doctor.config import Config, DataConfig
from chat_doctor.core.files import read_jsonl, write_json, write_jsonl
from chat_doctor.core.logs import get_logger
from chat_doctor.core.records import EvalRows, Processed
from chat_doctor.data.rows import clean_rows
from chat_doctor.data.sources import DataError, open_source, source_fingerprint
from chat_doctor.orchestration.steps import step

logger = get_logger(__name__)
KEY = "evaluate.source"


def _source_config(cfg: Config) -> DataConfig:
    """data.* rules (columns, strict, max_chars, cleaning) applied to the eval source."""
    return cfg.data.model_copy(update={"source": cfg.evaluate.source, "revision": None})


def clean_eval_rows(cfg: Config, dataset, train_inputs: set[str]) -> tuple[list[dict], dict]:
    """Valid, cleaned, distinct rows of `dataset` (the same rules as the training rows) and what
    happened to the others."""
    data_cfg = _source_config(cfg)
    cleaned = clean_rows(data_cfg, dataset, list(range(len(dataset))), key=KEY)
    rows = cleaned.rows
    if not rows:
        raise DataError(f"{KEY}: {data_cfg.source}: no usable rows (dropped {dict(cleaned.dropped)})")
    report = {
        "source": data_cfg.source,
        "fingerprint": source_fingerprint(data_cfg, dataset),
        **cleaned.counts(),
        # Rows the model also trained on make the figures look better than they are.
        "overlap_with_train": sum(row["input"] in train_inputs for row in rows),
    }
    return rows, report


def run_eval_source(cfg: Config, processed_train: Path) -> EvalRows | None:
    """Write the cleaned eval-source rows; None when `evaluate.source` is not set."""
    if not cfg.evaluate.source:
        return None
    dataset = open_source(_source_config(cfg), key=KEY)
    train_inputs = {row["input"] for row in read_jsonl(processed_train)}
    rows, report = clean_eval_rows(cfg, dataset, train_inputs)
    out = Path(cfg.runs_dir) / "eval-sources" / report["fingerprint"].split(":")[-1][:16]
    written = EvalRows(rows=out / "rows.jsonl", report=out / "report.json")
    write_jsonl(written.rows, rows)
    write_json(written.report, report)
    if report["overlap_with_train"]:
        logger.warning("%s: %d of %d rows are also in the training split", KEY, report["overlap_with_train"], len(rows))
    return written


@step("eval-source")
def eval_source(cfg: Config, processed: Processed) -> EvalRows | None:
    """Read and clean `evaluate.source` before training, so a bad file fails in seconds."""
    return run_eval_source(cfg, processed.train)
