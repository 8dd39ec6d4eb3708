"""Step `sample`: draw N rows from the source and split them into train and eval.

Reads params section `data`. Input: a hub dataset id (with revision and split), or a local
.json/.jsonl/.csv/.parquet file or `save_to_disk` folder. Outputs in `data/processed/`:
`train.jsonl`, `eval.jsonl` (one row per line, keys instruction/input/output) and `report.json`
(counts and the source's content fingerprint). Same source + same config = byte-identical files.
Run alone with `python -m tasks.sample` (what `dvc repro` does).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from chat_doctor.config import PROCESSED_DIR, DataConfig, load_config
from chat_doctor.files import content_hash, write_json, write_jsonl

FIELDS = ("instruction", "input", "output")
REQUIRED = ("input", "output")  # the patient's query and the doctor's answer
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """The source cannot give what the config asks; the message names the file, row or key."""


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith(("/", ".", "~"))


def open_source(cfg: DataConfig):
    """The source as a memory-mapped `datasets.Dataset` (no copy of the rows held in RAM)."""
    import datasets

    source = Path(cfg.source).expanduser()
    if not _is_local(cfg.source):
        return datasets.load_dataset(cfg.source, revision=cfg.revision, split=cfg.split)
    if not source.exists():
        raise DataError(f"data.source: {cfg.source!r} does not exist")
    if source.is_dir():
        try:
            loaded = datasets.load_from_disk(str(source))
        except FileNotFoundError as err:
            raise DataError(f"data.source: {cfg.source!r} is not a save_to_disk folder ({err})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.split not in loaded:
                raise DataError(f"data.split: {cfg.split!r} not in {cfg.source} (has {sorted(loaded)})")
            loaded = loaded[cfg.split]
        return loaded
    builder = LOCAL_BUILDERS.get(source.suffix.lower())
    if builder is None:
        raise DataError(f"data.source: {cfg.source!r}: unsupported file type, use one of {sorted(LOCAL_BUILDERS)}")
    try:
        return datasets.load_dataset(builder, data_files=str(source), split="train")
    except Exception as err:  # the loaders raise many types; the message is what the user needs
        raise DataError(f"data.source: {cfg.source}: cannot be read as {builder}: {err}") from None


def source_fingerprint(cfg: DataConfig, dataset) -> str:
    if _is_local(cfg.source):
        return "sha256:" + content_hash(Path(cfg.source).expanduser())
    return f"hub:{cfg.source}@{cfg.revision or 'main'}:{dataset._fingerprint}"


def _clean_row(row: dict) -> tuple[dict | None, str | None]:
    """The row with stripped text, or None and the reason it is dropped."""
    out = {}
    for field in FIELDS:
        value = row.get(field, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            return None, f"non-string {field}"
        out[field] = value.strip()
    for field in REQUIRED:
        if not out[field]:
            return None, f"empty {field}"
    return out, None


def sample_rows(cfg: DataConfig, dataset) -> tuple[list[dict], list[dict], dict]:
    """Seeded sample of `cfg.rows` valid rows, split into (train, eval, counts)."""
    missing = [f for f in REQUIRED if f not in dataset.column_names]
    if missing:
        raise DataError(f"data.source: {cfg.source}: missing column(s) {missing}; has {dataset.column_names}")
    if cfg.rows > len(dataset):
        raise DataError(f"data.rows = {cfg.rows} is larger than the source ({len(dataset)} rows in {cfg.source})")
    order = np.random.default_rng(cfg.seed).permutation(len(dataset))
    kept, dropped = [], {}
    # Walk the shuffled order until N valid rows are found; invalid rows are counted, not fatal.
    for start in range(0, len(order), 1024):
        chunk = [int(i) for i in order[start : start + 1024]]
        batch = dataset.select(chunk).to_list()
        for row in batch:
            clean, reason = _clean_row(row)
            if clean is None:
                dropped[reason] = dropped.get(reason, 0) + 1
            else:
                kept.append(clean)
            if len(kept) == cfg.rows:
                break
        if len(kept) == cfg.rows:
            break
    if len(kept) < cfg.rows:
        raise DataError(f"data.rows = {cfg.rows}: only {len(kept)} valid rows in {cfg.source} (dropped {dropped})")
    n_eval = max(1, round(cfg.rows * cfg.eval_fraction))
    if n_eval >= cfg.rows:
        raise DataError(f"data.eval_fraction = {cfg.eval_fraction} leaves no training rows out of {cfg.rows}")
    counts = {"source_rows": len(dataset), "dropped": dropped, "train_rows": cfg.rows - n_eval, "eval_rows": n_eval}
    return kept[n_eval:], kept[:n_eval], counts


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
