"""The `train-node` flow: one more machine for a multi-node training (train.nnodes > 1, train.join:
work-pool). Node 0's train step starts it on the work pool, once per other node, as a sub-flow of
that step; a worker on another machine runs it: it fetches the run's data (the DVC experiment, from
the DVC remote) and newest checkpoint (from the object store) and trains its share of each step,
meeting node 0 at the rendezvous. Nobody runs it by hand: `prefect deploy --all` deploys it beside
`finetune` (prefect.yaml).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.train import train_node as train_node_step


@flow(name="train-node")
def train_node(attempt: dict[str, Any], experiment: str, node_rank: int) -> None:
    """Node `node_rank` of node 0's attempt (its config, data and MLflow run), on this machine."""
    train_node_step(attempt, experiment, node_rank)
