"""DVC lineage helpers: data overrides reach params.yaml (comments kept), nothing else does."""

import shutil
from pathlib import Path

import yaml

from chat_doctor.tracking.lineage import data_hashes, data_overrides, write_params

REPO = Path(__file__).resolve().parents[1]


def test_only_data_stage_keys_are_written_and_comments_survive(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    overrides = {"data.source": "/x/rows.jsonl", "tokenize.max_length": 256, "train.max_steps": 3, "lora.r": 8}
    assert data_overrides(overrides) == {"data.source": "/x/rows.jsonl", "tokenize.max_length": 256}
    assert write_params(params, data_overrides(overrides)) == ["data.source", "tokenize.max_length"]
    written = yaml.safe_load(params.read_text())
    assert written["data"]["source"] == "/x/rows.jsonl" and written["tokenize"]["max_length"] == 256
    assert written["train"] == yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    assert params.read_text().count("#") == (REPO / "params.yaml").read_text().count("#")
    assert write_params(params, {"data.source": "/x/rows.jsonl"}) == []  # unchanged: not rewritten


def test_data_hashes_come_from_dvc_lock(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  sample:\n    outs:\n    - path: data/processed\n      md5: abc.dir\n"
        "  tokenize:\n    outs:\n    - path: data/tokenized\n      md5: def.dir\n"
    )
    assert data_hashes(lock_file=lock) == {"data/processed": "abc.dir", "data/tokenized": "def.dir"}


def test_writing_params_leaves_other_yaml_dumpers_alone(tmp_path):
    """DVC writes dvc.lock with ruamel too: our `null` style must not leak into its dumper."""
    import io

    from ruamel.yaml import YAML

    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    write_params(params, {"data.source": "/x/rows.jsonl", "data.revision": None})
    assert "revision: null" in params.read_text()
    out = io.StringIO()
    YAML().dump({"model.revision": None}, out)
    assert out.getvalue() == "model.revision:\n"


def test_dvc_pull_into_a_fresh_clone_restores_the_same_data(project, tmp_path):
    """What a run recorded and pushed comes back, byte for byte, in another clone."""
    import subprocess
    import sys

    from dvc.repo import Repo

    from chat_doctor.config import load_config
    from chat_doctor.core.files import content_hash
    from chat_doctor.tracking.lineage import record_data_stages
    from tasks.sample import run_sample
    from tasks.tokenize import run_tokenize

    cfg = load_config("params.yaml", {"data.rows": 50})
    run_tokenize(cfg.tokenize, cfg.model, run_sample(cfg.data))
    hashes = record_data_stages()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "commit", "-qam", "data"], check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    assert not (clone / "data" / "processed").exists()
    # The default remote lives in the first clone; a second clone on the machine points at it.
    subprocess.run(
        [
            Path(sys.executable).parent / "dvc",
            "remote",
            "modify",
            "--local",
            "local",
            "url",
            str(project / "dvc-remote"),
        ],
        cwd=clone,
        check=True,
    )
    with Repo(str(clone)) as repo:
        repo.pull()
    assert data_hashes(lock_file=clone / "dvc.lock") == hashes
    for folder in ("data/processed", "data/tokenized"):
        assert content_hash(clone / folder) == content_hash(project / folder)
