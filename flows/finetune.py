"""The `finetune` flow: sample -> tokenize -> eval-source -> (DVC) -> train -> merge -> evaluate -> register.

Run locally:        python -m flows.finetune [data.source=PATH train.max_steps=20 ...]
Through Prefect:    prefect deployment run finetune/default --param overrides='{"train.max_steps": 20}'

Tasks exchange paths and ids, never models or datasets. The data steps are cached on the content
of their inputs and their config section (not on run ids), so a retry or a rerun with the same
inputs skips them. Within one flow run, the steps after them are cached on their inputs too
(Prefect's default policy, which includes the run id): `prefect flow-run retry` redoes only what
failed. A new run with the same settings resumes training from its last checkpoint. Results are
stored as JSON (paths and ids), not pickled.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run

from chat_doctor import step_cache
from chat_doctor.config import (
    PARAMS_FILE,
    PROCESSED_DIR,
    TOKENIZED_DIR,
    Config,
    cli_overrides,
    flatten,
    load_config,
    section_hash,
)
from chat_doctor.files import content_hash
from chat_doctor.lineage import data_overrides, record_data_stages, write_params
from chat_doctor.prefect_api import api_url_for_this_run
from chat_doctor.preflight import check_before_data
from chat_doctor.registry import champion_record
from chat_doctor.sources import source_identity
from chat_doctor.tracking import (
    end_run,
    fail_runs_of,
    git_commit,
    log_artifact,
    reopen_run,
    run_link,
    run_tags,
    set_tags,
    start_run,
    tracking_uri,
)
from tasks.eval_source import run_eval_source
from tasks.evaluate import log_evaluation, run_evaluate
from tasks.export import run_export
from tasks.merge import run_merge
from tasks.register import run_register
from tasks.sample import run_sample
from tasks.tokenize import run_tokenize
from tasks.train import OutOfMemory, run_train


def _key(*parts: str) -> str:
    # The project folder is part of every key: outputs live there, and another clone has its own.
    return hashlib.sha256("|".join([str(Path.cwd()), *parts]).encode()).hexdigest()


def _sample_key(cfg) -> str:
    return _key("sample", section_hash(cfg), source_identity(cfg))


def _tokenize_key(cfg, model_cfg, processed: dict[str, str]) -> str:
    inputs = [content_hash(Path(processed[s])) for s in ("train", "eval")]
    return _key("tokenize", section_hash(cfg, model_cfg), *inputs)


def _given_key(ctx, params) -> str:
    return params["key"]  # computed once by the caller, which also checks the outputs against it


@task(name="prepare-config")
def prepare_config(params_file: str, overrides: dict[str, Any]) -> Config:
    """Validate params.yaml + overrides, this machine and the base's files (errors name the key)
    before any data step runs."""
    cfg = load_config(params_file, overrides)
    check_before_data(cfg)
    return cfg


@task(name="start-tracking")
def start_tracking(cfg: Config) -> str:
    """The flow run's MLflow run: created once, reopened when Prefect retries the flow run."""
    tags = {"git_commit": git_commit(), "prefect.flow_run_id": str(flow_run.id), "base_model": cfg.model.base}
    run_id = reopen_run(str(flow_run.id)) or start_run(cfg.registry.experiment, str(flow_run.name), flatten(cfg), tags)
    print(f"MLflow run {run_id} at {tracking_uri()}")
    create_link_artifact(
        key="mlflow-run",
        link=run_link(run_id),
        link_text=f"MLflow run {run_id}",
        description="Params, metrics per step and the registered adapter (`make mlflow-ui` serves the local store)",
    )
    return run_id


# What a retry of the same flow run reuses instead of redoing (default cache policy: inputs + run id).
KEEP = {"persist_result": True, "result_serializer": "json"}


@task(name="sample", cache_key_fn=_given_key, **KEEP)
def sample(cfg, key: str) -> dict[str, str]:
    if not Path(cfg.source).expanduser().exists() and not cfg.revision:
        print(
            f"warning: data.source {cfg.source!r} has no data.revision: the cache and DVC cannot see a new "
            "commit of the dataset; pin data.revision for a reproducible run"
        )
    paths = run_sample(cfg)
    step_cache.record("sample", key, PROCESSED_DIR)
    return paths


@task(name="tokenize", cache_key_fn=_given_key, **KEEP)
def tokenize(cfg, model_cfg, processed: dict[str, str], key: str) -> dict[str, str]:
    paths = run_tokenize(cfg, model_cfg, processed)
    step_cache.record("tokenize", key, TOKENIZED_DIR)
    return paths


def _sample_cached(cfg):
    """`sample`, keyed on its inputs and taken from Prefect's cache only while data/processed still
    holds what it made under that key."""
    key = _sample_key(cfg)
    fresh = step_cache.still_holds("sample", key, PROCESSED_DIR)
    return sample.with_options(refresh_cache=not fresh)(cfg, key)


def _tokenize_cached(cfg, model_cfg, processed: dict[str, str]):
    key = _tokenize_key(cfg, model_cfg, processed)
    fresh = step_cache.still_holds("tokenize", key, TOKENIZED_DIR)
    return tokenize.with_options(refresh_cache=not fresh)(cfg, model_cfg, processed, key)


@task(name="version-data", **KEEP)
def version_data(
    run_id: str, processed: dict[str, str], tokenized: dict[str, str], params_file: str, dvc_params: dict[str, Any]
) -> dict[str, str]:
    """dvc commit + push the data; its hashes and reports go to the MLflow run and the Prefect UI."""
    # Data overrides go to params.yaml, as `dvc exp run -S` does, so dvc.lock stays truthful; only
    # now, once the data steps have succeeded, so a bad source never lands in params.yaml.
    changed = write_params(Path(params_file), dvc_params)
    if changed:
        print(f"{params_file} updated for DVC: {', '.join(changed)}")
    tags = {f"dvc.{path}": md5 for path, md5 in record_data_stages().items()}
    set_tags(run_id, tags)
    log_artifact(run_id, processed["report"], "data/processed")
    log_artifact(run_id, tokenized["report"], "data/tokenized")
    create_markdown_artifact(
        key="data-report",
        markdown=_data_summary(json.loads(Path(processed["report"]).read_text()), tags),
        description="What the sample step read, dropped and changed",
    )
    return tags


def _data_summary(report: dict, tags: dict) -> str:
    rows = [("rows read", report["rows_read"]), ("rows kept", report["rows_kept"])]
    rows += [(f"dropped: {reason}", n) for reason, n in report["dropped"].items()]
    rows += [(f"changed: {rule}", n) for rule, n in report["changed"].items()]
    rows += [("answers cut off mid-sentence", report["answers_cut_off"])]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    hashes = "\n".join(f"- `{path}`: `{md5}`" for path, md5 in tags.items())
    return f"## Data: {report['source']}\n\n| | rows |\n|---|---|\n{table}\n\nDVC hashes:\n{hashes}\n"


def _only_out_of_memory(task, task_run, state) -> bool:
    """Retry training only after out-of-memory (the next attempt halves the micro-batch)."""
    return isinstance(state.result(raise_on_failure=False), OutOfMemory)


def _progress_artifact():
    """Updates the `train-progress` artifact (a bar and a line in the Prefect UI) at each logging step."""
    made: dict[str, object] = {}

    def update(p: dict) -> None:
        line = f"step {p['step']}/{p['steps']}: loss {p['loss']}, {p['tokens_per_s']} tokens/s, ETA {p['eta']}"
        done = 100 * p["step"] / p["steps"]
        if "id" in made:
            update_progress_artifact(made["id"], done, description=line)
        else:
            made["id"] = create_progress_artifact(done, key="train-progress", description=line)

    return update


# Retries are bounded by the halvings themselves: run_train stops below micro-batch 1 with what to
# change. On an H100, Mistral-7B shapes at 1,024 tokens needed four (64 -> 4; bench/RESULTS.md).
@task(name="train", retries=8, retry_condition_fn=_only_out_of_memory, **KEEP)
def train(cfg: Config, tokenized: dict[str, str], run_id: str) -> dict[str, str]:
    return run_train(cfg, tokenized, run_id, on_progress=_progress_artifact())


@task(name="eval-source", **KEEP)
def eval_source(cfg: Config, processed: dict[str, str]) -> dict[str, str] | None:
    """Read and clean `evaluate.source` before training, so a bad file fails in seconds."""
    return run_eval_source(cfg, processed["train"])


@task(name="merge", **KEEP)
def merge(cfg: Config, adapter: str, lineage: dict) -> dict:
    return run_merge(cfg, adapter, lineage)


@task(name="evaluate", **KEEP)
def evaluate(cfg: Config, tokenized: dict, processed: dict, merged: dict, source: dict | None, run_id: str) -> dict:
    champion = champion_record(cfg.registry.model_name, cfg.registry.champion_alias)
    paths = run_evaluate(cfg, tokenized["eval"], processed["eval"], merged["merged"], source, champion)
    log_evaluation(run_id, paths)
    create_markdown_artifact(
        key="eval-report",
        markdown=Path(paths["summary"]).read_text(),
        description="Base vs tuned (and champion): loss, ROUGE-L, similarity, EOS rate, repetition, length",
    )
    return paths


@task(name="register")
def register(cfg: Config, run_id: str, trained: dict, merged: dict, report: dict, lineage: dict) -> dict:
    lineage = {
        **lineage,
        "git_commit": run_tags(run_id).get("git_commit", "unknown"),  # as it was when the run started
        "prefect.flow_run_id": str(flow_run.id),
        "config_hash": section_hash(cfg)[:16],
    }
    registered = run_register(cfg, run_id, trained["adapter"], merged["merged"], report["report"], lineage)
    end_run(run_id)
    create_markdown_artifact(
        key="finetune-result",
        markdown=_summary(registered, run_id),
        description="Registered adapter, its aliases and the promotion decision",
    )
    return registered


@task(name="export")
def export(cfg: Config) -> dict:
    return run_export(cfg)


def _summary(registered: dict, run_id: str) -> str:
    aliases = ", ".join(f"`{a}`" for a in registered["aliases"])
    return (
        f"## {registered['name']} v{registered['version']} ({aliases})\n\n{registered['promotion']}\n\n"
        f"Load: `{registered['uri']}`  \nMLflow run: `{run_id}` ({tracking_uri()})\n"
    )


def _mark_mlflow_failed(flow, flow_run, state) -> None:  # Prefect passes these by name
    fail_runs_of(str(flow_run.id))


@flow(name="finetune", log_prints=True, on_failure=[_mark_mlflow_failed], on_crashed=[_mark_mlflow_failed])
def finetune(overrides: dict[str, Any] | None = None, params_file: str = PARAMS_FILE) -> dict:
    """Fine-tune the base on the sampled data and register the adapter. `overrides`: dotted keys."""
    cfg = prepare_config(params_file, overrides or {})
    run_id = start_tracking(cfg)
    processed = _sample_cached(cfg.data)
    tokenized = _tokenize_cached(cfg.tokenize, cfg.model, processed)
    source = eval_source(cfg, processed)  # before anything is pushed: a bad eval file fails first
    lineage = version_data(run_id, processed, tokenized, params_file, data_overrides(overrides))
    trained = train(cfg, tokenized, run_id)
    merged = merge(cfg, trained["adapter"], lineage)
    report = evaluate(cfg, tokenized, processed, merged, source, run_id)
    registered = register(cfg, run_id, trained, merged, report, lineage)
    if cfg.export.gguf:
        export(cfg)
    return registered


def main(argv: list[str] | None = None) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    overrides = cli_overrides(sys.argv[1:] if argv is None else argv)
    url = api_url_for_this_run()
    with temporary_settings(updates={PREFECT_API_URL: url} if url else {}):
        print(finetune(overrides=overrides))


if __name__ == "__main__":
    main()
