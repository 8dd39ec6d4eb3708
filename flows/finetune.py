"""The `finetune` flow: prepare-config -> start-tracking -> data -> eval-source -> version-data ->
train -> merge -> (the registry's turn: evaluate -> register) (-> export).

Run locally:        python -m flows.finetune [data.source=PATH train.max_steps=20 ...]
Through Prefect:    prefect deployment run finetune/default --param overrides='{"train.max_steps": 20}'

Each step is a Prefect task in tasks/<step>.py (retries, cache policy, artifacts) over a plain
function; they hand each other typed records of paths and ids (chat_doctor/core/records.py), never
models or datasets, stored as JSON. Runs at once never share a file they write: the data is the
run's own DVC experiment, read into folders named by their content, so runs with the same data share
it (DVC's run cache) and a code change makes it again; training and merging of the same settings
take turns in their run folder; evaluate and register take turns at the registry. Within one flow
run `prefect flow-run retry` redoes only what failed; a new run with the same settings resumes
training from its last checkpoint. params.yaml and dvc.lock in the workspace are never written.
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow

from chat_doctor.config import cli_overrides
from chat_doctor.core.records import Registered
from chat_doctor.orchestration.prefect_api import api_url_for_this_run
from chat_doctor.tracking.registry import registry_turn
from tasks.data import data
from tasks.eval_source import eval_source
from tasks.evaluate import evaluate
from tasks.export import export
from tasks.merge import merge
from tasks.prepare import prepare_config
from tasks.register import register
from tasks.start_tracking import fail_tracking, start_tracking
from tasks.train import train
from tasks.version_data import version_data


@flow(name="finetune", on_failure=[fail_tracking], on_crashed=[fail_tracking])
def finetune(
    overrides: dict[str, Any] | None = None, tags: dict[str, str] | None = None, data_from: str | None = None
) -> Registered:
    """Fine-tune the base on the sampled data and register the adapter. `overrides`: dotted keys.
    `tags`: added to the MLflow run. `data_from`: a DVC experiment made for runs of these data
    settings (a sweep's), taken instead of making the data again."""
    overrides = overrides or {}
    cfg = prepare_config(overrides)
    run_id = start_tracking(cfg, tags)
    made = data(cfg.data, overrides, data_from)
    source = eval_source(cfg, made.processed)  # before anything is pushed: a bad eval file fails first
    version = version_data(run_id, made)
    trained = train(cfg, made.tokenized, run_id, made.experiment)
    merged = merge(cfg, trained, version)
    with registry_turn(cfg.registry.model_name):  # every version is judged against all before it
        evaluated = evaluate(cfg, made.tokenized, made.processed, merged, source, run_id)
        registered = register(cfg, run_id, merged, evaluated, version)
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
