"""Data-parallel scaling of the train step: 1, 2 and 4 GPUs, two "nodes" on one host, and FSDP.

    python bench/gpu_scaling.py --rows <real rows> --tokenizer <tokenizer folder> [--gpus 1,2,4]

Each case is the pipeline's own train step (`run_train`: torchrun, one process per GPU) with the
`mistral-7b` preset on Mistral-7B shapes (random weights) and the real rows, at the preset's
effective batch (16 bins of <= 1,536 tokens a step, split over the GPUs). Real tokens/s is read from the step's
progress lines (all processes' tokens over rank 0's clock), averaged after the warm-up steps.
The two-node case starts node 0 through `run_train` on the first half of the GPUs and node 1 with
`python -m tasks.train join` on the second half, meeting at a c10d rendezvous on 127.0.0.1.
The FSDP case (train.strategy = fsdp, 2 GPUs, layer checkpointing) is a smoke test: it must
train and write an adapter. `--set KEY=VALUE` changes every case (e.g. train.micro_batch_size=32
with train.grad_accum=2: more tokens per process and step at the same effective batch).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROGRESS = re.compile(r"step (\d+)/\d+ .* loss ([\d.]+), ([\d,]+) tokens/s")


def case_config(name: str, model: str, steps: int, extra: dict):
    from chat_doctor.config import build_config, deep_merge

    raw = deep_merge(
        {
            "preset": "mistral-7b",
            "runs_dir": f"runs/scaling-{name}",
            "model": {"base": model},
            "train": {"max_steps": steps, "logging_steps": 1, "save_steps": 10**6},
        },
        extra,
    )
    return build_config(raw, source=f"case {name}")


def run_case(args) -> None:
    """Child: one case through run_train, as the flow's train step runs it."""
    from tasks.train import run_train

    cfg = case_config(args.case, args.model, args.steps, json.loads(args.extra))
    tokenized = {"train": str(args.work / "train.arrow")}
    out = run_train(cfg, tokenized)
    print("RESULT " + json.dumps(out), flush=True)


def figures(output: str, warmup: int) -> dict:
    steps = [
        (int(m[1]), float(m[2]), float(m[3].replace(",", ""))) for m in map(PROGRESS.search, output.splitlines()) if m
    ]
    timed = [tps for step, _, tps in steps if step > warmup]
    return {
        "tokens_per_s": round(statistics.mean(timed), 1) if timed else None,
        "losses": [loss for _, loss, _ in steps],
        "adapter_written": '"adapter"' in output and "RESULT " in output,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", action="append")
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--gpus", default="1,2,4")
    parser.add_argument("--cases", default="ddp,two-nodes,fsdp")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every case, e.g. train.micro_batch_size=32")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler over steps 3-4 of every process, into <work>/profile/<case> "
                        "(use --warmup 5: profiled steps are slower)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("/tmp/chat-doctor-speed"))
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        return run_case(args)

    import shutil

    from bench.gpu_speed import prepare

    args.base = "mistral-7b-random"
    data = prepare(args)
    for old in (ROOT / "runs").glob("scaling-*"):
        shutil.rmtree(old)
    model = data["model"]
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve()), "--work", str(args.work), "--model", model,
          "--steps", str(args.steps)]  # fmt: skip

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")

    def physical(gpus: str) -> str:
        """GPU numbers of this run among those the bench itself was given (CUDA_VISIBLE_DEVICES)."""
        return ",".join(visible[int(i)] if visible != [""] else i for i in gpus.split(","))

    from chat_doctor.config import deep_merge, parse_overrides

    common = parse_overrides(args.set)

    def start(name: str, gpus: str, extra: dict) -> subprocess.Popen:
        extra = deep_merge(common, extra)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": physical(gpus)}
        if args.profile:
            env["CHAT_DOCTOR_PROFILE"] = str(args.work / "profile" / name)
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        return subprocess.Popen([*me, "--case", name, "--extra", json.dumps(extra)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    def finish(name: str, proc: subprocess.Popen) -> dict:
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
        output = (logs / f"{name}.log").read_text()
        result = {**figures(output, args.warmup), "exit": proc.returncode}
        if proc.returncode != 0:
            result["error"] = "\n".join(output.strip().splitlines()[-5:])
        print(f"{name}: {json.dumps(result)}", flush=True)
        return result

    results: dict[str, dict] = {}
    cases = args.cases.split(",")
    if "ddp" in cases:
        for n in map(int, args.gpus.split(",")):
            name = f"{n}-gpu"
            results[name] = finish(name, start(name, gpu_list(0, n), {"train": {"gpus": n}}))
    if "two-nodes" in cases:
        half = max(map(int, args.gpus.split(","))) // 2  # each "node" gets half the GPUs
        two = {"train": {"gpus": half, "nnodes": 2, "rdzv_endpoint": "127.0.0.1:29533"}}
        node0 = start("two-nodes", gpu_list(0, half), two)
        spec = _wait_for_spec(ROOT / "runs" / "scaling-two-nodes", node0)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": physical(gpu_list(half, 2 * half))}
        with open(logs / "two-nodes-node1.log", "w") as log:
            node1 = subprocess.Popen([sys.executable, "-m", "tasks.train", "join", str(spec), "--node-rank", "1"],
                                     cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            name = f"2 nodes x {half} GPUs"
            results[name] = finish("two-nodes", node0)
            node1.wait(timeout=60)
            results[name]["node1_exit"] = node1.returncode
    if "fsdp" in cases:
        fsdp = {"train": {"gpus": 2, "strategy": "fsdp", "gradient_checkpointing": True}}
        results["fsdp 2 GPUs"] = finish("fsdp", start("fsdp", "0,1", fsdp))

    one = results.get("1-gpu", {}).get("tokens_per_s")
    lines = ["| case | real tokens/s | x 1 GPU | adapter written | losses |", "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        tps = r.get("tokens_per_s")
        speedup = f"{tps / one:.2f}" if tps and one else "-"
        losses = ", ".join(f"{x:.2f}" for x in r["losses"][:: max(len(r["losses"]) // 4, 1)])
        lines.append(
            f"| {name} | {f'{tps:,.0f}' if tps else 'failed'} | {speedup} | {r['adapter_written']} | {losses} |"
        )
    report = "\n".join(lines)
    print(report)
    (args.work / "scaling.json").write_text(json.dumps({"results": results, "when": time.strftime("%Y-%m-%d")}))
    (args.work / "scaling.md").write_text(report + "\n")


def gpu_list(first: int, stop: int) -> str:
    """GPU numbers first .. stop-1 as CUDA_VISIBLE_DEVICES spells them."""
    return ",".join(map(str, range(first, stop)))


def _wait_for_spec(runs: Path, node0: subprocess.Popen) -> Path:
    """Node 0 writes its attempt spec before it launches; node 1 joins with that file."""
    for _ in range(600):
        found = list(runs.glob("run-*/attempt.json"))
        if found:
            return found[0]
        if node0.poll() is not None:
            raise SystemExit("node 0 ended before writing its attempt spec")
        time.sleep(0.2)
    raise SystemExit("node 0 wrote no attempt spec in 120 s")


if __name__ == "__main__":
    main()
