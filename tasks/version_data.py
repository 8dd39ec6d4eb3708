"""Step `version-data`: record the data the adapter will be trained on in DVC and in the MLflow run.

Reads no params section; takes the data overrides of this run. Inputs: the processed and tokenized
outputs. Data overrides (`data.*`, `tokenize.*`, `model.*`, `preset`) are written to params.yaml, as
`dvc exp run --set-param` does, so dvc.lock stays truthful; then `dvc commit` writes the hashes of
params, deps and outputs to dvc.lock and `dvc push` copies the data to the default remote, from which
`dvc pull` restores exactly what an adapter was trained on. Output: the hashes, also tagged on the
MLflow run (`dvc.data/processed`, `dvc.data/tokenized`), and the data reports as run artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact

from chat_doctor.core.logs import get_logger
from chat_doctor.core.records import DataVersion, Processed, Tokenized
from chat_doctor.orchestration.steps import step
from chat_doctor.tracking.lineage import record_data_stages, write_params
from chat_doctor.tracking.mlflow_runs import log_artifact, set_tags

logger = get_logger(__name__)


def run_version_data(
    run_id: str, processed: Processed, tokenized: Tokenized, params_file: str, dvc_params: dict[str, Any]
) -> DataVersion:
    """dvc commit + push the data stages; their hashes and reports go to the MLflow run."""
    # Only now, once the data steps have succeeded, so a bad source never lands in params.yaml.
    changed = write_params(Path(params_file), dvc_params)
    if changed:
        logger.info("%s updated for DVC: %s", params_file, ", ".join(changed))
    tags = {f"dvc.{path}": md5 for path, md5 in record_data_stages().items()}
    set_tags(run_id, tags)
    log_artifact(run_id, str(processed.report), "data/processed")
    log_artifact(run_id, str(tokenized.report), "data/tokenized")
    return DataVersion(tags=tags)


def data_summary(report: dict, version: DataVersion) -> str:
    """What the sample step read, dropped and changed, and the data's DVC hashes, as markdown."""
    rows = [("rows read", report["rows_read"]), ("rows kept", report["rows_kept"])]
    rows += [(f"dropped: {reason}", n) for reason, n in report["dropped"].items()]
    rows += [(f"changed: {rule}", n) for rule, n in report["changed"].items()]
    rows += [("answers cut off mid-sentence", report["answers_cut_off"])]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    hashes = "\n".join(f"- `{path}`: `{md5}`" for path, md5 in version.tags.items())
    return f"## Data: {report['source']}\n\n| | rows |\n|---|---|\n{table}\n\nDVC hashes:\n{hashes}\n"


@step("version-data")
def version_data(
    run_id: str, processed: Processed, tokenized: Tokenized, params_file: str, dvc_params: dict[str, Any]
) -> DataVersion:
    version = run_version_data(run_id, processed, tokenized, params_file, dvc_params)
    create_markdown_artifact(
        key="data-report",
        markdown=data_summary(json.loads(processed.report.read_text()), version),
        description="What the sample step read, dropped and changed",
    )
    return version
