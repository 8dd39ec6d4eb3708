"""Step `train`: QLoRA fine-tuning of the base on the tokenized train split, launched and retried.

Reads params sections `model`, `lora` and `train`. Input: `data/tokenized/train.arrow`. Outputs in
`runs/<run>/` where <run> is a hash of the training data and those sections, so re-running the same
training finds its own checkpoints and resumes: `checkpoints/checkpoint-N/` every `train.save_steps`
and `adapter/` (PEFT safetensors + tokenizer + the resolved config), written atomically at the end.
Train loss, learning rate, grad norm and tokens/s go to the MLflow run per logging step.

This module is the launcher: it decides the run folder and the steps, starts the training
process (or torchrun, or joins another machine's run) and turns an out-of-memory into a retry with
half the micro-batch. The recipe that runs inside that process is tasks/train_recipe.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from chat_doctor.config import RUNS_ROOT, Config, ConfigError, effective_batch, section_hash, split_for_processes
from chat_doctor.files import content_hash, write_json
from chat_doctor.preflight import check_device
from chat_doctor.tokenized import load_split
from chat_doctor.tracking import set_tags

# How the step is spread over GPUs and machines: the same training whatever they are, so a run can
# resume on another number of GPUs (the effective batch is kept).
LAUNCH_KEYS = {"gpus", "strategy", "nnodes", "node_rank", "rdzv_endpoint"}


def run_dir_for(cfg: Config, tokenized: dict[str, str]) -> Path:
    """The run folder: same data + same model/LoRA/train settings = same folder (so a rerun resumes).

    The micro-batch split is left out on purpose: after out-of-memory, micro_batch_size halves and
    grad_accum doubles, the effective batch stays, and training must resume in the same folder.
    """
    train = cfg.train.model_dump(exclude={"micro_batch_size", "grad_accum", *LAUNCH_KEYS})
    train["effective_batch"] = effective_batch(cfg.train)
    key = hashlib.sha256(
        json.dumps([section_hash(cfg.model, cfg.lora), train, content_hash(Path(tokenized["train"]))]).encode()
    )
    return Path(cfg.runs_dir) / f"run-{key.hexdigest()[:12]}"


class OutOfMemory(RuntimeError):
    """Training ran out of memory; the next attempt uses half the micro-batch (see run_train)."""


class TrainingFailed(RuntimeError):
    """Training failed for another reason (or was killed); retrying the same thing will not help."""


def _is_oom(err: BaseException) -> bool:
    import torch

    text = str(err).lower()
    return (
        isinstance(err, torch.OutOfMemoryError | MemoryError)
        or "out of memory" in text
        or ("can't allocate memory" in text)
    )


def _micro_batch_state(run_dir: Path) -> Path:
    return run_dir / "micro_batch.json"


def _apply_micro_batch(cfg: Config, run_dir: Path) -> Config:
    """The config with the micro-batch an earlier out-of-memory attempt left for this run folder."""
    state = _micro_batch_state(run_dir)
    if not state.is_file():
        return cfg
    split = json.loads(state.read_text())
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=split)})


def _halve_micro_batch(cfg: Config, run_dir: Path, error: str) -> str:
    """Record half the micro-batch and twice the accumulation (same effective batch) for the retry."""
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    if micro == 1:
        shorter = "train.pack_length (and tokenize.max_length)" if cfg.train.pack_length else "tokenize.max_length"
        raise TrainingFailed(
            f"out of memory at train.micro_batch_size = 1 ({error}); lower {shorter}, set "
            "train.gradient_checkpointing: true, or use a GPU with more memory"
        )
    write_json(_micro_batch_state(run_dir), {"micro_batch_size": micro // 2, "grad_accum": accum * 2})
    return f"out of memory at micro-batch {micro}: the retry uses {micro // 2} x {accum * 2} (same effective batch)"


def processes(cfg: Config) -> int:
    """Data-parallel processes on this machine: train.gpus, or every visible GPU for `auto`."""
    if cfg.train.gpus != "auto":
        return cfg.train.gpus
    import torch

    return max(torch.cuda.device_count(), 1)


def launch_command(cfg: Config, spec: Path) -> list[str]:
    """The child process(es) for one attempt: one process, or torchrun with one process per GPU."""
    per_node = processes(cfg)
    if per_node * cfg.train.nnodes == 1:
        return [sys.executable, "-m", "tasks.train", str(spec)]
    t = cfg.train
    # One machine: a private rendezvous on a free port (two trainings can share a host).
    meet = ["--standalone"] if t.nnodes == 1 else [
        f"--nnodes={t.nnodes}", f"--node-rank={t.node_rank}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={t.rdzv_endpoint}",
    ]  # fmt: skip
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={per_node}", *meet,
            "-m", "tasks.train", str(spec)]  # fmt: skip


def _outcomes(run_dir: Path) -> list[dict]:
    """What each process of the last attempt reported (rank 0 first)."""
    files = sorted(run_dir.glob("outcome*.json"), key=lambda p: p.name != "outcome.json")
    return [json.loads(p.read_text()) for p in files]


def steps_for_epochs(cfg: Config, train_path: str) -> Config:
    """The config with train.max_steps derived from train.epochs (unchanged when epochs is not set)."""
    t = cfg.train
    if not t.epochs:
        return cfg
    import pyarrow.compute as pc

    from chat_doctor.packing import pack_rows

    lengths = pc.list_value_length(load_split(train_path).data.column("input_ids")).to_pylist()
    units = len(pack_rows(lengths, t.pack_length)) if t.pack_length else len(lengths)
    per_epoch = math.ceil(units / effective_batch(t))
    steps = max(1, math.ceil(t.epochs * per_epoch))
    what = f"{len(lengths):,} rows in {units:,} bins" if t.pack_length else f"{units:,} rows"
    print(f"train.epochs = {t.epochs:g}: {steps} steps ({what}, {effective_batch(t)} a step, {per_epoch} an epoch)")
    # The steps replace the epochs: what the training processes, the run folder and the saved
    # config see is the number of steps that really run.
    return cfg.model_copy(update={"train": t.model_copy(update={"max_steps": steps, "epochs": None})})


# A progress line as the training process prints it (chat_doctor/train_callbacks.py Progress).
PROGRESS = re.compile(r"^step (\d+)/(\d+) \(\d+%\) loss (\S+), ([\d,]+) tokens/s, ETA (\d+:\d\d)")


def run_train(
    cfg: Config, tokenized: dict[str, str], mlflow_run_id: str | None = None, on_progress=None
) -> dict[str, str]:
    """Train in child process(es), so that out-of-memory frees all of its memory; return the outputs.

    `on_progress`, if given, gets {step, steps, loss, tokens_per_s, eta} at each logging step.

    Raises OutOfMemory (after recording half the micro-batch for the next attempt, which resumes
    from the last complete checkpoint) or TrainingFailed for anything else, a kill included.
    """
    check_device(cfg)  # also checked before the data steps; this step can be run on its own
    world = processes(cfg) * cfg.train.nnodes
    if cfg.train.strategy == "fsdp" and world == 1:
        raise ConfigError("train.strategy = fsdp shards the model over several GPUs, but only one is in use")
    split_for_processes(cfg.train, world)  # refuses a batch that does not split, before anything loads
    cfg = steps_for_epochs(cfg, tokenized["train"])
    run_dir = run_dir_for(cfg, tokenized)
    cfg = _apply_micro_batch(cfg, run_dir)
    spec = run_dir / "attempt.json"
    write_json(spec, {"config": cfg.model_dump(), "tokenized": tokenized, "mlflow_run_id": mlflow_run_id})
    for old in run_dir.glob("outcome*.json"):
        old.unlink()
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
    # The children's stdout (progress lines with ETA) is relayed line by line into this step's log.
    # Compiled code (train.compile) is cached in the project, not in the user's temp folder.
    env = {**os.environ}
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(RUNS_ROOT, "compile-cache").resolve()))
    with subprocess.Popen(launch_command(cfg, spec), stdout=subprocess.PIPE, text=True, env=env) as child:
        for line in child.stdout:
            print(line.rstrip(), flush=True)
            if on_progress and (found := PROGRESS.match(line)):
                step, steps, loss, rate, eta = found.groups()
                on_progress({"step": int(step), "steps": int(steps), "loss": loss, "tokens_per_s": rate, "eta": eta})
    results = _outcomes(run_dir)
    if child.returncode == 0 and results and results[0].get("adapter"):
        return results[0]
    failed = [r for r in results if "error" in r]
    if any(r.get("oom") for r in failed):
        raise OutOfMemory(_halve_micro_batch(cfg, run_dir, next(r["error"] for r in failed if r.get("oom"))))
    reason = failed[0]["error"] if failed else f"the training process ended with exit code {child.returncode}"
    raise TrainingFailed(f"training failed: {reason}")


def main(spec_path: str) -> int:
    """Child-process entry point: run one training attempt described by `spec_path`.

    Under torchrun each process trains its share of each step; each writes its outcome
    (rank 0 to outcome.json, the others to outcome-rank<N>.json) so an OOM anywhere is seen.
    """
    spec = json.loads(Path(spec_path).read_text())
    cfg = Config.model_validate(spec["config"])
    rank = os.environ.get("RANK", "0")
    outcome = Path(spec_path).parent / ("outcome.json" if rank == "0" else f"outcome-rank{rank}.json")
    from tasks.train_recipe import train_in_process  # loads transformers: the training process only

    monitor = _system_metrics(spec["mlflow_run_id"]) if rank == "0" else None
    try:
        run_dir = Path(spec_path).parent  # the folder the step made for this attempt
        write_json(outcome, train_in_process(cfg, spec["tokenized"], spec["mlflow_run_id"], run_dir))
        return 0
    except Exception as err:
        write_json(outcome, {"oom": _is_oom(err), "error": f"{type(err).__name__}: {err}"})
        raise
    finally:
        if monitor:
            monitor.finish()


def _system_metrics(run_id: str | None):
    """MLflow's CPU/GPU/memory sampler on the run, for the training process's lifetime."""
    if not run_id:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from chat_doctor.tracking import tracking_uri

    monitor = SystemMetricsMonitor(run_id, sampling_interval=5, resume_logging=True, tracking_uri=tracking_uri())
    monitor.start()
    return monitor


def join(argv: list[str]) -> int:
    """`python -m tasks.train join SPEC --node-rank N`: another machine's share of a multi-node attempt.

    Node 0 (the flow's train step) writes runs/<run>/attempt.json and waits at the rendezvous; each
    other machine, with the project and runs/ on a shared filesystem, joins with its node rank.
    """
    import argparse

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
    return subprocess.run(launch_command(cfg, args.spec)).returncode


if __name__ == "__main__":
    if sys.argv[1] == "join":
        sys.exit(join(sys.argv[2:]))
    sys.exit(main(sys.argv[1]))
