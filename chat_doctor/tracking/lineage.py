"""DVC lineage: each flow run's data is a DVC experiment of its own.

The data stages of dvc.yaml (`sample`, `tokenize`) run through `dvc exp run --temp`: in a temporary
copy of the project with the run's data overrides applied to that copy's params.yaml (as `dvc exp
run --set-param` does), so any number of runs make their data at once and none rewrites the
workspace's params.yaml, dvc.lock or data/. DVC's run cache restores a stage whose code, params and
inputs it has run before (a retry, or another run with the same data), and reruns it when any of
them changed. The experiment (a git ref holding params.yaml and dvc.lock) is the run's record:
`dvc exp show` lists the runs with their params and data hashes, `dvc exp apply NAME` brings one
back into the workspace. The outputs are read from the DVC cache into content-addressed folders
(runs/data/processed-<md5>/), which no other run writes into.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from chat_doctor.core.files import atomic_dir, is_local
from chat_doctor.core.layout import DATA_DIR, MODELS_ENV, models_dir
from chat_doctor.core.logs import get_logger

logger = get_logger(__name__)

DATA_OUTPUTS = {"sample": "data/processed", "tokenize": "data/tokenized"}  # dvc.yaml's stages and outs
# Config keys that the data stages read (dvc.yaml `params:`): a run's overrides of these go into its experiment.
DVC_PARAM_PREFIXES = ("preset", "data.", "tokenize.", "model.")
EXPERIMENTS_REMOTE = "CHAT_DOCTOR_EXPERIMENTS_REMOTE"  # a git remote that each run's experiment is pushed to


class LineageError(RuntimeError):
    """The data experiment could not be made or read; the message says what DVC or git said."""


def data_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (overrides or {}).items() if k == "preset" or k.startswith(DVC_PARAM_PREFIXES)}


def hydra_value(value: Any) -> str:
    """`value` in the override grammar of `dvc exp run --set-param` (Hydra's), read back as the same
    value: strings always quoted, so a '#', a quote or a comma in a path is taken as typed."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    # Inside quotes only backslashes that precede a quote (or the closing one) are escapes.
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", str(value))
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text) + "'"


def _dvc(*args: str, capture: bool = True) -> str:
    """Run a dvc command in the project; the venv's python and dvc whatever PATH says."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env[MODELS_ENV] = str(models_dir().resolve())  # the experiment's copy uses the project's embedded bases
    env.pop("PYTHONPATH", None)  # the copy's stages import the copy's code (from their working directory)
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "--wait-for-lock", *args], env=env, capture_output=True, text=True
    )
    output = done.stdout + done.stderr
    if done.returncode:
        # A stage's own error (a bad source names its key, file and row) is the message; DVC's after it.
        raised = re.findall(r"^(?:[\w.]+\.)?(\w*Error): (.+)$", output, re.MULTILINE)
        first = f"{raised[-1][0]}: {raised[-1][1]}\n" if raised else ""
        raise LineageError(f"{first}dvc {' '.join(args[:2])} failed:\n{output[-2000:]}")
    return output


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


def experiment_rev(name: str) -> str | None:
    """The commit of experiment `name` made on the current commit, or None."""
    head = _git("rev-parse", "HEAD")
    refs = _git("for-each-ref", "--format=%(objectname) %(refname)", "refs/exps/").splitlines()
    for line in refs:
        rev, ref = line.split(" ", 1)
        parts = ref.split("/")  # refs/exps/<2 of the baseline>/<rest of the baseline>/<name>
        if parts[-1] == name and parts[2] + parts[3] == head:
            return rev
    return None


def _untracked(path: str) -> bool:
    return subprocess.run(["git", "ls-files", "--error-unmatch", path], capture_output=True).returncode != 0


def run_data_experiment(name: str, overrides: dict[str, Any], force: bool = False) -> str:
    """`dvc exp run --temp` of the data stages with `overrides` as the experiment's params; its commit.

    A local data source outside git is copied into the experiment's copy of the project. An
    experiment of that name on this commit is reused (a retry of the same run), unless `force`.
    """
    if not force and (rev := experiment_rev(name)):
        logger.info("DVC experiment %s (%s) exists on this commit: its data is reused", name, rev[:7])
        return rev
    args = ["exp", "run", "--temp", "--name", name, *(["--force"] if force else [])]
    for key, value in overrides.items():
        args += ["--set-param", f"++{key}={hydra_value(value)}"]
    source = str(overrides.get("data.source", ""))
    if source and is_local(source) and not Path(source).is_absolute() and _untracked(source):
        args += ["--copy-paths", source]
    logger.info("DVC experiment %s: %s", name, " ".join(args[5:]) or "params.yaml as it is")
    logger.info(_dvc(*args).strip())
    rev = experiment_rev(name)
    if rev is None:
        raise LineageError(f"dvc exp run reported no experiment named {name!r}")
    return rev


def remove_experiment(name: str) -> None:
    _dvc("exp", "remove", name)


def experiment_lock(rev: str) -> dict:
    """The experiment's dvc.lock."""
    return yaml.safe_load(_git("show", f"{rev}:dvc.lock")) or {}


def data_hashes(lock: dict) -> dict[str, str]:
    """{output path: md5} of the data stages' outputs in a dvc.lock."""
    hashes = {}
    for stage in DATA_OUTPUTS:
        for out in lock.get("stages", {}).get(stage, {}).get("outs", []):
            hashes[out["path"]] = out["md5"]
    return hashes


def materialize(rev: str, path: str, md5: str) -> Path:
    """The output `path` of experiment `rev`, read from the DVC cache into runs/data/<name>-<md5>/
    (once: the folder is named by its content, so it never changes and runs share it)."""
    from dvc.api import DVCFileSystem

    folder = DATA_DIR / f"{Path(path).name}-{md5.removesuffix('.dir')}"
    if folder.is_dir():
        return folder
    with atomic_dir(folder) as staging:
        DVCFileSystem(".", rev=rev).get(path, str(staging), recursive=True)
        copied = staging / Path(path).name if (staging / Path(path).name).is_dir() else staging
        if copied != staging:  # fsspec puts the folder itself inside an existing destination
            for item in copied.iterdir():
                item.rename(staging / item.name)
            copied.rmdir()
    return folder


def push(rev: str) -> None:
    """The experiment's data to the default DVC remote, from which `dvc pull` (after `dvc exp apply`)
    restores it in another clone."""
    from dvc.repo import Repo

    with Repo(".") as workspace:
        name = workspace.config["core"].get("remote")
        if not name:
            logger.warning("no default DVC remote (`dvc remote add -d`): the data stays in this clone's cache")
            return
        # As this clone sees it: a local path resolved, with .dvc/config.local's settings.
        remote = dict(workspace.config["remote"][name])
    # DVC reads the remote from the experiment's own config, where a relative url (the default
    # `../dvc-remote`) would resolve against the root of the commit's tree: give it this clone's.
    with Repo(".", config={"remote": {name: remote}}) as repo:
        repo.push(revs=[rev], workspace=False)


def share_experiment(name: str) -> str | None:
    """`dvc exp push` of the run's experiment (its git ref: params.yaml and dvc.lock) to the git
    remote that $CHAT_DOCTOR_EXPERIMENTS_REMOTE names (a worker's clone is temporary: this is how its
    record outlives it); the data went to the DVC remote already. None when it is not set."""
    git_remote = os.environ.get(EXPERIMENTS_REMOTE)
    if not git_remote:
        return None
    # A remote's name, not a URL (which could carry a token into the run's tags).
    if subprocess.run(["git", "remote", "get-url", git_remote], capture_output=True).returncode != 0:
        raise LineageError(f"{EXPERIMENTS_REMOTE} = {git_remote!r} is not a git remote of this clone (`git remote -v`)")
    _dvc("exp", "push", "--no-cache", git_remote, name)
    return git_remote


def fetch_experiment(name: str) -> str:
    """The commit of experiment `name`: this clone's, or fetched (params.yaml and dvc.lock; the data
    stays in the DVC remote until read) from the git remote $CHAT_DOCTOR_EXPERIMENTS_REMOTE, where the
    machine that made it pushed it."""
    if rev := experiment_rev(name):
        return rev
    git_remote = os.environ.get(EXPERIMENTS_REMOTE)
    if not git_remote:
        raise LineageError(f"DVC experiment {name} is not in this clone, and {EXPERIMENTS_REMOTE} names no git remote")
    _dvc("exp", "pull", "--no-cache", git_remote, name)
    if rev := experiment_rev(name):
        return rev
    raise LineageError(f"DVC experiment {name} is not on git remote {git_remote!r} at this commit")


def check_made_for(rev: str, name: str, overrides: dict[str, Any]) -> None:
    """Refuse the data of experiment `name` (commit `rev`) for a run whose data settings (params.yaml
    + `overrides` of the preset, model, data and tokenize keys) differ from those it was made with."""
    from chat_doctor.config import build_config, deep_merge, parse_overrides, read_params

    ours = build_config(deep_merge(read_params(), parse_overrides(data_overrides(overrides))))
    theirs = build_config(yaml.safe_load(_git("show", f"{rev}:params.yaml")) or {}, f"{name}: params.yaml")
    differ = [
        f"{section}.{key}: {getattr(theirs, section).model_dump()[key]!r} there, {value!r} here"
        for section in ("model", "data", "tokenize")
        for key, value in getattr(ours, section).model_dump().items()
        if getattr(theirs, section).model_dump()[key] != value
    ]
    if ours.preset != theirs.preset:
        differ.insert(0, f"preset: {theirs.preset!r} there, {ours.preset!r} here")
    if differ:
        raise LineageError(f"DVC experiment {name} was made with other data settings: {'; '.join(differ)}")


def fingerprint_of(report: Path) -> str:
    return json.loads(report.read_text())["fingerprint"]
