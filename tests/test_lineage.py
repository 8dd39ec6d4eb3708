"""DVC lineage: each run's data is a DVC experiment of its own, made in a copy of the project (the
workspace's params.yaml, dvc.lock and data/ stay as they were), taken from DVC's run cache when
nothing it depends on changed, made again when its code changed, and restored in another clone."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from chat_doctor.core.files import content_hash
from chat_doctor.tracking.lineage import data_hashes, data_overrides, experiment_lock, hydra_value, push

DVC = Path(sys.executable).parent / "dvc"
A = {"data.rows": 40}
B = {"data.rows": 60}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def test_only_data_stage_keys_go_into_the_experiment():
    overrides = {"data.source": "/x/rows.jsonl", "tokenize.max_length": 256, "train.max_steps": 3, "lora.r": 8}
    assert data_overrides(overrides) == {"data.source": "/x/rows.jsonl", "tokenize.max_length": 256}
    assert data_overrides({"preset": "mistral-7b", "model.base": "tiny"}) == {
        "preset": "mistral-7b",
        "model.base": "tiny",
    }


@pytest.mark.parametrize(
    "value",
    [
        "/data/my rows #2.jsonl",  # a '#' is not a comment here
        'it\'s "quoted"',
        "back\\slash\\",
        "a,b [c] {d}: e=f",
        "",
        "yes",
        "0123",
        None,
        True,
        300,
        2.5e-4,
        {"input": "question", "output": "answer #1"},
        ["q_proj", "v_proj"],
    ],
)
def test_values_reach_the_experiment_as_typed(value):
    parsed = OverridesParser.create().parse_override(f"++data.source={hydra_value(value)}").value()
    assert parsed == value and type(parsed) is type(value)


def test_data_hashes_come_from_a_dvc_lock():
    lock = yaml.safe_load(
        "schema: '2.0'\nstages:\n  sample:\n    outs:\n    - path: data/processed\n      md5: abc.dir\n"
        "  tokenize:\n    outs:\n    - path: data/tokenized\n      md5: def.dir\n"
    )
    assert data_hashes(lock) == {"data/processed": "abc.dir", "data/tokenized": "def.dir"}


@pytest.mark.slow
def test_runs_get_their_own_data_the_run_cache_shares_it_and_a_code_change_makes_it_again(project):
    """A, B, then A again: the third run's data is A's, from DVC's run cache (not made again);
    then the sample stage's code changes (committed), and A is made again by the new code, which
    the experiment's dvc.lock records, so `dvc exp apply` + `dvc status` in the workspace are honest."""
    from chat_doctor.config import load_config
    from tasks.data import run_data

    def made(name: str, overrides: dict):
        return run_data(load_config("params.yaml", overrides).data, overrides, name)

    params, lock = Path("params.yaml").read_text(), Path("dvc.lock").read_text()
    a = made("run-a", A)
    b = made("run-b", B)
    again = made("run-a-again", A)
    assert a.processed.train.parent != b.processed.train.parent and a.hashes != b.hashes
    assert again.hashes == a.hashes and again.processed == a.processed and again.rev != a.rev
    shown = subprocess.run([DVC, "exp", "show", "--json"], capture_output=True, text=True, check=True).stdout
    assert {"run-a", "run-b", "run-a-again"} <= set(re.findall(r'"name": "([^"]+)"', shown))
    assert Path("params.yaml").read_text() == params and Path("dvc.lock").read_text() == lock
    assert not Path("data/processed").exists()  # the workspace's data folder is not written
    assert experiment_lock(a.rev)["stages"]["sample"]["params"]["params.yaml"]["data"] == {"rows": 40}

    # The sample stage's code changes: answers are upper-cased by the cleaning rules.
    cleaning = Path("chat_doctor/data/cleaning.py")
    normalised = 'return re.sub(r"\\s+", " ", text).strip()'
    assert normalised in cleaning.read_text()
    cleaning.write_text(cleaning.read_text().replace(normalised, normalised + ".upper()"))
    git("-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qam", "upper-case the rows")
    changed = made("run-a-new-code", A)
    assert changed.hashes["data/processed"] != a.hashes["data/processed"]
    rows = [json.loads(line) for line in changed.processed.train.read_text().splitlines()]
    assert rows and all(row["output"] == row["output"].upper() for row in rows)

    def code(rev: str) -> str:
        return next(
            d["md5"] for d in experiment_lock(rev)["stages"]["sample"]["deps"] if d["path"] == "chat_doctor/data"
        )

    assert code(changed.rev) != code(a.rev)
    # The experiment brought into the workspace: DVC says it is up to date, and it is.
    subprocess.run([DVC, "exp", "apply", "run-a-new-code"], check=True, capture_output=True)
    assert dvc_status() == {}
    assert content_hash(Path("data/processed")) == content_hash(changed.processed.train.parent)


def dvc_status() -> dict:
    from dvc.repo import Repo

    with Repo(".") as repo:
        return repo.status()


# Full tier: make test's team test pulls a registered version's data into a fresh clone from the bucket.
@pytest.mark.slow
@pytest.mark.full
def test_another_clone_restores_the_data_of_a_run(project, tmp_path):
    """What a run recorded and pushed comes back, byte for byte, in another clone: the experiment
    from git (`dvc exp pull`), its data from the DVC remote."""
    from chat_doctor.config import load_config
    from tasks.data import run_data

    made = run_data(load_config("params.yaml", A).data, A, "run-to-share")
    push(made.rev)
    clone = tmp_path / "clone"
    git("clone", "-q", str(project), str(clone))
    # The default remote lives in the first clone; a second clone on the machine points at it.
    subprocess.run(
        [DVC, "remote", "modify", "--local", "local", "url", str(project / "dvc-remote")], cwd=clone, check=True
    )
    for command in (["exp", "pull", "origin", "run-to-share"], ["exp", "apply", "run-to-share"], ["pull"]):
        done = subprocess.run([DVC, *command], cwd=clone, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    for out, folder in (
        ("data/processed", made.processed.train.parent),
        ("data/tokenized", made.tokenized.train.parent),
    ):
        assert content_hash(clone / out) == content_hash(project / folder)
    assert yaml.safe_load((clone / "params.yaml").read_text())["data"] == {"rows": 40}
