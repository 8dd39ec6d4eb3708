"""Soak run: the `finetune` flow on the embedded default, many times, with faults injected.

    python bench/soak.py                          # 20 OOM runs, 10 SIGKILLs, 2 register crashes, 2 MLflow down
    python bench/soak.py --oom 2 --kill 2         # a short one
    python bench/soak.py --record                 # also append the figures to bench/RESULTS.md

It works in a fresh clone of this repository's HEAD under --workdir, with its own Prefect server,
an MLflow tracking server (sqlite store, artifacts served by it) and the clone's DVC remote, and
injects, one fault per run:
- oom: out-of-memory at a random training step (Prefect retries the step at half the micro-batch);
- kill: SIGKILL of the training process at a random step, or while a checkpoint is being written;
  then `prefect flow-run retry` (training resumes from the last complete checkpoint);
- register-crash: the served deployment's flow process SIGKILLed between creating a registry version
  and completing it; then `prefect flow-run retry`, which must delete the half-written version;
- mlflow-down: the MLflow server killed while `register` runs, started again, the run retried:
  train, merge and evaluate must come from Prefect's cache, not run again.
Every run is checked (state, train loss steps, one complete registry version that loads), then the
whole registry is audited. Goal: every run finished correctly, 0 versions lost or half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.processes import free_port, mlflow_server_command, stop_when_idle, task_states
from chat_doctor.config.presets import QUICK_EVAL
from chat_doctor.core import faults

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "chat-doctor-adapter"
STEPS = 6
# On the tiny random base: the soak is about faults and recovery, and dozens of runs must be quick.
RUN = {"preset": "cpu-tiny", "train.max_steps": STEPS, "train.save_steps": 2, "train.logging_steps": 1}


def wait_for(check, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            raise TimeoutError(f"{what} did not happen in {timeout:.0f} s")
        time.sleep(0.5)


def answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


class Soak:
    def __init__(self, workdir: Path, rng: random.Random):
        self.root = workdir / "project"
        self.rng = rng
        subprocess.run(["git", "clone", "-q", str(REPO), str(self.root)], check=True)
        prefect_port, self.mlflow_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(self.root),
            "PREFECT_HOME": str(workdir / "prefect-home"),
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.mlflow_port}",
            # Fail fast while the store is down (the default retries for minutes).
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
        os.environ.update({k: v for k, v in self.env.items() if k.startswith(("PREFECT_", "MLFLOW_"))})
        self.logs = workdir / "logs"
        self.logs.mkdir()
        self.prefect = self._spawn(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)])
        wait_for(lambda: answers(f"{self.env['PREFECT_API_URL']}/health"), "the Prefect server answering")
        self.mlflow = None
        self.start_mlflow()

    def _spawn(self, command: list[str], env: dict | None = None, log: str | None = None) -> subprocess.Popen:
        out = open(self.logs / (log or f"{command[0]}.log"), "a")  # noqa: SIM115 - the child writes it
        return subprocess.Popen(
            [str(BIN / command[0]), *command[1:]],
            cwd=self.root,
            env=env or self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a kill takes its workers too
        )

    def start_mlflow(self) -> None:
        command = mlflow_server_command(self.root, self.mlflow_port)
        self.mlflow = self._spawn(command)
        wait_for(lambda: answers(f"http://127.0.0.1:{self.mlflow_port}/health"), "the MLflow server answering")

    def kill_mlflow(self) -> None:
        os.killpg(self.mlflow.pid, signal.SIGKILL)
        self.mlflow.wait()

    def close(self) -> None:
        for proc in (self.mlflow, self.prefect):
            if proc and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)

    # --- running and retrying flow runs ---------------------------------------------------------

    def start_flow(self, overrides: dict, armed: dict[str, str], name: str) -> tuple[subprocess.Popen, list[str]]:
        """`python -m flows.finetune KEY=VALUE ...` with the faults `armed`; its output lines, live."""
        args = [f"{key}={value}" for key, value in overrides.items()]
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.finetune", *args],
            cwd=self.root,
            env={**self.env, **armed},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[str] = []
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - written by the reader thread

        def read() -> None:
            for line in proc.stdout:
                lines.append(line)
                log.write(line)
                log.flush()

        threading.Thread(target=read, daemon=True).start()
        return proc, lines

    def flow_run_id(self, lines: list[str]) -> str:
        wait_for(lambda: any("flow-run/" in line for line in lines), "the flow run starting", timeout=120)
        line = next(line for line in lines if "flow-run/" in line)
        return re.search(r"flow-run/([0-9a-f-]{36})", line).group(1)

    def retry(self, flow_run_id: str, name: str, entrypoint: bool = True) -> None:
        command = ["prefect", "flow-run", "retry", flow_run_id]
        command += ["--entrypoint", "flows/finetune.py:finetune"] if entrypoint else []
        self._spawn(command, log=f"{name}-retry.log").wait(timeout=900)

    def state(self, flow_run_id: str):
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id).state

    def wait_final(self, flow_run_id: str, timeout: float = 900):
        wait_for(lambda: self.state(flow_run_id).is_final(), f"flow run {flow_run_id} ending", timeout)
        return self.state(flow_run_id)

    def task_states(self, flow_run_id: str) -> dict[str, str]:
        return task_states(flow_run_id)

    # --- checks ------------------------------------------------------------------------------------

    def mlflow_run(self, flow_run_id: str):
        from chat_doctor.tracking.mlflow_runs import client

        mlflow_client = client()
        experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
        (run,) = mlflow_client.search_runs(experiments, f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
        return run

    def check_run(self, flow_run_id: str) -> list[str]:
        """What is wrong with a finished run: state, loss steps, its registry version."""
        from chat_doctor.tracking.mlflow_runs import client
        from chat_doctor.tracking.registry import is_complete, versions_of_run

        problems = []
        state = self.state(flow_run_id)
        if not state.is_completed():
            return [f"flow run ended {state.name}"]
        run = self.mlflow_run(flow_run_id)
        steps = {m.step for m in client().get_metric_history(run.info.run_id, "train/loss")}
        if steps != set(range(1, STEPS + 1)):
            problems.append(f"train/loss steps {sorted(steps)}")
        if run.info.status != "FINISHED":
            problems.append(f"MLflow run {run.info.status}")
        versions = versions_of_run(MODEL, run.info.run_id)
        if len(versions) != 1 or not is_complete(versions[0]):
            found = [(v.version, v.tags.get("registration")) for v in versions]
            problems.append(f"registry versions of the run: {found}")
        return problems

    def audit(self) -> dict:
        """Every registry version complete, its adapter downloadable and readable; aliases valid."""
        from safetensors.torch import load_file

        from chat_doctor.tracking.mlflow_runs import client
        from chat_doctor.tracking.registry import download_adapter, is_complete

        mlflow_client = client()
        versions = mlflow_client.search_model_versions(f"name = '{MODEL}'")
        half_written, unreadable = [], []
        for version in versions:
            if not is_complete(version):
                half_written.append(int(version.version))
                continue
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    adapter = download_adapter(MODEL, version.version, Path(tmp))
                    assert any("lora_B" in key for key in load_file(adapter / "adapter_model.safetensors"))
                except Exception as err:  # any failure is a lost version
                    unreadable.append(f"v{version.version}: {type(err).__name__}: {err}")
        aliases = mlflow_client.get_registered_model(MODEL).aliases if versions else {}
        numbers = {int(v.version) for v in versions} - set(half_written)
        dangling = {alias: v for alias, v in aliases.items() if int(v) not in numbers}
        return {
            "versions": len(versions),
            "half_written": half_written,
            "unreadable": unreadable,
            "dangling_aliases": dangling,
        }


# --- the faults ------------------------------------------------------------------------------------


def overrides(i: int) -> dict:
    # A seed of its own per run: a new run folder, so each run trains (and meets its fault) afresh.
    return {**RUN, **QUICK_EVAL, "train.seed": 1000 + i}


def oom_run(soak: Soak, i: int) -> dict:
    step = soak.rng.randint(1, STEPS)
    proc, lines = soak.start_flow(overrides(i), faults.env(oom_at_step=step), f"run{i}-oom")
    flow_run_id = soak.flow_run_id(lines)
    proc.wait()
    # The training process announces each fault it injects; no announcement, no fault was met.
    injected = any(f"fault injection ({faults.FAULTS_ENV}): oom_at_step={step}" in line for line in lines)
    problems = soak.check_run(flow_run_id)
    if not problems:
        tags = soak.mlflow_run(flow_run_id).data.tags
        if tags.get("train.micro_batch_size_used") != "2":
            problems.append(f"micro-batch after OOM: {tags.get('train.micro_batch_size_used')} (expected 2)")
    return {"fault": f"OOM at step {step}", "flow_run": flow_run_id, "injected": injected, "problems": problems}


def _training_process(flow: subprocess.Popen):
    import psutil

    for child in psutil.Process(flow.pid).children(recursive=True):
        if "tasks.train" in " ".join(child.cmdline()):
            return child
    return None


def kill_run(soak: Soak, i: int) -> dict:
    mid_checkpoint = soak.rng.random() < 0.4
    armed, injected = {}, True
    if mid_checkpoint:
        step = soak.rng.choice(range(2, STEPS + 1, 2))
        armed = faults.env(kill_at_save=step)
        fault = f"SIGKILL while checkpoint-{step} is written"
    proc, lines = soak.start_flow(overrides(i), armed, f"run{i}-kill")
    flow_run_id = soak.flow_run_id(lines)
    if not mid_checkpoint:
        step, delay = soak.rng.randint(1, STEPS), round(soak.rng.uniform(0, 1.5), 2)
        fault = f"SIGKILL {delay} s after step {step}"
        wait_for(lambda: any(f"step {step}/{STEPS}" in line for line in lines) or proc.poll() is not None, "step")
        time.sleep(delay)
        child = _training_process(proc)
        injected = child is not None
        if child:
            child.send_signal(signal.SIGKILL)
    proc.wait()
    first = soak.state(flow_run_id).name
    if first == "Failed":
        soak.retry(flow_run_id, f"run{i}-kill")
    problems = soak.check_run(flow_run_id)
    injected = injected and first == "Failed"
    return {"fault": fault, "flow_run": flow_run_id, "injected": injected, "problems": problems}


def register_crash_run(soak: Soak, i: int) -> dict:
    """Through the served deployment, as users run it: the runner marks the killed run Crashed."""
    from chat_doctor.tracking.registry import versions_of_run

    env = {**soak.env, **faults.env(kill_in_register="after-version")}
    server = soak._spawn([Path(sys.executable).name, "-m", "flows.deploy"], env=env, log=f"run{i}-serve.log")
    try:
        wait_for(lambda: not soak._spawn(["prefect", "deployment", "inspect", "finetune/default"]).wait(), "deploy")
        params = json.dumps(overrides(i))
        out = subprocess.run(
            [BIN / "prefect", "deployment", "run", "finetune/default", "--param", f"overrides={params}"],
            cwd=soak.root,
            env=soak.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
        first = soak.wait_final(flow_run_id).name
        left = versions_of_run(MODEL, soak.mlflow_run(flow_run_id).info.run_id)
        half = [v.version for v in left if v.tags.get("registration") == "incomplete"]
        soak.retry(flow_run_id, f"run{i}-crash", entrypoint=False)
        soak.wait_final(flow_run_id)
    finally:
        stop_when_idle(server)
    problems = soak.check_run(flow_run_id)
    if soak.task_states(flow_run_id).get("train") != "Cached":
        problems.append("training ran again on the retry")
    fault = f"flow process SIGKILLed mid-registration (run {first}, half-written versions left: {half})"
    injected = first == "Crashed" and bool(half)
    return {"fault": fault, "flow_run": flow_run_id, "injected": injected, "problems": problems}


def mlflow_down_run(soak: Soak, i: int) -> dict:
    proc, lines = soak.start_flow(overrides(i), {}, f"run{i}-mlflow-down")
    flow_run_id = soak.flow_run_id(lines)
    wait_for(lambda: soak.task_states(flow_run_id).get("register") == "Running", "register starting", timeout=600)
    delay = round(soak.rng.uniform(0, 4), 2)
    time.sleep(delay)
    soak.kill_mlflow()
    proc.wait()
    first = soak.state(flow_run_id).name
    soak.start_mlflow()
    from chat_doctor.tracking.mlflow_runs import client

    run = soak.mlflow_run(flow_run_id)
    steps_before = len(client().get_metric_history(run.info.run_id, "train/loss"))
    if first == "Failed":
        soak.retry(flow_run_id, f"run{i}-mlflow-down")
    problems = soak.check_run(flow_run_id)
    states = soak.task_states(flow_run_id)
    redone = [name for name in ("train", "merge", "evaluate") if states.get(name) != "Cached"]
    if redone:
        problems.append(f"redone on the retry: {redone}")
    if len(client().get_metric_history(run.info.run_id, "train/loss")) != steps_before:
        problems.append("new train/loss points after the retry")
    fault = f"MLflow server killed {delay} s into register"
    return {"fault": fault, "flow_run": flow_run_id, "injected": first == "Failed", "problems": problems}


FAULTS = {"oom": oom_run, "kill": kill_run, "register-crash": register_crash_run, "mlflow-down": mlflow_down_run}


def stop_flows() -> None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        if any(word in " ".join(child.cmdline()) for word in ("flows.finetune", "flows.deploy", "flow-run")):
            child.kill()


def record(summary: dict, command: str) -> None:
    import torch
    import transformers

    kinds = ", ".join(f"{kind} {n}" for kind, n in summary["by_kind"].items())
    text = f"""
## Soak: the flow under injected faults, embedded default on a CPU ({date.today()})

- Machine: {os.cpu_count()} CPU cores, no GPU. torch {torch.__version__}, transformers {transformers.__version__}.
- Command: `{command}`

| figure | value |
| --- | --- |
| flow runs | {summary["runs"]} ({kinds}) |
| faults injected (took effect) | {summary["injected"]} |
| runs that finished correctly | {summary["correct"]} |
| registry versions | {summary["audit"]["versions"]} |
| versions lost or half-written | {summary["lost_or_half_written"]} |
| wall time | {summary["minutes"]:.1f} min |
"""
    with open(REPO / "bench" / "RESULTS.md", "a") as fh:
        fh.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--oom", type=int, default=20, help="runs with out-of-memory at a random step")
    parser.add_argument("--kill", type=int, default=10, help="runs with training SIGKILLed")
    parser.add_argument("--register-crash", type=int, default=2, help="runs killed mid-registration")
    parser.add_argument("--mlflow-down", type=int, default=2, help="runs that lose the MLflow server in register")
    parser.add_argument("--max-minutes", type=float, default=120, help="start no new run after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    plan = ["oom"] * args.oom + ["kill"] * args.kill
    plan += ["register-crash"] * args.register_crash + ["mlflow-down"] * args.mlflow_down
    rng.shuffle(plan)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chat-doctor-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"soak: {len(plan)} runs in {workdir}", flush=True)
    start = time.time()
    soak = Soak(workdir, rng)
    sys.path.insert(0, str(soak.root))
    os.chdir(soak.root)
    results = []
    try:
        for i, kind in enumerate(plan, 1):
            if time.time() - start > args.max_minutes * 60:
                print(f"time limit: {len(plan) - i + 1} runs not started", flush=True)
                break
            began = time.time()
            try:
                result = FAULTS[kind](soak, i)
            except Exception as err:  # a harness failure is a failed run
                result = {"fault": kind, "injected": False, "problems": [f"{type(err).__name__}: {err}"]}
                stop_flows()  # none may run on beside the next one
            result.update(kind=kind, seconds=round(time.time() - began))
            results.append(result)
            verdict = "ok" if not result["problems"] else "PROBLEM " + "; ".join(result["problems"])
            print(f"[{i:2}/{len(plan)}] {kind:14} {result['fault']}: {verdict} ({result['seconds']} s)", flush=True)
        audit = soak.audit()
    finally:
        soak.close()
    by_kind = {kind: sum(r["kind"] == kind for r in results) for kind in FAULTS}
    summary = {
        "runs": len(results),
        "by_kind": {k: n for k, n in by_kind.items() if n},
        "injected": sum(r["injected"] for r in results),
        "correct": sum(not r["problems"] for r in results),
        "audit": audit,
        "lost_or_half_written": len(audit["half_written"]) + len(audit["unreadable"]) + len(audit["dangling_aliases"]),
        "minutes": (time.time() - start) / 60,
        "results": results,
    }
    (workdir / "soak.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nruns {summary['runs']} {summary['by_kind']} | faults injected {summary['injected']} | "
        f"finished correctly {summary['correct']} | registry versions {audit['versions']} | "
        f"lost or half-written {summary['lost_or_half_written']} ({audit}) | {summary['minutes']:.1f} min"
    )
    if args.record:
        shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--workdir" and a != str(args.workdir)]
        record(summary, "python bench/soak.py " + " ".join(shown))
    return 0 if summary["correct"] == summary["runs"] and summary["lost_or_half_written"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
