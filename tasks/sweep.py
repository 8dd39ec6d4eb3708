"""Steps of the `sweep` flow: plan the trials, open the sweep's MLflow parent run, start each trial as
a `finetune` flow run on the work pool (or take a finished one with the same settings and code), wait
for them, and compare them.

Reads params section `sweep` (with the sweep's overrides) and `registry` (experiment, model name,
promotion metric). Outputs: the trials' flow runs and registered versions, and the comparison: a
Prefect table and markdown artifact, and in the parent MLflow run comparison.md, comparison.json and
comparison.png.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

from chat_doctor.config import Config, load_config
from chat_doctor.core.layout import PARAMS_FILE
from chat_doctor.core.logs import get_logger
from chat_doctor.orchestration.prefect_api import wait_for_flow_runs
from chat_doctor.orchestration.steps import step
from chat_doctor.orchestration.sweeps import (
    TRIAL_KEY_TAG,
    Plan,
    Trial,
    check_trial_deployment,
    plan_sweep,
    start_trial,
)
from chat_doctor.tracking.mlflow_runs import end_run, git_commit, log_artifact, run_of_flow_run, tracking_uri
from chat_doctor.tracking.registry import aliased_version
from chat_doctor.tracking.sweep_report import (
    PARENT_TAG,
    finished_trial,
    markdown,
    plot,
    ranked,
    start_parent,
    trial_figures,
)

logger = get_logger(__name__)


def run_plan(grid: Any, overrides: dict[str, Any]) -> Plan:
    plan = plan_sweep(grid, overrides, git_commit())
    check_trial_deployment(load_config(PARAMS_FILE, overrides).sweep.deployment)
    logger.info("sweep: %d trials over %s", len(plan.trials), ", ".join(plan.knobs))
    return plan


def run_find_finished(cfg: Config, plan: Plan) -> dict[int, dict[str, Any]]:
    """{trial number: {run_id, version}} for the trials whose settings and code finished and registered before."""
    registry, found = cfg.registry, {}
    for trial in plan.trials:
        if done := finished_trial(registry.experiment, registry.model_name, TRIAL_KEY_TAG, trial.key):
            logger.info("trial %d %s: finished before (version %s), reused", trial.number, trial.point, done["version"])
            found[trial.number] = done
    return found


def run_start_trial(cfg: Config, trial: Trial, parent: str, sweep_run_id: str, data_from: str) -> dict[str, Any]:
    """Start one trial: a finetune flow run, a child of the sweep's MLflow run, on the sweep's data."""
    tags = {PARENT_TAG: parent, TRIAL_KEY_TAG: trial.key, "sweep.trial": str(trial.number)}
    parameters = {"overrides": trial.overrides, "tags": tags, "data_from": data_from}
    flow_run_id = start_trial(cfg.sweep.deployment, parameters, sweep_run_id)
    logger.info("trial %d %s: flow run %s", trial.number, trial.point, flow_run_id)
    return {"trial": trial.number, "flow_run_id": flow_run_id}


def run_wait(cfg: Config, plan: Plan, started: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every trial's row of the comparison, once all have ended."""
    runs = wait_for_flow_runs([s["flow_run_id"] for s in started if "flow_run_id" in s])
    rows = []
    for trial, start in zip(plan.trials, started, strict=True):
        row: dict[str, Any] = {"trial": trial.number, "point": trial.point}
        if "reused" in start:
            row.update(
                status="reused", **trial_figures(start["reused"]["run_id"], cfg.registry.model_name, _metric(cfg))
            )
        else:
            state = runs[start["flow_run_id"]].state
            assert state is not None  # final, see wait_for_flow_runs
            row.update(status=state.name.lower(), flow_run=start["flow_run_id"])
            if not state.is_completed():
                row["reason"] = state.message or state.name
            if run_id := run_of_flow_run(start["flow_run_id"]):
                row.update(trial_figures(run_id, cfg.registry.model_name, _metric(cfg)))
        rows.append(row)
    return rows


def _metric(cfg: Config) -> str:
    return cfg.registry.promote_metric


def summary_of(cfg: Config, rows: list[dict[str, Any]]) -> str:
    """Which version won and by how much, or why none did."""
    metric, registry = _metric(cfg), cfg.registry
    failed = [r for r in rows if r["status"] not in ("completed", "reused")]
    scored = ranked(rows, metric)
    head = f"{len(rows)} trials: {len(rows) - len(failed)} finished, {len(failed)} failed."
    champion = aliased_version(registry.model_name, registry.champion_alias)
    winner = next((r for r in scored if champion and r.get("version") == int(champion.version)), None)
    if winner is None:
        best = f" Best trial: {scored[0]['trial']} (version {scored[0].get('version')})." if scored else ""
        held = f"version {champion.version}" if champion else "none"
        return f"{head}{best} No trial is {registry.champion_alias} ({held} is)."
    others = [r for r in scored if r is not winner]
    margin = (
        f", {abs(winner['tuned'] - others[0]['tuned']):.4g} better than trial {others[0]['trial']}" if others else ""
    )
    return (
        f"{head} Trial {winner['trial']} {json.dumps(winner['point'])} won: version {winner['version']} is "
        f"{registry.champion_alias}, tuned {metric} {winner['tuned']:.4g}{margin}."
    )


def run_compare(cfg: Config, plan: Plan, rows: list[dict[str, Any]], parent: str) -> str:
    """The comparison in Prefect and in the parent MLflow run, which ends; returns the summary."""
    metric = _metric(cfg)
    summary = summary_of(cfg, rows)
    text = markdown(rows, plan.knobs, metric, summary)
    table = [
        {"trial": r["trial"], **r["point"], **{k: v for k, v in r.items() if k not in ("trial", "point")}} for r in rows
    ]
    create_table_artifact(table, key="sweep-trials", description=summary)
    create_markdown_artifact(text, key="sweep-comparison", description="Every trial, and the metric by each knob")
    with tempfile.TemporaryDirectory() as folder:
        files = {"comparison.md": text, "comparison.json": json.dumps(rows, indent=2, default=str)}
        for name, content in files.items():
            (Path(folder) / name).write_text(content)
        plot(rows, plan.knobs, metric, Path(folder) / "comparison.png")
        for name in (*files, "comparison.png"):
            log_artifact(parent, str(Path(folder) / name), "sweep")
    if tracking_uri().startswith("http"):  # the tracking server serves the chart to the Prefect UI
        url = f"{tracking_uri().rstrip('/')}/get-artifact?path=sweep/comparison.png&run_uuid={parent}"
        create_image_artifact(url, key="sweep-chart", description=f"tuned {metric} against each swept knob")
    end_run(parent, "FINISHED" if all(r["status"] in ("completed", "reused") for r in rows) else "FAILED")
    logger.info("%s", summary)
    return summary


@step("plan-sweep")
def plan(grid: dict[str, list[Any]], overrides: dict[str, Any]) -> Plan:
    """Check the grid (keys, lists, every trial's config, sweep.max_trials) before any trial starts."""
    return run_plan(grid, overrides)


@step("start-sweep-tracking")
def start_sweep_tracking(cfg: Config, plan: Plan, name: str, flow_run_id: str) -> str:
    params = {f"grid.{k}": json.dumps([t.point[k] for t in plan.trials]) for k in plan.knobs}
    tags = {"prefect.flow_run_id": flow_run_id, "git_commit": git_commit()}
    return start_parent(cfg.registry.experiment, name, {**params, "trials": len(plan.trials)}, tags)


@step("find-finished-trials")
def find_finished(cfg: Config, plan: Plan) -> dict[int, dict[str, Any]]:
    return run_find_finished(cfg, plan)


@step("start-trial")
def start(cfg: Config, trial: Trial, parent: str, sweep_run_id: str, data_from: str) -> dict[str, Any]:
    return run_start_trial(cfg, trial, parent, sweep_run_id, data_from)


@step("wait-for-trials")
def wait(cfg: Config, plan: Plan, started: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return run_wait(cfg, plan, started)


@step("compare-trials")
def compare(cfg: Config, plan: Plan, rows: list[dict[str, Any]], parent: str) -> str:
    return run_compare(cfg, plan, rows, parent)
