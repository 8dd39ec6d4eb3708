"""The servers a team shares, started on one machine for trying the team set-up and for the tests:
PostgreSQL (MLflow's and Prefect's database), an S3 object store (SeaweedFS: MLflow's artifacts, the
DVC remote, training checkpoints), the MLflow tracking server, the Prefect server, the work pools with
the deployments of prefect.yaml, process workers in their own folders standing in for GPU machines,
and the control pool's worker (sweeps).

    python -m team.stack up [--workers N]   # or `make team-up`
    python -m team.stack down               # or `make team-down`

Everything is kept in the project's `.local/team/`: data, logs, pid files, and `env`, the variables a
user or a worker sets to use the stack (keys and the database password included: the file is
readable by its owner only). Ports come from the TEAM_*_PORT variables (defaults below). Secrets are
taken from the environment when set (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, CHAT_DOCTOR_DB_PASSWORD),
else made once and kept in `.local/team/secrets.env`; they are passed to servers through their
environment, never on a command line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BUCKET = "chat-doctor"
POOL = "chat-doctor"  # the GPU machines' pool: one training at a time on each worker
CONTROL_POOL = "chat-doctor-control"  # flows that only start and watch others (sweeps): no GPU, no limit
ZOMBIES = "chat-doctor-zombie-runs"  # the automation that marks a run Crashed when its machine died
DB_USER = "chatdoctor"
DATABASES = ("mlflow", "prefect")
SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "CHAT_DOCTOR_DB_PASSWORD")
PORTS = {"pg": 5433, "s3": 8333, "mlflow": 5001, "prefect": 4300}  # TEAM_PG_PORT, TEAM_S3_PORT, ...


@dataclass(frozen=True)
class Stack:
    """One stack's folder and ports."""

    project: Path
    ports: dict[str, int]

    @property
    def home(self) -> Path:
        return self.project / ".local" / "team"

    @property
    def bin(self) -> Path:
        return Path(sys.executable).parent

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def pidfile(self, name: str) -> Path:
        return self.home / f"{name}.pid"

    def log(self, name: str) -> Path:
        return self.home / f"{name}.log"


def stack_of(project: Path) -> Stack:
    ports = {name: int(os.environ.get(f"TEAM_{name.upper()}_PORT", default)) for name, default in PORTS.items()}
    return Stack(project.resolve(), ports)


# --- secrets and the variables users set ------------------------------------------------------------


def team_secrets(stack: Stack) -> dict[str, str]:
    """The keys and password: the environment's, else those made at the first `up`."""
    kept = stack.home / "secrets.env"
    found = dict(line.split("=", 1) for line in kept.read_text().splitlines() if "=" in line) if kept.exists() else {}
    values = {name: os.environ.get(name) or found.get(name) or "" for name in SECRET_NAMES}
    if not all(values.values()):
        made = {
            "AWS_ACCESS_KEY_ID": "chatdoctor" + secrets.token_hex(4),
            "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(24),
            "CHAT_DOCTOR_DB_PASSWORD": secrets.token_urlsafe(18),
        }
        values = {name: values[name] or made[name] for name in SECRET_NAMES}
    _write_private(kept, "".join(f"{name}={value}\n" for name, value in values.items()))
    return values


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("")
    temporary.chmod(0o600)  # before the secrets go in
    temporary.write_text(text)
    temporary.replace(path)


def user_env(stack: Stack, keys: dict[str, str]) -> dict[str, str]:
    """What a user's shell or a worker sets to use this stack (`source .local/team/env`)."""
    return {
        "PREFECT_API_URL": f"{stack.url('prefect')}/api",
        "MLFLOW_TRACKING_URI": stack.url("mlflow"),
        "AWS_ENDPOINT_URL": stack.url("s3"),
        "AWS_ACCESS_KEY_ID": keys["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": keys["AWS_SECRET_ACCESS_KEY"],
        "CHAT_DOCTOR_CHECKPOINTS": f"s3://{BUCKET}/checkpoints",
    }


def _database_url(stack: Stack, keys: dict[str, str], database: str, driver: str = "postgresql") -> str:
    return f"{driver}://{DB_USER}:{keys['CHAT_DOCTOR_DB_PASSWORD']}@127.0.0.1:{stack.ports['pg']}/{database}"


# --- processes ---------------------------------------------------------------------------------------


def _start(stack: Stack, name: str, command: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
    if _running(stack, name):
        print(f"{name}: running (pid {stack.pidfile(name).read_text().strip()})")
        return
    with stack.log(name).open("ab") as log:
        process = subprocess.Popen(
            command, env=env, cwd=cwd or stack.project, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    stack.pidfile(name).write_text(str(process.pid))


def _running(stack: Stack, name: str) -> bool:
    pidfile = stack.pidfile(name)
    if not pidfile.exists():
        return False
    try:
        os.kill(int(pidfile.read_text()), 0)
    except (ProcessLookupError, ValueError):
        return False
    return True


def _stop(stack: Stack, *names: str) -> None:
    """Stop processes we started, and everything each started (its session): SIGTERM to all, then
    SIGKILL to whichever is still there after 10 s."""
    pids = {}
    for name in names:
        pidfile = stack.pidfile(name)
        if pidfile.exists():
            pids[pidfile] = int(pidfile.read_text())
    for pid in pids.values():
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids.values()):
        time.sleep(0.1)
    for pidfile, pid in pids.items():
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
        pidfile.unlink(missing_ok=True)


def _signal(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, number)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(stack: Stack, name: str, url: str, what: str, seconds: float = 180, ok=(200,)) -> None:
    """Until `url` answers; fails at once, with the end of its log, when process `name` has died."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and _running(stack, name):
        try:
            with urllib.request.urlopen(url, timeout=3) as answer:
                if answer.status in ok:
                    return
        except urllib.error.HTTPError as error:
            if error.code in ok:
                return
        except OSError:
            pass
        time.sleep(0.5)
    log = stack.log(name)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise SystemExit(f"{what} did not answer at {url}; the end of {log}:\n{tail}")


def _base_env() -> dict[str, str]:
    # The servers get only what they need: none of the caller's tracking or Prefect settings.
    drop = ("PREFECT_", "MLFLOW_", "AWS_", "DVC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# --- PostgreSQL ----------------------------------------------------------------------------------------


def postgres_bin() -> Path:
    """Debian's PostgreSQL server programs (package postgresql-15)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise SystemExit("PostgreSQL is not installed: `sudo apt-get install -y postgresql-15` (Debian's package)")
    return found[-1].parent


def _as_postgres(command: list[str]) -> list[str]:
    # initdb and the server refuse to run as root: as root, run them as Debian's `postgres` user.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def start_postgres(stack: Stack, keys: dict[str, str]) -> None:
    data = stack.home / "postgres"
    programs = postgres_bin()
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        password = stack.home / "pg-password.tmp"
        _write_private(password, keys["CHAT_DOCTOR_DB_PASSWORD"] + "\n")
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
            shutil.chown(password, "postgres", "postgres")
        try:
            initdb = [str(programs / "initdb"), "-D", str(data), "-U", DB_USER, "--auth=scram-sha-256"]
            done = subprocess.run(
                _as_postgres([*initdb, f"--pwfile={password}", "-E", "UTF8", "--locale=C"]),
                capture_output=True,
                text=True,
            )
        finally:
            password.unlink(missing_ok=True)
        if done.returncode != 0:
            shutil.rmtree(data, ignore_errors=True)  # no half-made cluster for the next `up`
            raise SystemExit(f"initdb failed: {done.stderr.strip()}")
    options = f"-p {stack.ports['pg']} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
    log = stack.log("postgres")
    if os.geteuid() == 0:
        log.touch()
        shutil.chown(log, "postgres", "postgres")
    status = subprocess.run(_as_postgres([str(programs / "pg_ctl"), "-D", str(data), "status"]), capture_output=True)
    if status.returncode != 0:
        command = [str(programs / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"]
        done = subprocess.run(_as_postgres(command), capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"PostgreSQL did not start: {done.stdout}{done.stderr}; see {log}")
    _create_databases(stack, keys)


def _create_databases(stack: Stack, keys: dict[str, str]) -> None:
    import psycopg2

    connection = psycopg2.connect(_database_url(stack, keys, "postgres"))
    connection.autocommit = True
    with connection.cursor() as cursor:
        for database in DATABASES:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{database}"')
    connection.close()


def stop_postgres(stack: Stack) -> None:
    data = stack.home / "postgres"
    if (data / "postmaster.pid").exists():
        subprocess.run(_as_postgres([str(postgres_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]))


# --- the object store, MLflow, Prefect -------------------------------------------------------------------


def start_object_store(stack: Stack, keys: dict[str, str]) -> None:
    s3 = stack.ports["s3"]
    # SeaweedFS's other servers on ports beside the S3 one, so two stacks on one machine do not meet.
    command = [
        str(stack.bin / "weed"), "mini", f"-dir={stack.home / 's3'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={s3}", f"-master.port={s3 + 1}", f"-volume.port={s3 + 2}", f"-filer.port={s3 + 3}",
        f"-admin.port={s3 + 4}", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-bucket={BUCKET}",
    ]  # fmt: skip
    (stack.home / "s3").mkdir(parents=True, exist_ok=True)
    env = {**_base_env(), "AWS_ACCESS_KEY_ID": keys["AWS_ACCESS_KEY_ID"]}
    env["AWS_SECRET_ACCESS_KEY"] = keys["AWS_SECRET_ACCESS_KEY"]
    _start(stack, "s3", command, env)


def wait_for_object_store(stack: Stack, keys: dict[str, str]) -> None:
    _wait_for(stack, "s3", stack.url("s3"), "the object store", ok=(200, 403))
    _wait_for_bucket(stack, keys)


def _wait_for_bucket(stack: Stack, keys: dict[str, str]) -> None:
    import boto3
    import botocore.exceptions

    s3 = boto3.client(
        "s3",
        endpoint_url=stack.url("s3"),
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    for _ in range(120):
        try:
            s3.head_bucket(Bucket=BUCKET)
            return
        except botocore.exceptions.ClientError:
            time.sleep(0.5)
    raise SystemExit(f"bucket {BUCKET} did not appear in the object store; see {stack.log('s3')}")


def start_mlflow(stack: Stack, keys: dict[str, str]) -> None:
    env = {
        **_base_env(),
        # mlflow server reads these (its --backend-store-uri, --artifacts-destination): no password in `ps`.
        "MLFLOW_BACKEND_STORE_URI": _database_url(stack, keys, "mlflow", "postgresql+psycopg2"),
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow",
        "MLFLOW_S3_ENDPOINT_URL": stack.url("s3"),
        "AWS_ACCESS_KEY_ID": keys["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": keys["AWS_SECRET_ACCESS_KEY"],
        # The server's job runner (GenAI judges, trace roll-ups: nothing the pipeline uses) is ~10 more
        # processes and ~2 GB of memory.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    command = [str(stack.bin / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(stack.ports["mlflow"])]
    _start(stack, "mlflow", [*command, "--workers", "2"], env)


def wait_for_mlflow(stack: Stack) -> None:
    _wait_for(stack, "mlflow", f"{stack.url('mlflow')}/health", "the MLflow server")


def prefect_server_env(stack: Stack, keys: dict[str, str]) -> dict[str, str]:
    return {
        **_base_env(),
        "PREFECT_HOME": str(stack.home / "prefect-server"),
        "PREFECT_API_DATABASE_CONNECTION_URL": _database_url(stack, keys, "prefect", "postgresql+asyncpg"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def start_prefect(stack: Stack, keys: dict[str, str]) -> None:
    command = [
        str(stack.bin / "prefect"),
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(stack.ports["prefect"]),
    ]
    _start(stack, "prefect", command, prefect_server_env(stack, keys))


def wait_for_prefect(stack: Stack) -> None:
    _wait_for(stack, "prefect", f"{stack.url('prefect')}/api/health", "the Prefect server")


# --- the work pool, the deployment, the workers ------------------------------------------------------------


def client_env(stack: Stack, keys: dict[str, str], prefect_home: Path) -> dict[str, str]:
    return {**_base_env(), **user_env(stack, keys), "PREFECT_HOME": str(prefect_home)}


def deploy(stack: Stack, keys: dict[str, str]) -> None:
    """The work pools, the deployments of prefect.yaml (finetune, train-node, sweep) at the project's
    HEAD, and the zombie-runs automation. Pools and automation through Prefect's client in this
    process (one import instead of a CLI process each); the deployments as a team makes them."""
    import yaml
    from prefect.automations import AutomationCore
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    env = {**client_env(stack, keys, stack.home / "prefect-client"), "CHAT_DOCTOR_REPOSITORY": str(stack.project)}
    settings = {PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_HOME: env["PREFECT_HOME"]}
    with temporary_settings(settings), get_client(sync_client=True) as client:
        for pool in (POOL, CONTROL_POOL):
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        if not client.read_automations_by_name(ZOMBIES):
            spec = yaml.safe_load(Path(__file__).with_name("zombie_runs.yaml").read_text())
            client.create_automation(AutomationCore.model_validate(spec))
    _run([str(stack.bin / "prefect"), "--no-prompt", "deploy", "--all"], env, stack.project)


def _run(command: list[str], env: dict[str, str], cwd: Path) -> None:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(command[1:])}` failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def _start_worker(stack: Stack, keys: dict[str, str], name: str, pool: str, options: list[str], extra_env) -> None:
    folder = stack.home / name
    folder.mkdir(parents=True, exist_ok=True)
    env = client_env(stack, keys, folder / "prefect-home")
    # Each flow run gets a clone of the repository at the deployment's commit (prefect.yaml's pull step);
    # the embedded bases are built once per machine, and experiments go back to the repository.
    env.update({"CHAT_DOCTOR_MODELS_DIR": str(folder / "models"), "CHAT_DOCTOR_EXPERIMENTS_REMOTE": "origin"})
    # Heartbeats let the zombie-runs automation see a dead machine; new runs are looked for every 5 s.
    env.update({"PREFECT_RUNNER_HEARTBEAT_FREQUENCY": "30", "PREFECT_WORKER_QUERY_SECONDS": "5"})
    if os.environ.get("CHAT_DOCTOR_MODELS_DIR"):
        env["CHAT_DOCTOR_MODELS_DIR"] = os.environ["CHAT_DOCTOR_MODELS_DIR"]
    env.update(extra_env or {})
    command = [str(stack.bin / "prefect"), "worker", "start", "--pool", pool, "--name", name, *options]
    _start(stack, name, command, env, cwd=folder)


def start_worker(stack: Stack, keys: dict[str, str], number: int, extra_env: dict[str, str] | None = None) -> None:
    """A process worker in its own folder, as on its own GPU machine: one flow run at a time."""
    _start_worker(stack, keys, f"worker-{number}", POOL, ["--limit", "1"], extra_env)


def start_control_worker(stack: Stack, keys: dict[str, str]) -> None:
    """The worker of the control pool (sweeps), as on the servers' machine: it trains nothing."""
    _start_worker(stack, keys, "control", CONTROL_POOL, [], None)


def wait_for_workers(
    stack: Stack, keys: dict[str, str], names: list[str], control: tuple[str, ...] = (), seconds: float = 180
) -> None:
    """Until every worker named has reported to the Prefect server: a run started right after `up`
    must find the whole pool, not the one worker that happened to start first."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    env = client_env(stack, keys, stack.home / "prefect-client")
    settings = {PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_HOME: env["PREFECT_HOME"]}
    wanted = {POOL: set(names), CONTROL_POOL: set(control)}
    deadline = time.monotonic() + seconds
    with temporary_settings(settings), get_client(sync_client=True) as client:
        while True:
            missing = [
                name
                for pool, expected in wanted.items()
                if expected
                for name in expected - {w.name for w in client.read_workers_for_work_pool(pool) if w.status == "ONLINE"}
            ]
            if not missing:
                return
            dead = [name for name in missing if not _running(stack, name)]
            if dead or time.monotonic() > deadline:
                name = (dead or missing)[0]
                tail = stack.log(name).read_text(errors="replace")[-2000:] if stack.log(name).exists() else ""
                raise SystemExit(f"worker {name} did not join its pool; the end of {stack.log(name)}:\n{tail}")
            time.sleep(0.5)


def up(project: Path, workers: int = 2) -> Stack:
    stack = stack_of(project)
    stack.home.mkdir(parents=True, exist_ok=True)
    keys = team_secrets(stack)
    # The servers start side by side (each waited for once what it needs answers): ~15 s instead of ~30.
    start_object_store(stack, keys)
    start_postgres(stack, keys)
    start_prefect(stack, keys)
    wait_for_object_store(stack, keys)
    start_mlflow(stack, keys)
    wait_for_prefect(stack)
    wait_for_mlflow(stack)
    deploy(stack, keys)
    for number in range(1, workers + 1):
        start_worker(stack, keys, number)
    start_control_worker(stack, keys)
    wait_for_workers(stack, keys, [f"worker-{n}" for n in range(1, workers + 1)], ("control",))
    variables = user_env(stack, keys)
    _write_private(stack.home / "env", "".join(f"export {name}={value}\n" for name, value in variables.items()))
    return stack


def down(project: Path) -> None:
    stack = stack_of(project)
    _stop(stack, *(pidfile.stem for pidfile in sorted(stack.home.glob("worker-*.pid"))), "control")
    _stop(stack, "prefect", "mlflow", "s3")
    stop_postgres(stack)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m team.stack", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--workers", type=int, default=2, help="process workers to start (default 2)")
    args = parser.parse_args(argv)
    if args.command == "down":
        down(Path.cwd())
        print("team stack stopped (data kept in .local/team/)")
        return
    stack = up(Path.cwd(), args.workers)
    print(
        f"Prefect UI  {stack.url('prefect')}\nMLflow UI   {stack.url('mlflow')}\nS3          {stack.url('s3')}"
        f" (bucket {BUCKET})\nPostgreSQL  127.0.0.1:{stack.ports['pg']}\n"
        f"Workers     {args.workers} in .local/team/worker-*/ (pool {POOL}), and control/ (pool {CONTROL_POOL})\n"
        "In your shell: source .local/team/env; then: prefect deployment run finetune/default --watch"
    )


if __name__ == "__main__":
    main()
