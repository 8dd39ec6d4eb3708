"""The other machines of a multi-node training, brought in through the Prefect work pool.

With `train.nnodes: N` and `train.join: work-pool`, node 0 is the worker that runs the flow's train
step. It starts one `train-node` flow run per other node on the deployment of that name beside its
own (`train-node/<name>` for `finetune/<name>`); each lands on another worker of the pool, fetches
the run's data and checkpoint and meets node 0 at the torchrun rendezvous on node 0's address. The
`train-node` runs are sub-flows of the train step, so the Prefect UI shows them under it.
"""

from __future__ import annotations

import os
import socket
from typing import Any, cast
from urllib.parse import urlparse

from chat_doctor.core.logs import get_logger
from chat_doctor.orchestration.prefect_api import cancel_flow_runs, deployment_exists, wait_for_flow_runs

logger = get_logger(__name__)

NODE_FLOW = "train-node"
ADDRESS_ENV = "CHAT_DOCTOR_NODE_ADDRESS"  # this machine's address as the others reach it, when the guess is wrong


class NodesError(RuntimeError):
    """A multi-node run that the work pool cannot set up."""


def node_deployment() -> str:
    """`train-node/<name>` for the deployment this flow run belongs to; raises outside a deployment."""
    from prefect.runtime import deployment

    if not deployment.name:
        raise NodesError(
            "train.nnodes > 1 with train.join = work-pool: start the run through its deployment "
            "(`prefect deployment run finetune/default`), whose work pool has a worker on each machine; "
            "or set train.join: by-hand"
        )
    return f"{NODE_FLOW}/{deployment.name}"


def check_node_deployment() -> None:
    """The `train-node` deployment exists beside this run's own (before any data step)."""
    name = node_deployment()
    if not deployment_exists(name):
        raise NodesError(
            f"train.nnodes > 1: no deployment {name} for the other machines to join with "
            "(`prefect deploy --all` creates it from prefect.yaml)"
        )


def node_address() -> str:
    """This machine's address as the others reach it: $CHAT_DOCTOR_NODE_ADDRESS, else the local end of
    the route to the Prefect server (the network every worker of the pool shares)."""
    if address := os.environ.get(ADDRESS_ENV):
        return address
    from prefect.settings import PREFECT_API_URL

    host = urlparse(PREFECT_API_URL.value() or "").hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(host), 9))  # no packet is sent: this only picks the route
        return probe.getsockname()[0]


def rendezvous_endpoint() -> str:
    """host:port for torchrun's rendezvous on this machine, on a port free now."""
    address = node_address()
    with socket.socket() as sock:
        sock.bind((address, 0))
        return f"{address}:{sock.getsockname()[1]}"


def start_nodes(nnodes: int, parameters: dict[str, Any]) -> list[str]:
    """One `train-node` flow run per node 1 .. nnodes-1 (`node_rank` added to `parameters`); their ids."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    name = node_deployment()
    ids = []
    for rank in range(1, nnodes):
        # timeout=0: returns once the run is created; inside the train step it is that step's sub-flow.
        run = cast(FlowRun, run_deployment(name, parameters={**parameters, "node_rank": rank}, timeout=0))
        logger.info("node %d of %d: flow run %s (%s) waits for a worker of the pool", rank, nnodes, run.name, run.id)
        ids.append(str(run.id))
    return ids


def finish_nodes(ids: list[str], wait_s: float) -> list[str]:
    """Wait up to `wait_s` for the node runs to end, cancel those that did not; what went wrong, per node."""
    runs = wait_for_flow_runs(ids, timeout_s=wait_s, poll_s=1)
    cancelled = {str(r.id) for r in cancel_flow_runs(list(runs.values()), "node 0's training ended")}
    problems = []
    for rank, flow_run_id in enumerate(ids, start=1):
        run = runs[flow_run_id]
        if flow_run_id in cancelled:
            problems.append(f"node {rank} ({run.name}): cancelled, not started when node 0 ended")
        elif not run.state.is_completed():
            problems.append(f"node {rank} ({run.name}): {run.state.name}: {run.state.message or ''}".rstrip(": "))
    return problems
