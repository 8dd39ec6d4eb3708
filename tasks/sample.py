"""Step `sample`: draw N rows from the source and split them into train and eval.

Reads params section `data`. Input: a hub dataset id (with revision and split), or a local
.json/.jsonl/.csv/.parquet file or `save_to_disk` folder. Outputs in `data/processed/`:
`train.jsonl`, `eval.jsonl` (one row per line, keys instruction/input/output) and `report.json`
(counts and the source's content fingerprint). Same source + same config = byte-identical files.
This is dvc.yaml's `sample` stage (`python -m tasks.sample`): the flow's `data` step runs it in the
run's DVC experiment (tasks/data.py), `dvc repro` in the workspace.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from chat_doctor.config import DataConfig, load_config
from chat_doctor.core.files import write_json, write_jsonl
from chat_doctor.core.layout import PROCESSED_DIR
from chat_doctor.core.records import Processed
from chat_doctor.data.rows import REQUIRED, clean_rows
from chat_doctor.data.sources import DataError, open_source, source_fingerprint


def _length_stats(rows: list[dict], field: str) -> dict:
    lengths = np.array([len(row[field]) for row in rows])
    return {"min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max())}


def sample_rows(cfg: DataConfig, dataset) -> tuple[list[dict], list[dict], dict]:
    """Seeded sample of `cfg.rows` valid, cleaned, distinct rows, split into (train, eval, report)."""
    if cfg.rows > len(dataset):
        raise DataError(f"data.rows = {cfg.rows} is larger than the source ({len(dataset)} rows in {cfg.source})")
    order = [int(i) for i in np.random.default_rng(cfg.seed).permutation(len(dataset))]
    cleaned = clean_rows(cfg, dataset, order, limit=cfg.rows)
    kept = cleaned.rows
    if len(kept) < cfg.rows:
        raise DataError(
            f"data.rows = {cfg.rows}: only {len(kept)} usable rows in {cfg.source} (dropped {dict(cleaned.dropped)})"
        )
    n_eval = max(1, round(cfg.rows * cfg.eval_fraction))
    if n_eval >= cfg.rows:
        raise DataError(f"data.eval_fraction = {cfg.eval_fraction} leaves no training rows out of {cfg.rows}")
    report = {
        "source_rows": len(dataset),
        **cleaned.counts(),
        "train_rows": cfg.rows - n_eval,
        "eval_rows": n_eval,
        "chars": {field: _length_stats(kept, field) for field in REQUIRED},
    }
    return kept[n_eval:], kept[:n_eval], report


def run_sample(cfg: DataConfig, out_dir: Path = PROCESSED_DIR) -> Processed:
    """Write train.jsonl, eval.jsonl and report.json to `out_dir`."""
    dataset = open_source(cfg)
    train, evaluation, counts = sample_rows(cfg, dataset)
    out = Processed.at(out_dir)
    write_jsonl(out.train, train)
    write_jsonl(out.eval, evaluation)
    write_json(out.report, {**counts, "source": cfg.source, "fingerprint": source_fingerprint(cfg, dataset)})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample and split the data (params section `data`).")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.rows=100")
    args = parser.parse_args(argv)
    print(run_sample(load_config(overrides=args.overrides).data))


if __name__ == "__main__":
    main()
