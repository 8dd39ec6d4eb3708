"""Step `train`: QLoRA fine-tuning of the base on the tokenized train split, launched and retried.

Reads params sections `model`, `lora` and `train`. Input: the tokenized splits. Output: a run folder
`runs/run-<hash>/` where <hash> names the training data and those sections, so re-running the same
training finds its own checkpoints and resumes: `checkpoints/checkpoint-N/` every `train.save_steps`
and `adapter/` (PEFT safetensors + tokenizer + the resolved config), written atomically at the end.
Train loss, learning rate, grad norm and tokens/s go to the MLflow run per logging step.

The step launches the recipe (chat_doctor/training/recipe.py) in child process(es), relays their
log into its own, and turns an out-of-memory into a retry with half the micro-batch.

Several machines (train.nnodes > 1): with train.join = work-pool, node 0's step starts a `train-node`
flow run per other node on the work pool (flows/train_node.py; `run_node` here), which fetches the
run's data from the DVC remote and its checkpoint from the object store and meets node 0 at the
rendezvous on node 0's address. With train.join = by-hand, each other machine, sharing the project's
filesystem, runs `python -m tasks.train join runs/<run>/attempt.json --node-rank N`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from chat_doctor.config import Config, ConfigError, split_for_processes
from chat_doctor.core.files import file_lock, write_json
from chat_doctor.core.layout import RUNS_ROOT, RunFolder
from chat_doctor.core.logs import get_logger
from chat_doctor.core.records import Tokenized, Trained
from chat_doctor.orchestration.nodes import finish_nodes, rendezvous_endpoint, start_nodes
from chat_doctor.orchestration.steps import step
from chat_doctor.tracking.lineage import DATA_OUTPUTS, data_hashes, experiment_lock, fetch_experiment, materialize
from chat_doctor.tracking.mlflow_runs import set_tags
from chat_doctor.training.checkpoint_store import restore
from chat_doctor.training.launch import (
    OutOfMemory,
    TrainingFailed,
    apply_micro_batch,
    clear_outcomes,
    halve_micro_batch,
    launch_command,
    outcomes,
    processes,
)
from chat_doctor.training.plan import finished, run_folder_for, steps_for_epochs
from chat_doctor.training.preflight import check_device

logger = get_logger(__name__)

# A progress line as the training process writes it (chat_doctor/training/callbacks.py Progress).
PROGRESS = re.compile(r"^step (\d+)/(\d+) \(\d+%\) loss (\S+), ([\d,]+) tokens/s, ETA (\d+:\d\d)")


def run_train(
    cfg: Config,
    tokenized: Tokenized,
    mlflow_run_id: str | None = None,
    on_progress: Callable | None = None,
    experiment: str | None = None,
) -> Trained:
    """Train in child process(es), so that out-of-memory frees all of its memory; return the run folder.

    `on_progress`, if given, gets {step, steps, loss, tokens_per_s, eta} at each logging step.
    `experiment`: the DVC experiment of `tokenized`, from which the other nodes of a multi-node run
    (train.join = work-pool) fetch the same data.

    Raises OutOfMemory (after recording half the micro-batch for the next attempt, which resumes
    from the last complete checkpoint) or TrainingFailed for anything else, a kill included.
    """
    check_device(cfg)  # also checked before the data steps; this step can be run on its own
    world = processes(cfg) * cfg.train.nnodes
    if cfg.train.strategy == "fsdp" and world == 1:
        raise ConfigError("train.strategy = fsdp shards the model over several GPUs, but only one is in use")
    split_for_processes(cfg.train, world)  # refuses a batch that does not split, before anything loads
    cfg = steps_for_epochs(cfg, tokenized.train)
    run = run_folder_for(cfg, tokenized.train)
    waiting = f"waiting for another run that trains the same data and settings in {run.root}"
    with file_lock(run.lock, waiting):
        return _attempt(cfg, tokenized, run, mlflow_run_id, world, on_progress, experiment)


def _through_the_pool(cfg: Config) -> bool:
    return cfg.train.nnodes > 1 and cfg.train.join == "work-pool"


def _attempt(
    cfg: Config,
    tokenized: Tokenized,
    run: RunFolder,
    mlflow_run_id: str | None,
    world: int,
    on_progress,
    experiment: str | None,
) -> Trained:
    """One training attempt in `run`, the run folder's lock held."""
    assert cfg.train.max_steps is not None  # derived from the epochs above
    if done := finished(run, cfg.train.max_steps):  # no process to start for a training that is done
        logger.info("training finished in %s before (checkpoint %s); its adapter is reused", run.root, Path(done).name)
        return Trained(run=run, resumed_from=done)
    if restored := restore(run):  # this machine has none of the run's checkpoints; the store had one
        logger.info("resuming from %s, saved by another machine", Path(restored).name)
    cfg = apply_micro_batch(cfg, run)
    if _through_the_pool(cfg):  # the other nodes meet this one, wherever the pool ran it
        if experiment is None:
            raise ConfigError("train.join = work-pool: the other nodes need the run's DVC experiment to fetch its data")
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"rdzv_endpoint": rendezvous_endpoint()})})
    attempt = {
        "config": cfg.model_dump(),
        "tokenized": tokenized.model_dump(mode="json"),
        "mlflow_run_id": mlflow_run_id,
    }
    write_json(run.attempt, attempt)
    clear_outcomes(run)
    if mlflow_run_id:
        set_tags(
            mlflow_run_id,
            {
                "train.micro_batch_size_used": cfg.train.micro_batch_size,
                "train.grad_accum_used": cfg.train.grad_accum,
                "train.max_steps_used": cfg.train.max_steps,
                "train.processes": world,
            },
        )
    nodes = []
    if _through_the_pool(cfg):
        nodes = start_nodes(cfg.train.nnodes, {"attempt": attempt, "experiment": experiment})
    try:
        returncode = _launch(cfg, run, on_progress)
    finally:  # the other nodes end with this one (a node still waiting for a worker is cancelled)
        node_problems = finish_nodes(nodes, wait_s=120) if nodes else []
    results = outcomes(run)
    if returncode == 0 and results and "run" in results[0] and not node_problems:
        return Trained.model_validate(results[0])
    failed = [r["error"] for r in results if "error" in r] + node_problems
    # Another node's out-of-memory reaches this one as its flow run's message.
    oom = [r["error"] for r in results if r.get("oom")] + [p for p in node_problems if "out of memory" in p.lower()]
    if oom:
        raise OutOfMemory(halve_micro_batch(cfg, run, oom[0]))
    reason = "; ".join(failed) if failed else f"the training process ended with exit code {returncode}"
    raise TrainingFailed(f"training failed: {reason}")


def _launch(cfg: Config, run: RunFolder, on_progress: Callable | None) -> int:
    """Run the attempt's process(es); their log lines (progress with ETA) are relayed line by line
    into this step's log. Returns the exit code."""
    # Compiled code (train.compile) is cached in the project, not in the user's temp folder.
    env = {**os.environ}
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(RUNS_ROOT, "compile-cache").resolve()))
    with subprocess.Popen(launch_command(cfg, run), stdout=subprocess.PIPE, text=True, env=env) as child:
        assert child.stdout is not None
        for line in child.stdout:
            logger.info(line.rstrip())
            if on_progress and (found := PROGRESS.match(line)):
                step_, steps, loss, rate, eta = found.groups()
                on_progress({"step": int(step_), "steps": int(steps), "loss": loss, "tokens_per_s": rate, "eta": eta})
    return child.returncode


def run_node(attempt: dict[str, Any], experiment: str, node_rank: int) -> None:
    """Node `node_rank` of node 0's multi-node attempt, on this machine: the same data (DVC experiment
    `experiment`, read from the DVC remote), the newest checkpoint (from the object store), and the
    rendezvous that node 0 set in the attempt's config."""
    cfg = Config.model_validate(attempt["config"])
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"node_rank": node_rank})})
    rev = fetch_experiment(experiment)
    path = DATA_OUTPUTS["tokenize"]
    tokenized = Tokenized.at(materialize(rev, path, data_hashes(experiment_lock(rev))[path]))
    run = run_folder_for(cfg, tokenized.train)  # named by content and settings: node 0's folder name
    with file_lock(run.lock, f"waiting for another training in {run.root}"):
        if restored := restore(run):
            logger.info("node %d resumes from %s, as node 0 does", node_rank, Path(restored).name)
        write_json(run.attempt, {**attempt, "config": cfg.model_dump(), "tokenized": tokenized.model_dump(mode="json")})
        clear_outcomes(run)
        logger.info("node %d of %d meets node 0 at %s", node_rank, cfg.train.nnodes, cfg.train.rdzv_endpoint)
        returncode = _launch(cfg, run, None)
        failed = [r["error"] for r in outcomes(run) if "error" in r]
    if returncode or failed:
        reason = "; ".join(failed) or f"the training process ended with exit code {returncode}"
        raise TrainingFailed(f"node {node_rank}: {reason}")


def join(argv: list[str]) -> int:
    """`python -m tasks.train join SPEC --node-rank N`: another machine's share of a multi-node attempt.

    Node 0 (the flow's train step) writes runs/<run>/attempt.json and waits at the rendezvous; each
    other machine, with the project and runs/ on a shared filesystem, joins with its node rank.
    """
    parser = argparse.ArgumentParser(prog="python -m tasks.train join", description=join.__doc__)
    parser.add_argument("spec", type=Path, help="runs/<run>/attempt.json written by node 0")
    parser.add_argument("--node-rank", type=int, required=True)
    args = parser.parse_args(argv)
    cfg = Config.model_validate(json.loads(args.spec.read_text())["config"])
    if cfg.train.nnodes == 1:
        raise SystemExit(f"{args.spec}: not a multi-node attempt (train.nnodes = 1); nothing to join")
    if not 0 < args.node_rank < cfg.train.nnodes:
        raise SystemExit(f"--node-rank must be 1 .. {cfg.train.nnodes - 1} (train.nnodes = {cfg.train.nnodes})")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"node_rank": args.node_rank})})
    return subprocess.run(launch_command(cfg, RunFolder(root=args.spec.parent))).returncode


# The Prefect task.


def _only_out_of_memory(task, task_run, state) -> bool:
    """Retry training only after out-of-memory (the next attempt halves the micro-batch)."""
    return isinstance(state.result(raise_on_failure=False), OutOfMemory)


def _progress_artifact() -> Callable[[dict], None]:
    """Updates the `train-progress` artifact (a bar and a line in the Prefect UI) at each logging step."""
    made: dict[str, Any] = {}  # the artifact's id once it exists

    def update(p: dict) -> None:
        line = f"step {p['step']}/{p['steps']}: loss {p['loss']}, {p['tokens_per_s']} tokens/s, ETA {p['eta']}"
        done = 100 * p["step"] / p["steps"]
        if "id" in made:
            update_progress_artifact(made["id"], done, description=line)
        else:
            made["id"] = create_progress_artifact(done, key="train-progress", description=line)

    return update


# Retries are bounded by the halvings themselves: run_train stops below micro-batch 1 with what to
# change. On an H100, Mistral-7B shapes at 1,024 tokens needed four (64 -> 4; bench/RESULTS.md).
@step("train", retries=8, retry_condition_fn=_only_out_of_memory)
def train(cfg: Config, tokenized: Tokenized, run_id: str, experiment: str | None = None) -> Trained:
    return run_train(cfg, tokenized, run_id, on_progress=_progress_artifact(), experiment=experiment)


# Node 0 retries the whole attempt (its other nodes with it): a node's step is not retried on its own.
@step("train-node")
def train_node(attempt: dict[str, Any], experiment: str, node_rank: int) -> None:
    run_node(attempt, experiment, node_rank)


if __name__ == "__main__":
    if sys.argv[1:2] != ["join"]:
        raise SystemExit("usage: python -m tasks.train join runs/<run>/attempt.json --node-rank N")
    sys.exit(join(sys.argv[2:]))
