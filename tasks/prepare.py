"""Step `prepare-config`: the run's config, validated with this machine, the base's files and the
shared servers (tracking server, object store) before any data step, so a bad value or an unreachable
server fails in seconds with nothing pushed or rewritten.

Reads params.yaml and the run's dotted overrides. Output: the validated Config (errors name the key).
"""

from __future__ import annotations

from typing import Any

from prefect import task

from chat_doctor.config import Config, load_config
from chat_doctor.core.layout import PARAMS_FILE
from chat_doctor.orchestration.nodes import check_node_deployment
from chat_doctor.tracking.servers import check_servers
from chat_doctor.training.preflight import check_before_data


def run_prepare(overrides: dict[str, Any]) -> Config:
    cfg = load_config(PARAMS_FILE, overrides)
    check_before_data(cfg)
    check_servers()  # the tracking server and object store answer, with these keys
    if cfg.train.nnodes > 1 and cfg.train.join == "work-pool":
        check_node_deployment()  # the other machines join through the work pool
    return cfg


@task(name="prepare-config")
def prepare_config(overrides: dict[str, Any]) -> Config:
    """Validate params.yaml + overrides, this machine and the base's files (errors name the key)
    before any data step runs."""
    return run_prepare(overrides)
