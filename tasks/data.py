"""Step `data`: the run's data, made by dvc.yaml's `sample` and `tokenize` stages as a DVC experiment.

Reads params sections `data`, `tokenize` and `model` (and `preset`): params.yaml with this run's
overrides of them, applied to the experiment's own copy of the project, never to the workspace.
Outputs: the experiment (named after the flow run; `dvc exp show`, `dvc exp apply NAME`) and its
data read from the DVC cache into content-addressed folders: `runs/data/processed-<md5>/`
(train.jsonl, eval.jsonl, report.json) and `runs/data/tokenized-<md5>/` (train.arrow, eval.arrow,
report.json). DVC's run cache makes a stage again only when its code (the folders dvc.yaml lists),
params or inputs changed; a local source's content is checked too, as it is not a DVC dependency.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.runtime import flow_run

from chat_doctor.config import DataConfig
from chat_doctor.core.files import content_hash, is_local
from chat_doctor.core.logs import get_logger
from chat_doctor.core.records import DataMade, Processed, Tokenized
from chat_doctor.orchestration.steps import step
from chat_doctor.tracking.lineage import (
    DATA_OUTPUTS,
    check_made_for,
    data_hashes,
    data_overrides,
    experiment_lock,
    fetch_experiment,
    fingerprint_of,
    materialize,
    push,
    remove_experiment,
    run_data_experiment,
    share_experiment,
)

logger = get_logger(__name__)


def _read(name: str, rev: str) -> DataMade:
    hashes = data_hashes(experiment_lock(rev))
    folders = {path: materialize(rev, path, md5) for path, md5 in hashes.items()}
    processed, tokenized = (folders[DATA_OUTPUTS[stage]] for stage in ("sample", "tokenize"))
    return DataMade(
        processed=Processed.at(processed), tokenized=Tokenized.at(tokenized), experiment=name, rev=rev, hashes=hashes
    )


def _stale_source(cfg: DataConfig, made: DataMade) -> bool:
    """The sample stage came from DVC's run cache, but the local source file has changed since."""
    if not is_local(cfg.source):
        return False
    return fingerprint_of(made.processed.report) != "sha256:" + content_hash(Path(cfg.source).expanduser())


def run_data(cfg: DataConfig, overrides: dict[str, Any], name: str) -> DataMade:
    """Make (or take from DVC's run cache) the data the run's params describe, as experiment `name`."""
    params = data_overrides(overrides)
    made = _read(name, run_data_experiment(name, params))
    if _stale_source(cfg, made):
        logger.warning("data.source %s changed since DVC cached its sample: making the data again", cfg.source)
        remove_experiment(name)
        made = _read(name, run_data_experiment(name, params, force=True))
    return made


def run_shared_data(cfg: DataConfig, overrides: dict[str, Any], name: str) -> DataMade:
    """Data made once for several runs (a sweep's trials with the same data settings), as experiment
    `name`, pushed to the DVC remote and its git ref to $CHAT_DOCTOR_EXPERIMENTS_REMOTE, so that each
    run, on any machine, takes it instead of making it again (`data_from`)."""
    made = run_data(cfg, overrides, name)
    push(made.rev)
    share_experiment(name)
    return made


def run_data_from(name: str, overrides: dict[str, Any]) -> DataMade:
    """The data of experiment `name`, made for other runs with the same data settings (checked)."""
    rev = fetch_experiment(name)
    check_made_for(rev, name, overrides)
    logger.info("data: DVC experiment %s (%s), made once for the runs of these data settings", name, rev[:7])
    return _read(name, rev)


@step("data")
def data(cfg: DataConfig, overrides: dict[str, Any], data_from: str | None = None) -> DataMade:
    """The run's data: made as its own experiment, or (`data_from`) an experiment made for it already."""
    if data_from:
        return run_data_from(data_from, overrides)
    if not Path(cfg.source).expanduser().exists() and not cfg.revision:
        logger.warning(
            "data.source %r has no data.revision: DVC cannot see a new commit of the dataset; "
            "pin data.revision for a reproducible run",
            cfg.source,
        )
    return run_data(cfg, overrides, f"{flow_run.name}-{str(flow_run.id)[:8]}")


@step("share-data")
def share_data(cfg: DataConfig, overrides: dict[str, Any], name: str) -> DataMade:
    return run_shared_data(cfg, overrides, name)
