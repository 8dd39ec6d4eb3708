"""A corpus of malformed data sources and rows: each fails before any model is loaded, with a
message that names the key, the file, the row or line and the field; nothing is written."""

import json
from pathlib import Path

import pytest

from chat_doctor.config import ConfigError, build_config
from chat_doctor.sources import DataError
from tasks.sample import run_sample

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


@pytest.mark.parametrize(("case", "make", "cfg", "parts"), CASES, ids=[c[0] for c in CASES])
def test_malformed_source_fails_with_a_clear_message(tmp_path, case, make, cfg, parts):
    source = make(tmp_path)
    data = build_config({"data": {"source": str(source), "rows": 1, **cfg}}).data
    with pytest.raises(DataError) as err:
        run_sample(data, tmp_path / "out")
    for part in parts:
        assert part in str(err.value), f"{case}: {part!r} not in {err.value}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"columns": {"answer": "output"}}, "`data.columns.answer.[key]`"),
        ({"max_chars": 0}, "`data.max_chars` = 0"),
        ({"strict": "sometimes"}, "`data.strict` = 'sometimes'"),
    ],
)
def test_bad_data_config_names_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        build_config({"data": data})


def test_default_mode_drops_and_counts_what_strict_mode_rejects(tmp_path):
    rows = [GOOD, {**GOOD, "input": "Another question?"}, {**GOOD, "output": 7}, {**GOOD, "input": ""}]
    source = write(tmp_path, "r.jsonl", jsonl(rows))
    paths = run_sample(build_config({"data": {"source": str(source), "rows": 2, "eval_fraction": 0.5}}).data, tmp_path)
    report = json.loads(Path(paths["report"]).read_text())
    assert report["dropped"] == {"input: empty": 1, "output: not a string": 1}
    assert report["rows_read"] == 4 and report["rows_kept"] == 2
