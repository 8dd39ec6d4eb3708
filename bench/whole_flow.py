"""The whole `finetune` flow as a user runs it, measured step by step: wall time, peak GPU memory
(nvidia-smi: every process on the card, CUDA contexts included) and peak host memory (resident
memory of the flow's process tree: the training child and Prefect's temporary server included),
then the version it registered.

    python bench/whole_flow.py --out /tmp/flow-fast -- preset=mistral-7b model.base=/models/m7b \\
        data.source=healthcaremagic.jsonl data.rows=400
    python bench/whole_flow.py --out /tmp/flow-cpu -- train.max_steps=2     # the same on a CPU

It runs `python -m flows.finetune OVERRIDES` in the current project (so through Prefect, DVC and
MLflow exactly as documented), samples memory every 0.2 s, and reads each task run's start and end
from Prefect afterwards. Writes OUT/flow.log, OUT/steps.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

INTERVAL = 0.2


class Sampler:
    """(time, GPU MiB in use, host bytes resident) every INTERVAL seconds, in a thread."""

    def __init__(self, pid: int):
        self.pid, self.samples, self._stop = pid, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _gpu_mib(self) -> float | None:
        if not shutil.which("nvidia-smi"):
            return None
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True
        ).stdout
        return sum(float(line) for line in out.split()) if out.strip() else None

    def _host_bytes(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self._gpu_mib(), self._host_bytes()))
            self._stop.wait(INTERVAL)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peaks(self, start: float, end: float) -> tuple[float | None, float]:
        """(GPU GiB, host GiB) at their highest between start and end (the nearest sample if none)."""
        inside = [s for s in self.samples if start <= s[0] <= end] or [
            min(self.samples, key=lambda s: abs(s[0] - start))
        ]
        gpu = [s[1] for s in inside if s[1] is not None]
        return (max(gpu) / 1024 if gpu else None), max(s[2] for s in inside) / 2**30


async def _task_runs() -> tuple[str, list[dict]]:
    """The newest `finetune` flow run's id and its task runs (name, state, start, end)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        flow_runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["finetune"])), sort=FlowRunSort.START_TIME_DESC, limit=1
        )
        flow_run = flow_runs[0]
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    rows = [
        {
            "name": t.name,
            "state": t.state_name,
            "start": t.start_time.timestamp() if t.start_time else None,
            "end": t.end_time.timestamp() if t.end_time else None,
        }
        for t in tasks
    ]
    return str(flow_run.id), rows


def task_runs() -> tuple[str, list[dict]]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from chat_doctor.orchestration.prefect_api import api_url_for_this_run

    url = api_url_for_this_run()
    with temporary_settings(updates={PREFECT_API_URL: url} if url else {}):
        return asyncio.run(_task_runs())


def registered() -> dict:
    """The newest registered adapter version: number, aliases, run, and training's own peak figure."""
    import mlflow

    from chat_doctor.config import load_config
    from chat_doctor.tracking.mlflow_runs import tracking_uri

    name = load_config().registry.model_name
    client = mlflow.MlflowClient(tracking_uri())
    version = max(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    run = client.get_run(version.run_id)
    peaks = client.get_metric_history(version.run_id, "train/peak_memory_gib")
    return {
        "name": name,
        "version": int(version.version),
        "aliases": sorted(client.get_registered_model(name).aliases),
        "mlflow_run": version.run_id,
        "train_peak_allocated_gib": max((m.value for m in peaks), default=None),
        "max_steps_used": run.data.tags.get("train.max_steps_used"),
        "eval": {k: v for k, v in run.data.metrics.items() if k.startswith("eval/")},
    }


def table(steps: list[dict]) -> str:
    lines = [
        "| step | state | wall s | peak GPU GiB (nvidia-smi) | peak host GiB (RSS) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in steps:
        gpu = "-" if s["gpu_gib"] is None else f"{s['gpu_gib']:.1f}"
        lines.append(f"| {s['name']} | {s['state']} | {s['wall_s']:.1f} | {gpu} | {s['host_gib']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE, as for python -m flows.finetune")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with (args.out / "flow.log").open("w") as log:
        flow = subprocess.Popen(
            [sys.executable, "-m", "flows.finetune", *args.overrides],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        sampler = Sampler(flow.pid).start()
        for line in flow.stdout:
            print(line, end="", flush=True)
            log.write(line)
        flow.wait()
        sampler.stop()
    ended = time.time()
    flow_run_id, runs = task_runs()
    steps = []
    for run in sorted((r for r in runs if r["start"]), key=lambda r: r["start"]):
        gpu, host = sampler.peaks(run["start"], run["end"] or ended)
        name = re.sub(r"-[0-9a-f]{3}$", "", run["name"])  # Prefect's task-run suffix
        steps.append({"name": name, "state": run["state"], "wall_s": (run["end"] or ended) - run["start"]}
                     | {"gpu_gib": gpu, "host_gib": host})  # fmt: skip
    gpu, host = sampler.peaks(started, ended)
    whole = {"name": "whole flow", "state": "exit code " + str(flow.returncode), "wall_s": ended - started}
    steps.append(whole | {"gpu_gib": gpu, "host_gib": host})
    result = {"overrides": args.overrides, "flow_run": flow_run_id, "exit_code": flow.returncode, "steps": steps}
    if flow.returncode == 0:
        result["registered"] = registered()
    (args.out / "steps.json").write_text(json.dumps(result, indent=2))
    print(table(steps))
    print(json.dumps(result.get("registered"), indent=2))
    return flow.returncode


if __name__ == "__main__":
    sys.exit(main())
