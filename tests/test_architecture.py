"""The house's plan holds: imports point down (pyproject.toml's import-linter contracts, every import
including those inside functions), no import circles, each sub-package says what it holds and may
import, the names config accepts are exactly those the registries define, and no step finds another
step's files by path arithmetic."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("chat_doctor", "tasks", "flows", "app")
SUB_PACKAGES = sorted(p.parent.name for p in (REPO / "chat_doctor").glob("*/__init__.py"))


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph(*PACKAGES)


def test_every_import_contract_is_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and "Contracts: 3 kept, 0 broken." in done.stdout, done.stdout + done.stderr


def test_no_module_imports_itself_through_others(graph):
    circles = []
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module) - {module}:  # a module run as __main__
            if graph.chain_exists(importer=imported, imported=module):
                circles.append((module, imported))
    assert not circles, circles


def test_the_contract_names_every_sub_package():
    text = (REPO / "pyproject.toml").read_text()
    layers = text.split('containers = ["chat_doctor"]')[1].split("]")[0]
    named = set(re.findall(r"[a-z_]+", layers.split("layers = [")[1]))
    assert named == set(SUB_PACKAGES)


@pytest.mark.parametrize("package", SUB_PACKAGES)
def test_each_sub_package_says_what_it_holds_and_may_import(package):
    doc = ast.get_docstring(ast.parse((REPO / "chat_doctor" / package / "__init__.py").read_text())) or ""
    words = " ".join(doc.lower().split())
    assert words.startswith(package), doc
    assert "may import" in words or "imports nothing of chat_doctor" in words, doc


def test_the_names_config_accepts_are_those_the_registries_define():
    from chat_doctor.core import choices
    from chat_doctor.data.prompts import TEMPLATES
    from chat_doctor.data.sources import HUB, SOURCES
    from chat_doctor.evaluation.metrics import RANKED
    from chat_doctor.models.embedded import BUILDERS

    assert tuple(BUILDERS) == choices.EMBEDDED
    assert tuple(TEMPLATES) == choices.TEMPLATES
    assert tuple(kind.name for kind in (HUB, *SOURCES)) == choices.SOURCE_KINDS
    assert RANKED == choices.RANKED_METRICS


def test_config_imports_nothing_of_the_domain(graph):
    reached = graph.find_upstream_modules("chat_doctor.config", as_package=True)
    assert reached and {".".join(m.split(".")[:2]) for m in reached} <= {"chat_doctor.core"}, sorted(reached)


def test_no_step_finds_another_steps_files_by_path_arithmetic():
    """Steps reach a run's folders through RunFolder and each other's outputs through records."""
    arithmetic = re.compile(r"(\.parent|run_dir)\s*/\s*\"(adapter|merged|eval|checkpoints)\"")
    found = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("tasks", "flows", "chat_doctor")
        for path in (REPO / folder).rglob("*.py")
        if path.name != "layout.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if arithmetic.search(line)
    ]
    assert not found, found


def test_the_flow_reads_as_the_chain_of_steps():
    source = (REPO / "flows" / "finetune.py").read_text()
    assert len(source.splitlines()) < 120
    assert "print(" not in source.split("def main")[0]  # the flow logs through its steps


def test_every_console_script_names_a_function_that_exists():
    """pyproject's [project.scripts] entry points (chat-doctor-models, ...) resolve after a move."""
    import importlib
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"chat-doctor-finetune", "chat-doctor-models", "chat-doctor-chat"} <= set(scripts)
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function, None)), f"{name} = {target}"
