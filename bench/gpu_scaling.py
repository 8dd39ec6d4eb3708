"""Data-parallel scaling of the train step: 1, 2 and 4 GPUs, two "nodes" on one host, and FSDP.

    python bench/gpu_scaling.py --rows <HealthCareMagic rows> --tokenizer <tokenizer folder> \
        [--gpus 1,2,4] [--record]

Each case is the pipeline's own train step (`run_train`: torchrun, one process per GPU) with the
`mistral-7b` preset on Mistral-7B shapes (random weights) and the real rows (cycled to --tokens so
no step reads a row twice), at the preset's effective batch (16 bins of <= 1,536 tokens a step,
split over the GPUs). Real tokens/s is read from the step's progress lines (all processes' tokens
over rank 0's clock): the median of the steps after the warm-up.
The two-node case starts node 0 through `run_train` on the first half of the GPUs and node 1 with
`python -m tasks.train join` on the second half, meeting at a c10d rendezvous on 127.0.0.1.
The FSDP case (train.strategy = fsdp, 2 GPUs, layer checkpointing) must train and write an adapter
that loads onto the 4-bit base. `--set KEY=VALUE` changes every case (e.g. train.micro_batch_size=32
with train.grad_accum=2: more tokens per process and step at the same effective batch).

Checks (scaling_checks): each case's losses step by step against one GPU's (the same bins make each
step, so they agree within bf16 noise), and the speed-ups against the goals (GOAL_PER_GPU); a case
that had nothing to be compared with fails. --record appends the table to bench/RESULTS.md.
`--base tiny --set train.kernels=none --set train.attention=sdpa --cases ddp,two-nodes --gpus 1,2`
tries the harness on a CPU (gloo).
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
    from bench.speed_probe import emit
    from chat_doctor.core.records import Tokenized
    from tasks.train import run_train

    cfg = case_config(args.case, args.model, args.steps, json.loads(args.extra))
    trained = run_train(cfg, Tokenized.at(args.work))  # the case reads train.arrow there
    emit({"run_dir": str(trained.run.root), "adapter": str(trained.run.adapter)})


# Goals of the scaling issue, as a share of n x one GPU's tokens/s: 2 GPUs 1.9x, 4 GPUs 3.8x, and two
# nodes x 2 GPUs 3.6x (the nodes talk over a slower link in real life).
GOAL_PER_GPU = {"ddp": 0.95, "nodes": 0.9}
LOSS_GAP = 0.03  # bf16 reductions in another order move a loss by far less; a broken split by far more
MIN_TIMED_STEPS = 20


def figures(output: str, warmup: int) -> dict:
    from bench.speed_probe import last_result

    steps = [
        (int(m[1]), float(m[2]), float(m[3].replace(",", ""))) for m in map(PROGRESS.search, output.splitlines()) if m
    ]
    timed = [tps for step, _, tps in steps if step > warmup]
    result = last_result(output) or {}
    return {
        "tokens_per_s": round(statistics.median(timed), 1) if timed else None,
        "tokens_per_s_mean": round(statistics.mean(timed), 1) if timed else None,
        "timed_steps": len(timed),
        "losses": [loss for _, loss, _ in steps],
        "adapter": result.get("adapter"),
    }


def scaling_checks(results: dict) -> dict[str, str]:
    """A verdict per case naming what it was compared with; a case compared with nothing fails."""
    one = results.get("1-gpu", {})
    verdicts = {}
    for name, r in results.items():
        problems, compared = [], []
        if not r.get("tokens_per_s"):
            verdicts[name] = f"FAILED: no timed steps ({(r.get('error') or 'no progress lines')[-160:]})"
            continue
        if r["timed_steps"] < MIN_TIMED_STEPS:
            problems.append(f"only {r['timed_steps']} timed steps")
        losses = r["losses"]
        if len(losses) > 1 and not losses[-1] < losses[0]:
            problems.append(f"loss did not fall ({losses[0]} -> {losses[-1]})")
        if name != "1-gpu":
            ref = one.get("losses")
            if ref and len(ref) == len(losses):
                gap = max(abs(a - b) / b for a, b in zip(losses, ref, strict=True))
                r["max_rel_loss_gap_to_1_gpu"] = round(gap, 4)
                compared.append(f"loss within {gap:.2%} of 1 GPU step by step")
                if gap > LOSS_GAP:
                    problems.append(f"loss differs from 1 GPU's by {gap:.1%}")
            else:
                problems.append("no 1-GPU losses of the same steps to compare with")
        goal = r.get("processes", 1) * GOAL_PER_GPU[r["kind"]] if r.get("kind") in GOAL_PER_GPU else None
        if goal and r.get("processes", 1) > 1:
            if one.get("tokens_per_s"):
                speedup = r["tokens_per_s"] / one["tokens_per_s"]
                r["x_1_gpu"] = round(speedup, 2)
                compared.append(f"{speedup:.2f}x 1 GPU (goal {goal:.1f}x)")
                if speedup < goal:
                    problems.append(f"{speedup:.2f}x 1 GPU, below the goal {goal:.1f}x")
            else:
                problems.append("no 1-GPU figure in this run")
        if "adapter_check" in r:
            (compared if r["adapter_check"].startswith("loads") else problems).append(r["adapter_check"])
        if name == "1-gpu":
            compared.append(f"{len(losses)} steps train")
        if not compared:
            problems.append("compared with nothing")
        if problems:
            seen = f" (compared: {', '.join(compared)})" if compared else ""
            verdicts[name] = "FAILED: " + "; ".join(problems) + seen
        else:
            verdicts[name] = "ok: " + ", ".join(compared)
    return verdicts


def adapter_check(cfg, adapter: str | None, reference: str | None) -> str:
    """Does the adapter load onto the 4-bit base (the pipeline's own loader), with trained weights
    named and shaped as one GPU's?"""
    from safetensors.torch import load_file

    from chat_doctor.models.loading import load_adapter, load_base_model

    if not adapter:
        return "no adapter written"
    try:
        model = load_adapter(load_base_model(cfg.model, quantized=True), adapter)
    except Exception as err:  # the verdict says what failed; the bench goes on
        return f"adapter does not load: {err}"
    del model
    weights = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    if not any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k):
        return "adapter loads, but every lora_B is zero: nothing was trained"
    if reference:
        ref = load_file(str(Path(reference) / "adapter_model.safetensors"))
        if {k: tuple(t.shape) for k, t in ref.items()} != {k: tuple(t.shape) for k, t in weights.items()}:
            return "adapter loads, but its tensors differ in names or shapes from 1 GPU's"
    return f"loads: {len(weights)} tensors" + (", named and shaped as 1 GPU's" if reference else "")


def table(results: dict, verdicts: dict) -> str:
    lines = [
        "| case | processes | bins a step (each process: micro-batch x accumulation) | real tokens/s, median "
        "(mean) | x 1 GPU | check |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        tps = r.get("tokens_per_s")
        speed = f"{tps:,.0f} ({r['tokens_per_s_mean']:,.0f})" if tps else "failed"
        lines.append(
            f"| {name} | {r.get('processes', '-')} | {r.get('bins', '-')} | {speed} | {r.get('x_1_gpu', '-')} | "
            f"{verdicts.get(name, '-')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", action="append")
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--gpus", default="1,2,4")
    parser.add_argument("--cases", default="ddp,two-nodes,fsdp")
    parser.add_argument("--steps", type=int, default=22, help="optimizer steps per case, the warm-up included")
    parser.add_argument("--tokens", type=int, default=700_000, help="real rows are cycled up to this many tokens")
    parser.add_argument("--base", default="mistral-7b-random", help="mistral-7b-random, or tiny to try it on a CPU")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
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

    started = time.strftime("%Y-%m-%d")
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

    from chat_doctor.config import deep_merge, parse_overrides, split_for_processes

    common = parse_overrides(args.set)

    def start(name: str, gpus: str, extra: dict) -> subprocess.Popen:
        extra = deep_merge(common, extra)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": physical(gpus)}
        if args.profile:
            env["CHAT_DOCTOR_PROFILE"] = str(args.work / "profile" / name)
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        return subprocess.Popen([*me, "--case", name, "--extra", json.dumps(extra)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    def finish(name: str, proc: subprocess.Popen, kind: str, extra: dict) -> dict:
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
        output = (logs / f"{name}.log").read_text()
        cfg = case_config(name, model, args.steps, deep_merge(common, extra))
        world = cfg.train.gpus * cfg.train.nnodes
        micro, accum = split_for_processes(cfg.train, world)
        result = {**figures(output, args.warmup), "exit": proc.returncode, "kind": kind, "processes": world,
                  "bins": f"{micro * accum * world} ({micro} x {accum})"}  # fmt: skip
        if proc.returncode != 0:
            result["error"] = "\n".join(output.strip().splitlines()[-5:])
        print(f"{name}: {json.dumps(result)}", flush=True)
        return result

    results: dict[str, dict] = {}
    cases = args.cases.split(",")
    if "ddp" in cases:
        for n in map(int, args.gpus.split(",")):
            name, extra = f"{n}-gpu", {"train": {"gpus": n}}
            results[name] = finish(name, start(name, gpu_list(0, n), extra), "ddp", extra)
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
            results[name] = finish("two-nodes", node0, "nodes", two)
            node1.wait(timeout=60)
            results[name]["node1_exit"] = node1.returncode
    if "fsdp" in cases:
        fsdp = {"train": {"gpus": 2, "strategy": "fsdp", "gradient_checkpointing": True}}
        results["fsdp 2 GPUs"] = finish("fsdp", start("fsdp", "0,1", fsdp), "fsdp", fsdp)
        cfg = case_config("fsdp", model, args.steps, deep_merge(common, fsdp))
        reference = results.get("1-gpu", {}).get("adapter")
        results["fsdp 2 GPUs"]["adapter_check"] = adapter_check(cfg, results["fsdp 2 GPUs"]["adapter"], reference)

    verdicts = scaling_checks(results)
    report = table(results, verdicts)
    print(report)
    (args.work / "scaling.json").write_text(json.dumps({"results": results, "checks": verdicts, "when": started}))
    (args.work / "scaling.md").write_text(report + "\n")
    if args.record:
        from bench.gpu_speed import command_line, record, versions

        record(
            args.work,
            f"Data-parallel scaling on HealthCareMagic rows ({started})",
            f"- Card and versions: {versions()}\n- Command: `{command_line('gpu_scaling.py')}`\n"
            f"- Data: {data['source_rows']:,} real rows cycled to {data['rows']:,} ({data['tokens']:,} tokens); "
            f"{args.steps} optimizer steps a case, the first {args.warmup} not timed.\n\n{report}\n",
        )


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
