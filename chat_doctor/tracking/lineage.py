"""DVC helpers: record the data stages' outputs in dvc.lock, push them, read their hashes.

DVC owns data identity: after the flow's data steps, `dvc commit` writes the hashes of params, deps
and outputs to dvc.lock (so `dvc status` is clean) and `dvc push` copies the data to the default
remote, from which `dvc pull` restores exactly what an adapter was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from chat_doctor.core.files import atomic_path

DATA_STAGES = ("sample", "tokenize")
# Config keys that the data stages read (dvc.yaml `params:`); overrides of these go to params.yaml.
DVC_PARAM_PREFIXES = ("preset", "data.", "tokenize.", "model.")


def data_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (overrides or {}).items() if k == "preset" or k.startswith(DVC_PARAM_PREFIXES)}


def write_params(params_file: Path, overrides: dict[str, Any]) -> list[str]:
    """Set dotted keys in params.yaml, keeping its comments (what `dvc exp run -S` does).

    Returns the keys whose value changed. Needed so that dvc.lock records the parameters the data
    was really made with.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.representer import RoundTripRepresenter

    class Representer(RoundTripRepresenter):
        """Writes None as `null`, like the file's own style; a subclass so DVC's dumper is untouched."""

    Representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    ruamel = YAML()
    ruamel.Representer = Representer
    ruamel.preserve_quotes = True
    doc = ruamel.load(params_file.read_text())
    changed = []
    for key, value in overrides.items():
        node = doc
        *parents, leaf = key.split(".")
        for part in parents:
            if not node.get(part):  # absent, or the empty `section: {}` of the shipped file
                node[part] = CommentedMap()  # written as a block, under the section's comment
            node = node[part]
        if leaf not in node or node[leaf] != value:
            node[leaf] = value
            changed.append(key)
    if changed:
        with atomic_path(params_file) as tmp, open(tmp, "w") as fh:
            ruamel.dump(doc, fh)
    return changed


def record_data_stages(stages: tuple[str, ...] = DATA_STAGES, push: bool = True) -> dict[str, str]:
    """dvc commit (+ push) the data stages; return {output path: hash} from dvc.lock."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        for stage in stages:
            repo.commit(stage, force=True)
        if push:
            repo.push(list(stages))
    return data_hashes(stages)


def data_hashes(stages: tuple[str, ...] = DATA_STAGES, lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """{output path: md5} for the stages' outputs, as recorded in dvc.lock."""
    lock = yaml.safe_load(lock_file.read_text()) or {}
    hashes = {}
    for stage in stages:
        for out in lock.get("stages", {}).get(stage, {}).get("outs", []):
            hashes[out["path"]] = out["md5"]
    return hashes
