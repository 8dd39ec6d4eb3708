"""A sweep's trials: the grid checked and expanded, then one `finetune` flow run per trial on the
work pool, waited for, or cancelled with the sweep.

Everything about the grid is checked before the first trial starts: each key a setting of the
config, each list non-empty and without repeats, every trial's config valid (types and the checks
across keys, naming the key), and no more trials than `sweep.max_trials`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from typing import Any, cast

from pydantic import BaseModel

from chat_doctor.config import Config, ConfigError, is_config_key, load_config
from chat_doctor.core.layout import PARAMS_FILE
from chat_doctor.core.logs import get_logger
from chat_doctor.orchestration.prefect_api import cancel_flow_runs, deployment_exists
from chat_doctor.tracking.lineage import data_overrides

logger = get_logger(__name__)

FINETUNE = "finetune"
TRIAL_KEY_TAG = "sweep.trial_key"  # on a trial's MLflow run: its settings + code, to find it again
SWEEP_TAG_PREFIX = "sweep:"  # on a trial's flow run: which sweep started it (for cancelling)


class Trial(BaseModel):
    number: int  # 1.. in the order of the grid
    point: dict[str, Any]  # the swept keys' values
    overrides: dict[str, Any]  # the sweep's overrides + the point: the trial's whole change to params.yaml
    key: str  # settings + code commit: equal keys = the same training
    data_group: int  # trials with equal data settings share one made-once data experiment


class Plan(BaseModel):
    trials: list[Trial]
    knobs: list[str]  # the swept keys
    data_groups: list[dict[str, Any]]  # the data overrides of each group


def _check_grid(grid: Any, overrides: dict[str, Any]) -> None:
    if not isinstance(grid, dict) or not grid:
        raise ConfigError('sweep: the grid is empty; give keys and lists of values, e.g. {"lora.r": [8, 16]}')
    for key, values in grid.items():
        if not is_config_key(key):
            raise ConfigError(f"sweep grid: unknown key `{key}` (docs/config.md lists the keys)")
        if key.startswith("sweep."):
            raise ConfigError(f"sweep grid: `{key}` configures the sweep itself; set it in the overrides")
        if key in overrides:
            raise ConfigError(f"sweep grid: `{key}` is also in the overrides; give it in one place")
        if not isinstance(values, list):
            raise ConfigError(f"sweep grid: `{key}` = {values!r}: expected a list of values, e.g. [{values!r}]")
        if not values:
            raise ConfigError(f"sweep grid: `{key}` is an empty list")
        repeated = [v for v in values if values.count(v) > 1]
        if repeated:
            raise ConfigError(f"sweep grid: `{key}` lists {repeated[0]!r} more than once")


def _points(grid: dict[str, list[Any]], cfg: Config) -> list[dict[str, Any]]:
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    if cfg.sweep.search == "random":
        random.Random(cfg.sweep.seed).shuffle(combos)
        combos = combos[: cfg.sweep.trials or len(combos)]
    if len(combos) > cfg.sweep.max_trials:
        raise ConfigError(
            f"sweep: {len(combos)} trials, more than sweep.max_trials = {cfg.sweep.max_trials} "
            "(raise it, or use sweep.search: random with sweep.trials)"
        )
    return combos


def trial_key(overrides: dict[str, Any], commit: str) -> str:
    return hashlib.sha256(json.dumps([overrides, commit], sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_sweep(grid: Any, overrides: dict[str, Any], commit: str) -> Plan:
    """The trials of a sweep, or a ConfigError naming what is wrong (before anything starts)."""
    _check_grid(grid, overrides)
    cfg = load_config(PARAMS_FILE, overrides)  # the sweep's own settings, and the overrides checked
    groups: list[dict[str, Any]] = []
    trials = []
    for number, point in enumerate(_points(grid, cfg), start=1):
        trial_overrides = {**overrides, **point}
        try:
            load_config(PARAMS_FILE, trial_overrides)
        except ConfigError as err:
            raise ConfigError(f"sweep trial {number} ({json.dumps(point)}): {err}") from None
        data = data_overrides(trial_overrides)
        if data not in groups:
            groups.append(data)
        key = trial_key(trial_overrides, commit)
        trials.append(
            Trial(number=number, point=point, overrides=trial_overrides, key=key, data_group=groups.index(data))
        )
    return Plan(trials=trials, knobs=list(grid), data_groups=groups)


def check_trial_deployment(deployment: str) -> None:
    """The trials' deployment exists (before any data is made)."""
    name = f"{FINETUNE}/{deployment}"
    if not deployment_exists(name):
        raise ConfigError(
            f"sweep: no deployment {name} to run the trials (`make demo` serves it on this machine; on "
            "the team set-up `prefect deploy --all`), or set sweep.deployment"
        )


def start_trial(deployment: str, parameters: dict[str, Any], sweep_run_id: str) -> str:
    """One `finetune/<deployment>` flow run (a sub-flow of the caller), tagged with the sweep's id."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    name = f"{FINETUNE}/{deployment}"
    run = cast(FlowRun, run_deployment(name, parameters=parameters, timeout=0, tags=[SWEEP_TAG_PREFIX + sweep_run_id]))
    return str(run.id)


def cancel_trials(sweep_run_id: str) -> int:
    """Cancel the trials of a sweep that have not ended; how many."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        tagged = FlowRunFilter(tags=FlowRunFilterTags(all_=[SWEEP_TAG_PREFIX + sweep_run_id]))
        trials = client.read_flow_runs(flow_run_filter=tagged)
    return len(cancel_flow_runs(trials, "the sweep was cancelled"))
