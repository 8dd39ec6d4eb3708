"""Step `sample`: draw N rows from the source and split them into train and eval.

Reads params section `data`. Input: a hub dataset id (with revision and split), or a local
.json/.jsonl/.csv/.parquet file or `save_to_disk` folder. Outputs in `data/processed/`:
`train.jsonl`, `eval.jsonl` (one row per line, keys instruction/input/output) and `report.json`
(counts and the source's content fingerprint). Same source + same config = byte-identical files.
Run alone with `python -m tasks.sample` (what `dvc repro` does).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from chat_doctor.cleaning import looks_cut_off, near_duplicate_key
from chat_doctor.config import PROCESSED_DIR, DataConfig, load_config
from chat_doctor.files import write_json, write_jsonl
from chat_doctor.rows import REQUIRED, check_columns, in_batches, prepare_row, validate_all
from chat_doctor.sources import DataError, open_source, source_fingerprint


def _length_stats(rows: list[dict], field: str) -> dict:
    lengths = np.array([len(row[field]) for row in rows])
    return {"min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max())}


def sample_rows(cfg: DataConfig, dataset) -> tuple[list[dict], list[dict], dict]:
    """Seeded sample of `cfg.rows` valid, cleaned, distinct rows, split into (train, eval, report)."""
    check_columns(cfg, dataset.column_names)
    if cfg.rows > len(dataset):
        raise DataError(f"data.rows = {cfg.rows} is larger than the source ({len(dataset)} rows in {cfg.source})")
    if cfg.strict:
        validate_all(cfg, dataset)
    order = [int(i) for i in np.random.default_rng(cfg.seed).permutation(len(dataset))]
    kept, seen_exact, seen_near = [], set(), set()
    read, dropped, changed, cut_off = 0, Counter(), Counter(), 0
    # Walk the shuffled source until N good rows are kept; each drop and change is counted.
    for _, raw in in_batches(dataset, order):
        if len(kept) == cfg.rows:
            break
        read += 1
        row, drop, rules = prepare_row(raw, cfg)
        changed.update(rules)
        if drop:
            dropped[drop] += 1
            continue
        if looks_cut_off(row["output"]):
            cut_off += 1
            if cfg.drop_cut_off:
                dropped["answer cut off mid-sentence"] += 1
                continue
        exact, near = (row["input"], row["output"]), near_duplicate_key(row["input"], row["output"])
        if cfg.dedupe and (exact in seen_exact or near in seen_near):
            dropped["duplicate (exact)" if exact in seen_exact else "duplicate (near-exact)"] += 1
            continue
        seen_exact.add(exact)
        seen_near.add(near)
        kept.append(row)
    if len(kept) < cfg.rows:
        raise DataError(
            f"data.rows = {cfg.rows}: only {len(kept)} usable rows in {cfg.source} (dropped {dict(dropped)})"
        )
    n_eval = max(1, round(cfg.rows * cfg.eval_fraction))
    if n_eval >= cfg.rows:
        raise DataError(f"data.eval_fraction = {cfg.eval_fraction} leaves no training rows out of {cfg.rows}")
    report = {
        "source_rows": len(dataset),
        "rows_read": read,
        "rows_kept": len(kept),
        "dropped": dict(sorted(dropped.items())),
        "changed": dict(sorted(changed.items())),
        "answers_cut_off": cut_off,
        "train_rows": cfg.rows - n_eval,
        "eval_rows": n_eval,
        "chars": {field: _length_stats(kept, field) for field in REQUIRED},
    }
    return kept[n_eval:], kept[:n_eval], report


def run_sample(cfg: DataConfig, out_dir: Path = PROCESSED_DIR) -> dict[str, str]:
    """Write train.jsonl, eval.jsonl and report.json to `out_dir`; return their paths."""
    dataset = open_source(cfg)
    train, evaluation, counts = sample_rows(cfg, dataset)
    out_dir = Path(out_dir)
    paths = {"train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl", "report": out_dir / "report.json"}
    write_jsonl(paths["train"], train)
    write_jsonl(paths["eval"], evaluation)
    write_json(paths["report"], {**counts, "source": cfg.source, "fingerprint": source_fingerprint(cfg, dataset)})
    return {name: str(path) for name, path in paths.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample and split the data (params section `data`).")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.rows=100")
    args = parser.parse_args(argv)
    print(run_sample(load_config(overrides=args.overrides).data))


if __name__ == "__main__":
    main()
