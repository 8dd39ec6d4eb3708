"""Step `evaluate`: base vs tuned (and the current champion) on the same rows, as one report.

Reads params sections `model`, `tokenize` (template) and `evaluate`. Inputs: the tokenized and
processed eval split, the cleaned `evaluate.source` rows when given, the run folder's merged model
(or its adapter, with `evaluate.load_in_4bit`), and the champion's registry record. For each eval
set and model: loss and perplexity over the answer tokens training used; batched greedy generation
(left padding, KV cache, the original settings) scored with ROUGE-L, MiniLM similarity, EOS rate,
repeated 3-gram rate and length (chat_doctor/evaluation/scoring.py). Outputs in the run folder's
`eval/<MLflow run id>/` (each flow run its own: its champion may differ): `report.json`,
`samples.jsonl` (per-row answers and scores), `summary.md`, `chart.png`; the same figures as MLflow
metrics and artifacts. The flow evaluates and registers in the registry's turn
(chat_doctor/tracking/registry.py registry_turn), so the champion cannot change in between.

The champion is scored again on these rows unless its registered figures came from the same rows
and settings (same `eval_key`), so promotion always compares like with like.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact

from chat_doctor.config import Config
from chat_doctor.core.files import content_hash, read_jsonl, write_json, write_jsonl, write_text
from chat_doctor.core.records import EvalRows, Evaluated, Merged, Processed, Tokenized
from chat_doctor.data.tokenized import load_split, tokenize_row
from chat_doctor.evaluation.metrics import METRICS
from chat_doctor.evaluation.report import markdown_summary, plot_chart
from chat_doctor.evaluation.scoring import score_model
from chat_doctor.models.loading import base_location, load_adapter, load_base_model, load_merged, load_tokenizer
from chat_doctor.orchestration.steps import step
from chat_doctor.tracking.mlflow_runs import log_artifact, log_metrics, log_table
from chat_doctor.tracking.registry import champion_record, download_adapter


def _eval_sets(cfg: Config, tokenizer, tokenized_eval: Path, processed_eval: Path, source: EvalRows | None) -> dict:
    """{name: {"path", "rows", "dataset"}}: the eval split, and the extra source tokenized like it."""
    import datasets

    sets = {"eval_split": {"path": processed_eval, "rows": read_jsonl(processed_eval)}}
    sets["eval_split"]["dataset"] = load_split(tokenized_eval)
    if source:
        rows = read_jsonl(source.rows)
        encoded = [tokenize_row(tokenizer, cfg.tokenize, row) for row in rows]
        kept = [(ids, labels) for ids, labels, status in encoded if status != "dropped"]
        columns = {"input_ids": [ids for ids, _ in kept], "labels": [labels for _, labels in kept]}
        sets["source"] = {"path": source.rows, "rows": rows, "dataset": datasets.Dataset.from_dict(columns)}
    return sets


def eval_key(cfg: Config, rows_file: Path) -> str:
    """Identifies the rows and settings figures come from; equal keys = comparable figures."""
    settings = cfg.evaluate.model_dump(exclude={"batch_size", "source"})
    parts = [cfg.model.base, cfg.model.revision, cfg.tokenize.model_dump(), settings, content_hash(rows_file)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _comparable(cfg: Config, key: str, champion: dict) -> str | None:
    """Why the champion needs no scoring here, or None when it must be scored on these rows."""
    if champion.get("eval_key") == key:
        return "registered (same rows and settings)"
    if (champion.get("base_model"), champion.get("base_revision")) != (cfg.model.base, str(cfg.model.revision)):
        return f"not comparable: trained on base {champion.get('base_model')!r}"
    return None


def _champion(cfg: Config, base, tokenizer, sets: dict, key: str, champion: dict) -> tuple[dict | None, str]:
    """(champion's scores on these sets, or None when there is nothing to score; where its figures
    come from). Merges the champion's adapter into `base`."""
    comparable = _comparable(cfg, key, champion)
    if comparable is not None:
        return None, comparable
    with tempfile.TemporaryDirectory() as tmp:
        adapter = download_adapter(cfg.registry.model_name, champion["version"], Path(tmp))
        merged = load_adapter(base, adapter).merge_and_unload()
    return score_model(merged, tokenizer, sets, cfg, "champion"), "scored again on these rows"


def _score_full(cfg: Config, tokenizer, sets: dict, key: str, merged: Merged, champion: dict | None):
    """Base, tuned (the merged model) and champion in full precision: what an export would serve."""
    scores = {}
    base = load_base_model(cfg.model, quantized=False, dtype_name=cfg.merge.dtype)
    scores["base"] = score_model(base, tokenizer, sets, cfg, "base")
    champion_scores, champion_figures = None, None
    if champion:
        champion_scores, champion_figures = _champion(cfg, base, tokenizer, sets, key, champion)  # reuses the base
    del base
    tuned = load_merged(merged.run.merged, cfg.merge.dtype)
    scores["tuned"] = score_model(tuned, tokenizer, sets, cfg, "tuned")
    return scores, champion_scores, champion_figures


def _score_4bit(cfg: Config, tokenizer, sets: dict, key: str, merged: Merged, champion: dict | None):
    """Base, tuned and champion as QLoRA serves them: one 4-bit base, the adapters switched on it."""
    model = load_adapter(load_base_model(cfg.model, quantized=True), merged.run.adapter)
    model.eval()
    with model.disable_adapter():
        scores = {"base": score_model(model, tokenizer, sets, cfg, "base")}
    scores["tuned"] = score_model(model, tokenizer, sets, cfg, "tuned")
    if not champion:
        return scores, None, None
    if (comparable := _comparable(cfg, key, champion)) is not None:
        return scores, None, comparable
    with tempfile.TemporaryDirectory() as tmp:
        load_adapter(model, download_adapter(cfg.registry.model_name, champion["version"], Path(tmp)), "champion")
    return scores, score_model(model, tokenizer, sets, cfg, "champion"), "scored again on these rows"


def run_evaluate(
    cfg: Config,
    tokenized: Tokenized,
    processed: Processed,
    merged: Merged,
    eval_source: EvalRows | None,
    champion: dict | None,
    out: Path,
) -> Evaluated:
    """Score base, tuned (and champion) and write the report files into `out`."""
    tokenizer = load_tokenizer(cfg.model, str(merged.run.merged))
    sets = _eval_sets(cfg, tokenizer, tokenized.eval, processed.eval, eval_source)
    gate = "source" if eval_source else "eval_split"
    key = eval_key(cfg, sets[gate]["path"])
    score_models = _score_4bit if cfg.evaluate.load_in_4bit else _score_full
    scores, champion_scores, champion_figures = score_models(cfg, tokenizer, sets, key, merged, champion)
    if champion_scores:
        scores["champion"] = champion_scores
    report: dict[str, Any] = {
        "base_model": base_location(cfg.model),
        "gate_set": gate,
        "eval_key": key,
        "generation": cfg.evaluate.model_dump(include={"max_new_tokens", "repetition_penalty", "rows"}),
        "champion": {"version": champion["version"], "figures": champion_figures} if champion else None,
        "sets": {
            name: {
                "rows": len(eval_set["dataset"]),
                "generated": min(cfg.evaluate.rows, len(eval_set["rows"])),
                "source": str(eval_set["path"]),
                "models": {model: scores[model][name]["figures"] for model in scores},
            }
            for name, eval_set in sets.items()
        },
    }
    if eval_source:
        report["sets"]["source"]["cleaning"] = json.loads(eval_source.report.read_text())
    if champion and champion.get("eval_key") == key:  # its registered figures come from these very rows
        report["sets"][gate]["models"]["champion"] = champion["figures"]
    samples = [
        {"set": name, "query": row["input"], "reference": row["output"]}
        | {model: scores[model][name]["answers"][i] for model in scores}
        for name, eval_set in sets.items()
        for i, row in enumerate(eval_set["rows"][: cfg.evaluate.rows])
    ]
    files = Evaluated(
        report=out / "report.json", samples=out / "samples.jsonl", summary=out / "summary.md", chart=out / "chart.png"
    )
    write_jsonl(files.samples, samples)
    write_text(files.summary, markdown_summary(report, samples))
    plot_chart(report, files.chart)
    write_json(files.report, report)  # last: its presence means the evaluation is complete
    return files


PER_ANSWER = [name for name, m in METRICS.items() if m.per_answer]  # per-row columns of the MLflow table


def log_evaluation(mlflow_run_id: str, files: Evaluated) -> None:
    """Figures as MLflow metrics (`eval/` for the eval split, `eval_source/` for the extra rows), the
    files as artifacts, and the per-row answers as an MLflow table."""
    report = json.loads(files.report.read_text())
    for name, result in report["sets"].items():
        prefix = "eval" if name == "eval_split" else "eval_source"
        figures = {f"{prefix}/{model}_{k}": v for model, fig in result["models"].items() for k, v in fig.items()}
        log_metrics(mlflow_run_id, figures)
    for path in (files.report, files.samples, files.summary, files.chart):
        log_artifact(mlflow_run_id, str(path), "eval")
    rows = [
        {"set": r["set"], "query": r["query"], "reference": r["reference"]}
        | {f"{m}_{k}": r[m][k] for m in ("base", "tuned") for k in ("answer", "stopped", *PER_ANSWER)}
        for r in read_jsonl(files.samples)
    ]
    log_table(mlflow_run_id, rows, "eval/answers.json")


@step("evaluate")
def evaluate(
    cfg: Config, tokenized: Tokenized, processed: Processed, merged: Merged, source: EvalRows | None, run_id: str
) -> Evaluated:
    champion = champion_record(cfg.registry.model_name, cfg.registry.champion_alias)
    files = run_evaluate(cfg, tokenized, processed, merged, source, champion, merged.run.evaluation(run_id))
    log_evaluation(run_id, files)
    create_markdown_artifact(
        key="eval-report",
        markdown=files.summary.read_text(),
        description="Base vs tuned (and champion): loss, ROUGE-L, similarity, EOS rate, repetition, length",
    )
    return files
