"""DVC lineage helpers: data overrides reach params.yaml (comments kept), nothing else does."""

import shutil
from pathlib import Path

import yaml

from chat_doctor.lineage import data_hashes, data_overrides, write_params

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
    write_params(params, {"data.source": "/x/rows.jsonl"})
    assert "revision: null" in params.read_text()
    out = io.StringIO()
    YAML().dump({"model.revision": None}, out)
    assert out.getvalue() == "model.revision:\n"
