"""Step `version-data`: the run's data to the DVC remote, and its lineage on the MLflow run.

Reads no params section. Input: the data step's experiment. Runs after eval-source, so a bad eval
file fails before anything is pushed. `dvc push` of the experiment's outputs to the default remote,
from which another clone restores them (`dvc exp apply NAME`, or `git checkout` of a saved
experiment, then `dvc pull`); with $CHAT_DOCTOR_EXPERIMENTS_REMOTE set (a worker's clone is
temporary), the experiment itself goes to that git remote (`dvc exp push`), whence any clone takes it
with `dvc exp pull`. Output: the lineage tags (`dvc.data/processed`, `dvc.data/tokenized`,
`dvc.experiment`, `dvc.experiment_rev`), also set on the MLflow run, with the data reports as run
artifacts and a `data-report` artifact in Prefect.
"""

from __future__ import annotations

import json

from prefect.artifacts import create_markdown_artifact

from chat_doctor.core.records import DataMade, DataVersion
from chat_doctor.orchestration.steps import step
from chat_doctor.tracking.lineage import push, share_experiment
from chat_doctor.tracking.mlflow_runs import log_artifact, set_tags


def run_version_data(run_id: str, made: DataMade) -> DataVersion:
    """dvc push the experiment's data (and the experiment to the team's git remote where one is set);
    its lineage and reports go to the MLflow run."""
    push(made.rev)
    tags = dict(made.tags)
    if shared := share_experiment(made.experiment):
        tags["dvc.experiment_remote"] = shared
    set_tags(run_id, tags)
    log_artifact(run_id, str(made.processed.report), "data/processed")
    log_artifact(run_id, str(made.tokenized.report), "data/tokenized")
    return DataVersion(tags=tags)


def data_summary(report: dict, version: DataVersion) -> str:
    """What the sample step read, dropped and changed, and the data's lineage, as markdown."""
    rows = [("rows read", report["rows_read"]), ("rows kept", report["rows_kept"])]
    rows += [(f"dropped: {reason}", n) for reason, n in report["dropped"].items()]
    rows += [(f"changed: {rule}", n) for rule, n in report["changed"].items()]
    rows += [("answers cut off mid-sentence", report["answers_cut_off"])]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    lineage = "\n".join(f"- `{key}`: `{value}`" for key, value in version.tags.items())
    return f"## Data: {report['source']}\n\n| | rows |\n|---|---|\n{table}\n\nLineage (DVC):\n{lineage}\n"


@step("version-data")
def version_data(run_id: str, made: DataMade) -> DataVersion:
    version = run_version_data(run_id, made)
    create_markdown_artifact(
        key="data-report",
        markdown=data_summary(json.loads(made.processed.report.read_text()), version),
        description="What the sample step read, dropped and changed, and the run's DVC experiment",
    )
    return version
