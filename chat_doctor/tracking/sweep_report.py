"""A sweep in MLflow: one parent run, every trial's run its child (`mlflow.parentRunId`, so the MLflow
UI nests them and its compare view lists them), finished trials found again by their settings, and
the comparison (a table of every trial, a chart of the promotion metric against each swept knob)
kept in the parent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from chat_doctor.core.files import atomic_path
from chat_doctor.evaluation.metrics import METRICS
from chat_doctor.tracking.mlflow_runs import client, experiment_id, start_run
from chat_doctor.tracking.registry import REGISTRATION, figures_from_tags, is_complete

PARENT_TAG = "mlflow.parentRunId"


def start_parent(experiment: str, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    return start_run(experiment, name, params, {**tags, "sweep": "parent"})


def finished_trial(experiment: str, model_name: str, key_tag: str, key: str) -> dict[str, Any] | None:
    """The newest finished run of an earlier trial with these settings and code, with its complete
    registered version: {run_id, version}; None when there is none."""
    mlflow_client = client()
    runs = mlflow_client.search_runs(
        [experiment_id(experiment)],
        f"tags.`{key_tag}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.end_time DESC"],
    )
    for run in runs:
        versions = mlflow_client.search_model_versions(f"name = '{model_name}' and run_id = '{run.info.run_id}'")
        complete = [v for v in versions if is_complete(v) and REGISTRATION in v.tags]
        if complete:
            return {"run_id": run.info.run_id, "version": complete[-1].version}
    return None


def trial_figures(run_id: str, model_name: str, metric: str) -> dict[str, Any]:
    """What the comparison shows of a trial's MLflow run: its version, promotion decision, the
    promotion metric of base and tuned (the figures promotion judged), wall time, tokens/s, memory."""
    mlflow_client = client()
    run = mlflow_client.get_run(run_id)
    metrics = run.data.metrics
    row: dict[str, Any] = {
        "mlflow_run": run_id,
        "wall_s": round((run.info.end_time - run.info.start_time) / 1000) if run.info.end_time else None,
        "tokens_per_s": metrics.get("train/tokens_per_s"),
        "peak_memory_gib": metrics.get("train/peak_memory_gib"),
    }
    versions = sorted(
        mlflow_client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'"),
        key=lambda v: int(v.version),
    )
    if versions:
        version = mlflow_client.get_model_version(model_name, versions[-1].version)
        row.update(
            version=int(version.version),
            decision=version.tags.get("promotion.decision"),
            tuned=figures_from_tags(version.tags).get(metric),
            base=figures_from_tags(version.tags, "base").get(metric),
        )
    return row


def ranked(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The trials with a figure, best first by `metric`'s direction."""
    scored = [r for r in rows if isinstance(r.get("tuned"), float) and math.isfinite(r["tuned"])]
    return sorted(scored, key=lambda r: r["tuned"], reverse=bool(METRICS[metric].higher_is_better))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict[str, Any]], knobs: list[str], metric: str, summary: str) -> str:
    """The comparison as markdown: the summary, a table of every trial, and a bar per trial for each knob."""
    columns = ["trial", *knobs, "status", f"tuned {metric}", f"base {metric}", "version", "promotion", "wall s"]
    columns += ["tokens/s", "peak GiB", "reason"]
    lines = [summary, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        cells = [r["trial"], *(json.dumps(r["point"][k]) for k in knobs), r["status"], r.get("tuned"), r.get("base")]
        cells += [r.get("version"), r.get("decision"), r.get("wall_s"), r.get("tokens_per_s")]
        cells += [r.get("peak_memory_gib"), r.get("reason")]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    scored = ranked(rows, metric)
    if scored:
        low, high = min(r["tuned"] for r in scored), max(r["tuned"] for r in scored)
        for knob in knobs:
            lines += ["", f"{metric} ({METRICS[metric].direction} is better) by `{knob}`:", "```"]
            for r in sorted(scored, key=lambda r: (json.dumps(r["point"][knob]), r["trial"])):
                width = 1 + round(29 * (r["tuned"] - low) / (high - low)) if high > low else 30
                lines.append(f"{json.dumps(r['point'][knob]):>10} trial {r['trial']:>2} {'#' * width} {r['tuned']:.4g}")
            lines.append("```")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], knobs: list[str], metric: str, path: Path) -> None:
    """One panel per swept knob: the promotion metric of each finished trial against the knob's value."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    scored = ranked(rows, metric)
    fig, axes = plt.subplots(1, len(knobs), figsize=(3.6 * len(knobs), 3.2), squeeze=False)
    for ax, knob in zip(axes[0], knobs, strict=True):
        values = sorted({json.dumps(r["point"][knob]) for r in rows})
        for r in scored:
            x = values.index(json.dumps(r["point"][knob]))
            ax.scatter(x, r["tuned"], color="#2a7ab0")
            ax.annotate(str(r["trial"]), (x, r["tuned"]), textcoords="offset points", xytext=(5, 2), fontsize=7)
        ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(knob, fontsize=9)
        ax.set_ylabel(f"tuned {metric}", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"sweep: {metric} ({METRICS[metric].direction} is better) per trial", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
