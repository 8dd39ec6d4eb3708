"""The `sweep` flow: a grid of fine-tunes fanned out over the work pool's GPU machines, one comparison.

Command line:    python -m flows.sweep 'grid={"lora.r": [8, 16], "train.learning_rate": [1e-4, 2e-4]}' \
                     train.max_steps=20
Through Prefect: prefect deployment run sweep/default --param grid='{"lora.r": [8, 16]}' --param overrides='{...}'

plan-sweep checks the whole grid before anything starts. The data of each distinct data setting is
made once here (share-data) and every trial takes it (`data_from`); each trial is a `finetune` flow
run of `finetune/<sweep.deployment>`, so trials spread over the pool's workers and wait when every
GPU is busy, and registers its version under the registry's lock like any run. A trial whose
settings and code finished before is taken from the registry instead of trained again. MLflow: one
parent run, every trial its child. Cancelling the sweep cancels its trials.
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from chat_doctor.config import ConfigError, cli_overrides, load_config
from chat_doctor.core.layout import PARAMS_FILE
from chat_doctor.orchestration.prefect_api import api_url_for_this_run
from chat_doctor.orchestration.sweeps import cancel_trials
from tasks.data import share_data
from tasks.sweep import compare, find_finished, plan, start, start_sweep_tracking, wait


def _cancel_trials(flow, flow_run, state) -> None:  # on_cancellation / on_crashed: Prefect passes these
    cancel_trials(str(flow_run.id))


@flow(name="sweep", on_cancellation=[_cancel_trials], on_crashed=[_cancel_trials])
def sweep(grid: dict[str, list[Any]], overrides: dict[str, Any] | None = None) -> str:
    """One finetune flow run per point of `grid` ({dotted key: [values]}), each with `overrides` too;
    returns the comparison's summary (which version won, by how much)."""
    overrides = overrides or {}
    trials = plan(grid, overrides)
    cfg = load_config(PARAMS_FILE, overrides)
    name, sweep_run_id = str(flow_run.name), str(flow_run.id)
    parent = start_sweep_tracking(cfg, trials, name, sweep_run_id)
    finished = find_finished(cfg, trials)  # same settings and code: taken from the registry
    to_run = [t for t in trials.trials if t.number not in finished]
    made = {}  # each data setting made once, here; every trial of it takes it
    for n in sorted({t.data_group for t in to_run}):
        group = trials.data_groups[n]
        made[n] = share_data(
            load_config(PARAMS_FILE, group).data, group, f"{name}-{sweep_run_id[:8]}-data{n}"
        ).experiment
    started = [
        {"trial": t.number, "reused": finished[t.number]}
        if t.number in finished
        else start(cfg, t, parent, sweep_run_id, made[t.data_group])
        for t in trials.trials
    ]
    rows = wait(cfg, trials, started)
    return compare(cfg, trials, rows, parent)


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.sweep 'grid={...}' [KEY=VALUE ...]`: the grid as JSON, the rest as overrides."""
    import yaml
    from prefect.settings import PREFECT_API_URL, temporary_settings

    args = sys.argv[1:] if argv is None else argv
    grids = [a.removeprefix("grid=") for a in args if a.startswith("grid=")]
    if len(grids) != 1:
        raise SystemExit("usage: python -m flows.sweep 'grid={\"lora.r\": [8, 16]}' [KEY=VALUE ...]")
    try:
        grid = yaml.safe_load(grids[0])
        overrides = cli_overrides([a for a in args if not a.startswith("grid=")])
    except (yaml.YAMLError, ConfigError) as err:
        raise SystemExit(f"sweep: {err}") from None
    url = api_url_for_this_run()
    with temporary_settings(updates={PREFECT_API_URL: url} if url else {}):
        print(sweep(grid=grid, overrides=overrides))


if __name__ == "__main__":
    main()
