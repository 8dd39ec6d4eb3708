"""The bad-input corpus: malformed data files and rows, wrong config values, bad command lines and
parameters. Each is refused before training with a message that names the key, the file, the row
or line and the field; nothing is trained, pushed to DVC's remote, registered or rewritten.

Every case goes through the functions the flow's steps call before training; a few of each kind
also go through the flow, the command line and (tests/test_deployment.py) the served deployment."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from chat_doctor.config import build_config
from chat_doctor.tracking.mlflow_runs import tracking_uri
from tasks.sample import run_sample
from tests.conftest import new_project

GOOD = {"instruction": "i", "input": "I have a cough.", "output": "Drink warm fluids and rest."}


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write(folder: Path, name: str, content) -> Path:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def save_to_disk(folder: Path, name: str, splits: dict) -> Path:
    import datasets

    path = folder / name
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    return path


# (case id, builds the source in a folder, data config overrides, expected message parts)
CASES = [
    ("missing file", lambda d: d / "nope.jsonl", {}, ["data.source", "does not exist"]),
    ("unsupported type", lambda d: write(d, "rows.txt", "hello"), {}, ["unsupported file type", ".jsonl"]),
    ("missing column", lambda d: write(d, "r.jsonl", jsonl([{"input": "q"}])), {}, ["missing column(s) ['output']"]),
    (
        "mapped column absent",
        lambda d: write(d, "r.jsonl", jsonl([GOOD])),
        {"columns": {"output": "answer"}},
        ["missing column(s) ['answer']", "data.columns"],
    ),
    ("more rows than source", lambda d: write(d, "r.jsonl", jsonl([GOOD])), {"rows": 5}, ["data.rows = 5 is larger"]),
    (
        "broken JSON line",
        lambda d: write(d, "r.jsonl", jsonl([GOOD]) + '{"input": "q", "output": \n'),
        {},
        ["r.jsonl", "line 2: not valid JSON"],
    ),
    (
        "JSON line not an object",
        lambda d: write(d, "r.jsonl", jsonl([GOOD]) + "[1, 2]\n"),
        {},
        ["line 2: expected a JSON object, got list"],
    ),
    (
        "JSON file not an array of objects",
        lambda d: write(d, "r.json", json.dumps({"rows": [GOOD]})),
        {},
        ["r.json", "missing column(s) ['input', 'output']; it has ['rows']"],
    ),
    (
        "latin-1 bytes in JSONL",
        lambda d: write(d, "r.jsonl", jsonl([GOOD]).encode() + b'{"input": "caf\xe9", "output": "x"}\n'),
        {},
        ["r.jsonl line 2: not valid UTF-8 (byte 0xe9)"],
    ),
    (
        "latin-1 bytes in CSV",
        lambda d: write(d, "r.csv", b"input,output\nq,a\nq2,caf\xe9\n"),
        {},
        ["r.csv line 3: not valid UTF-8"],
    ),
    ("corrupt parquet", lambda d: write(d, "r.parquet", b"PAR1 not really"), {}, ["cannot be read as parquet"]),
    ("empty folder", lambda d: (d / "empty").mkdir() or d / "empty", {}, ["is not a save_to_disk folder"]),
    (
        "split not in folder",
        lambda d: save_to_disk(d, "dd", {"test": [GOOD]}),
        {"split": "train"},
        ["data.split: 'train' not in", "['test']"],
    ),
    (
        "strict: empty answer",
        lambda d: write(d, "r.jsonl", jsonl([GOOD, GOOD, {**GOOD, "output": "  "}])),
        {"strict": True},
        ["r.jsonl row 3, field `output` (column 'output'): empty"],
    ),
    (
        "strict: number as answer",
        lambda d: write(d, "r.jsonl", jsonl([GOOD, {**GOOD, "output": 42}])),
        {"strict": True},
        ["row 2, field `output`", "not a string (int)"],
    ),
    (
        "strict: null query",
        lambda d: write(d, "r.jsonl", jsonl([{**GOOD, "input": None}, GOOD])),
        {"strict": True},
        ["row 1, field `input`", "missing (null)"],
    ),
    (
        "strict: replacement characters",
        lambda d: write(d, "r.jsonl", jsonl([GOOD, {**GOOD, "input": "caf\ufffd au lait"}])),
        {"strict": True},
        ["row 2, field `input`", "undecodable text"],
    ),
    (
        "strict: absurd length",
        lambda d: write(d, "r.jsonl", jsonl([GOOD, {**GOOD, "output": "a" * 50}])),
        {"strict": True, "max_chars": 40},
        ["row 2, field `output`", "50 characters, over data.max_chars = 40"],
    ),
    (
        "strict: mapped column named in the message",
        lambda d: write(d, "r.jsonl", jsonl([{"question": "q", "answer": ""}])),
        {"strict": True, "columns": {"input": "question", "output": "answer"}},
        ["row 1, field `output` (column 'answer'): empty"],
    ),
    (
        "every row invalid",
        lambda d: write(d, "r.jsonl", jsonl([{**GOOD, "output": ""}] * 3)),
        {"rows": 2},
        ["data.rows = 2: only 0 usable rows", "'output: empty': 3"],
    ),
    (
        "duplicates leave too few rows",
        lambda d: write(d, "r.jsonl", jsonl([GOOD, {**GOOD, "output": GOOD["output"].upper()}, GOOD])),
        {"rows": 2},
        ["only 1 usable rows", "'duplicate (exact)': 1", "'duplicate (near-exact)': 1"],
    ),
    (
        "no training rows left",
        lambda d: write(d, "r.jsonl", jsonl([GOOD])),
        {"rows": 1, "eval_fraction": 0.5},
        ["data.eval_fraction = 0.5 leaves no training rows"],
    ),
]


def _data_overrides(source: Path, cfg: dict) -> dict:
    return {"data.source": str(source), "data.rows": 1, **{f"data.{key}": value for key, value in cfg.items()}}


PLANTED = "hf_" + "Zq7" * 10  # shaped like a hub token; must never be echoed

# Config values and parameters: (case id, overrides, expected message parts).
CONFIG_CASES = [
    ("LoRA rank zero", {"lora.r": 0}, ["`lora.r` = 0", "greater than 0"]),
    ("base folder missing", {"model.base": "./no-such-model"}, ["`model.base` = './no-such-model'"]),
    ("base not a hub id", {"model.base": "not a model"}, ["neither an embedded base (tiny, smollm2-135m), a hub id"]),
    ("more rows than the source", {"data.rows": 100000}, ["data.rows = 100000 is larger than the source (400 rows"]),
    ("misspelt key", {"train.learnign_rate": 1e-4}, ["unknown key `train.learnign_rate`"]),
    ("token in config", {"model.token": PLANTED}, ["unknown key `model.token`", "read from the environment"]),
    ("outputs outside the project", {"runs_dir": "/tmp/elsewhere"}, ["`runs_dir` = '/tmp/elsewhere'", "runs/"]),
    ("outputs climbing out", {"runs_dir": "runs/../../x"}, ["`runs_dir` = 'runs/../../x'"]),
    ("outputs over the data", {"runs_dir": "data"}, ["`runs_dir` = 'data'"]),
    ("steps not a number", {"train.max_steps": "many"}, ["`train.max_steps` = 'many'"]),
    ("eval fraction over one", {"data.eval_fraction": 1.5}, ["`data.eval_fraction` = 1.5"]),
    ("eval source missing", {"evaluate.source": "./held-out.jsonl"}, ["`evaluate.source` = './held-out.jsonl'"]),
    ("champion alias = candidate", {"registry.champion_alias": "candidate"}, ["`registry.champion_alias`"]),
    ("unknown preset", {"preset": "gpt-5"}, ["`preset` = 'gpt-5': choose one of"]),
    ("section replaced by a number", {"train": 5}, ["`train` = 5"]),
    ("override under a value", {"train.max_steps": 5, "train.max_steps.x": 1}, ["conflicts with another override"]),
    ("unknown field in column map", {"data.columns": {"answer": "output"}}, ["`data.columns.answer.[key]`"]),
    ("length limit zero", {"data.max_chars": 0}, ["`data.max_chars` = 0"]),
    ("strict not a yes/no", {"data.strict": "sometimes"}, ["`data.strict` = 'sometimes'"]),
    (
        "LoRA target the base lacks",
        {"lora.target_modules": ["q_proj", "qkv_proj"]},
        ["lora.target_modules: ['qkv_proj'] are not modules of 'tiny'", "'down_proj'"],
    ),
    ("GPU kernels on a CPU", {"train.kernels": "liger"}, ["train.kernels = liger needs a CUDA GPU"]),
]


@pytest.fixture(scope="module")
def corpus_project(tmp_path_factory, tiny_model_dir):
    """One copy of the project for the whole corpus (each case must leave it as it found it)."""
    root = new_project(tmp_path_factory.mktemp("corpus") / "project", tiny_model_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield root


def checks_before_training(overrides: dict, out: Path) -> str:
    """What the flow runs before training, as the plain functions its steps call (validate the
    config, sample, tokenize, read the eval source); the error it stops with, naming the problem."""
    from chat_doctor.config import load_config
    from chat_doctor.training.preflight import check_before_data
    from tasks.eval_source import run_eval_source
    from tasks.tokenize import run_tokenize

    with pytest.raises(Exception) as err:
        cfg = load_config("params.yaml", overrides)
        check_before_data(cfg)
        processed = run_sample(cfg.data, out / "processed")
        run_tokenize(cfg.tokenize, cfg.model, processed, out / "tokenized")
        run_eval_source(cfg, processed.train)
    assert not (out / "processed").exists() and not (out / "tokenized").exists(), "half-written data left"
    assert not Path("runs").exists()
    return str(err.value)


def fails_before_training(overrides: dict, data_steps_ran: bool = False) -> str:
    """Run the flow; assert it failed with nothing trained, pushed, registered or rewritten; return the error."""
    from flows.finetune import finetune

    state = finetune(overrides=overrides, return_state=True)
    assert state.is_failed(), state
    with pytest.raises(Exception) as err:
        state.result()
    assert not list(Path("runs").glob("run-*")), "training started"
    assert bool(list(Path("runs/data").glob("processed-*"))) == data_steps_ran
    assert not Path("data/processed").exists() and not Path("data/tokenized").exists()  # the workspace's
    assert not [p for p in Path("dvc-remote").rglob("*") if p.is_file()], "data reached the DVC remote"
    client = mlflow.MlflowClient(tracking_uri())
    assert client.search_registered_models() == [], "something was registered"
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        assert run.info.status == "FAILED"
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    assert changed.stdout == "", f"tracked files changed: {changed.stdout}"
    return str(err.value)


@pytest.mark.parametrize(("case", "make", "cfg", "parts"), CASES, ids=[c[0] for c in CASES])
def test_malformed_source_is_refused_before_training(corpus_project, tmp_path, case, make, cfg, parts):
    message = checks_before_training(_data_overrides(make(tmp_path), cfg), tmp_path / "out")
    for part in parts:
        assert part in message, f"{case}: {part!r} not in {message}"


@pytest.mark.parametrize(("case", "overrides", "parts"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_refused_before_training(corpus_project, tmp_path, case, overrides, parts):
    message = checks_before_training(overrides, tmp_path / "out")
    for part in parts:
        assert part in message, f"{case}: {part!r} not in {message}"
    assert PLANTED not in message


# Through the flow itself (each case a flow run that must stop before training): a few of each kind
# in `make test`, every case in the `full` tier.
IN_MAKE_TEST = {"broken JSON line"} | {"LoRA rank zero", "token in config", "LoRA target the base lacks"}


def through_the_flow(cases: list) -> list:
    return [pytest.param(*c, id=c[0], marks=() if c[0] in IN_MAKE_TEST else pytest.mark.full) for c in cases]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "make", "cfg", "parts"), through_the_flow(CASES))
def test_malformed_source_fails_the_flow_before_training(
    corpus_project, prefect_server, tmp_path, case, make, cfg, parts
):
    message = fails_before_training(_data_overrides(make(tmp_path), cfg))
    for part in parts:
        assert part in message, f"{case}: {part!r} not in {message}"


@pytest.mark.slow
@pytest.mark.parametrize(("case", "overrides", "parts"), through_the_flow(CONFIG_CASES))
def test_bad_config_fails_the_flow_before_training(corpus_project, prefect_server, case, overrides, parts):
    message = fails_before_training(overrides)
    for part in parts:
        assert part in message, f"{case}: {part!r} not in {message}"
    assert PLANTED not in message


def test_a_base_folder_without_safetensors_weights_is_refused_before_the_data_steps(corpus_project, tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    (folder / "pytorch_model.bin").write_bytes(b"not opened")
    message = checks_before_training({"model.base": str(folder)}, tmp_path / "out")
    assert (
        f"model.base = '{folder}': no safetensors weights there (found ['config.json', 'pytorch_model.bin'])" in message
    )


@pytest.mark.slow
def test_bad_eval_source_fails_before_anything_is_pushed(project, prefect_server, tmp_path):
    source = write(tmp_path, "held_out.jsonl", jsonl([GOOD]) + "{broken\n")
    message = fails_before_training({"evaluate.source": str(source)}, data_steps_ran=True)
    assert "evaluate.source" in message and "held_out.jsonl: cannot be read as json: line 2: not valid JSON" in message


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.max_steps"], "override 'train.max_steps': expected KEY=VALUE"),
        (["=3"], "override '=3': expected KEY=VALUE"),
        (["lora.r=-4"], "`lora.r` = -4"),
    ],
)
def test_bad_command_line_fails_with_the_key(corpus_project, prefect_server, args, message):
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PYTHONPATH": str(corpus_project)}
    command = [sys.executable, "-m", "flows.finetune", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert not list(Path("runs").glob("run-*")) and not Path("runs/data").exists()


def test_default_mode_drops_and_counts_what_strict_mode_rejects(tmp_path):
    rows = [GOOD, {**GOOD, "input": "Another question?"}, {**GOOD, "output": 7}, {**GOOD, "input": ""}]
    source = write(tmp_path, "r.jsonl", jsonl(rows))
    paths = run_sample(build_config({"data": {"source": str(source), "rows": 2, "eval_fraction": 0.5}}).data, tmp_path)
    report = json.loads(paths.report.read_text())
    assert report["dropped"] == {"input: empty": 1, "output: not a string": 1}
    assert report["rows_read"] == 4 and report["rows_kept"] == 2


# Bad deployment parameters (`prefect deployment run ... --param overrides=...`): tests/test_deployment.py.
