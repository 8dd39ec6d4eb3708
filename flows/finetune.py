"""The `finetune` flow: prepare-config -> start-tracking -> sample -> tokenize -> eval-source ->
version-data -> train -> merge -> evaluate -> register (-> export).

Run locally:        python -m flows.finetune [data.source=PATH train.max_steps=20 ...]
Through Prefect:    prefect deployment run finetune/default --param overrides='{"train.max_steps": 20}'

Each step is a Prefect task in tasks/<step>.py (retries, cache policy, artifacts) over a plain
function; they hand each other typed records of paths and ids (chat_doctor/core/records.py), never
models or datasets, stored as JSON. The data steps are cached on the content of their inputs and
their config section, so a retry or a rerun with the same inputs skips them; within one flow run the
later steps are cached too, so `prefect flow-run retry` redoes only what failed; a new run with the
same settings resumes training from its last checkpoint.
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow

from chat_doctor.config import cli_overrides
from chat_doctor.core.layout import PARAMS_FILE
from chat_doctor.core.records import Registered
from chat_doctor.orchestration.prefect_api import api_url_for_this_run
from chat_doctor.tracking.lineage import data_overrides
from tasks.eval_source import eval_source
from tasks.evaluate import evaluate
from tasks.export import export
from tasks.merge import merge
from tasks.prepare import prepare_config
from tasks.register import register
from tasks.sample import sample
from tasks.start_tracking import fail_tracking, start_tracking
from tasks.tokenize import tokenize
from tasks.train import train
from tasks.version_data import version_data


@flow(name="finetune", log_prints=True, on_failure=[fail_tracking], on_crashed=[fail_tracking])
def finetune(overrides: dict[str, Any] | None = None, params_file: str = PARAMS_FILE) -> Registered:
    """Fine-tune the base on the sampled data and register the adapter. `overrides`: dotted keys."""
    cfg = prepare_config(params_file, overrides or {})
    run_id = start_tracking(cfg)
    processed = sample(cfg.data)
    tokenized = tokenize(cfg.tokenize, cfg.model, processed)
    source = eval_source(cfg, processed)  # before anything is pushed: a bad eval file fails first
    data = version_data(run_id, processed, tokenized, params_file, data_overrides(overrides))
    trained = train(cfg, tokenized, run_id)
    merged = merge(cfg, trained, data)
    evaluated = evaluate(cfg, tokenized, processed, merged, source, run_id)
    registered = register(cfg, run_id, merged, evaluated, data)
    if cfg.export.gguf:
        export(cfg)
    return registered


def main(argv: list[str] | None = None) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    overrides = cli_overrides(sys.argv[1:] if argv is None else argv)
    url = api_url_for_this_run()
    with temporary_settings(updates={PREFECT_API_URL: url} if url else {}):
        print(finetune(overrides=overrides).model_dump(mode="json"))


if __name__ == "__main__":
    main()
