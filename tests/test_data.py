"""Data steps: sampling from each source format, reproducibility, clear errors, tokenization."""

import json
import re
from pathlib import Path

import pytest

from chat_doctor.config import DataConfig, ModelConfig, TokenizeConfig
from chat_doctor.core.files import read_jsonl
from chat_doctor.data.sources import DataError
from chat_doctor.data.synthetic import generate
from chat_doctor.data.tokenized import IGNORE_INDEX, load_split, tokenize_row
from tasks.sample import run_sample
from tasks.tokenize import run_tokenize
from tests.conftest import REAL_ROWS, needs_real_rows


@pytest.fixture
def rows():
    return generate(60, seed=3)


def _write_sources(folder: Path, rows: list[dict]) -> dict[str, Path]:
    import datasets

    ds = datasets.Dataset.from_list(rows)
    paths = {
        "jsonl": folder / "rows.jsonl",
        "json": folder / "rows.json",
        "csv": folder / "rows.csv",
        "parquet": folder / "rows.parquet",
        "disk": folder / "rows_disk",
    }
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["json"].write_text(json.dumps(rows))
    ds.to_csv(str(paths["csv"]), index=False)
    ds.to_parquet(str(paths["parquet"]))
    ds.save_to_disk(str(paths["disk"]))
    return paths


def test_synthetic_sample_is_deterministic_and_in_schema():
    first, second = generate(300, seed=0), generate(300, seed=0)
    assert first == second
    assert all(set(row) == {"instruction", "input", "output"} for row in first)
    assert len({row["input"] for row in first}) > 250  # varied, not one row repeated
    committed = read_jsonl(Path(__file__).resolve().parents[1] / "data/raw/synthetic_healthcaremagic.jsonl")
    assert committed == generate(400, seed=0)


def test_every_local_format_gives_the_same_sample(tmp_path, rows):
    outputs = {}
    for name, path in _write_sources(tmp_path, rows).items():
        paths = run_sample(DataConfig(source=str(path), rows=40, eval_fraction=0.25), tmp_path / f"out-{name}")
        outputs[name] = (Path(paths.train).read_bytes(), Path(paths.eval).read_bytes())
    assert len(set(outputs.values())) == 1
    train = read_jsonl(tmp_path / "out-jsonl" / "train.jsonl")
    evaluation = read_jsonl(tmp_path / "out-jsonl" / "eval.jsonl")
    assert (len(train), len(evaluation)) == (30, 10)
    assert not {r["input"] for r in train} & {r["input"] for r in evaluation}


def test_sampling_is_reproducible_and_seeded(tmp_path, rows):
    source = _write_sources(tmp_path, rows)["jsonl"]
    a = run_sample(DataConfig(source=str(source), rows=20, seed=1), tmp_path / "a")
    b = run_sample(DataConfig(source=str(source), rows=20, seed=1), tmp_path / "b")
    c = run_sample(DataConfig(source=str(source), rows=20, seed=2), tmp_path / "c")
    for name in ("train", "eval", "report"):
        assert getattr(a, name).read_bytes() == getattr(b, name).read_bytes()
    assert Path(a.train).read_bytes() != Path(c.train).read_bytes()


def test_invalid_rows_are_dropped_and_counted(tmp_path, rows):
    rows = [*rows[:10], {"instruction": "x", "input": "  ", "output": "answer"}, {"input": "q", "output": None}]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = run_sample(DataConfig(source=str(source), rows=10, eval_fraction=0.2), tmp_path / "out")
    report = json.loads(Path(paths.report).read_text())
    assert report["dropped"] == {"input: empty": 1, "output: missing": 1}
    assert (report["source_rows"], report["rows_read"], report["train_rows"]) == (12, 12, 8)


@pytest.mark.parametrize(
    ("make_source", "cfg", "message"),
    [
        (lambda d: d / "missing.jsonl", {}, "data.source: '{src}' does not exist"),
        (lambda d: _text(d / "rows.txt", "hi"), {}, "unsupported file type"),
        (lambda d: _text(d / "rows.jsonl", '{"input": "q"}\n'), {}, "missing column(s) ['output']"),
        (lambda d: _text(d / "rows.jsonl", '{"input": "q", "output": "a"}\n'), {"rows": 5}, "data.rows = 5 is larger"),
        (lambda d: _text(d / "rows.jsonl", "{not json\n"), {}, "cannot be read as json"),
    ],
)
def test_bad_sources_name_the_problem(tmp_path, make_source, cfg, message):
    source = make_source(tmp_path)
    with pytest.raises(DataError) as err:
        run_sample(DataConfig(source=str(source), **{"rows": 1, **cfg}), tmp_path / "out")
    assert message.format(src=source) in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from chat_doctor.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig(), str(tiny_model_dir))


def test_tokenizer_is_mistral_v1_with_a_pad_that_is_not_eos(tokenizer):
    assert tokenizer("Hello doctor").input_ids == [1, 22557, 6676]
    assert len(tokenizer) == 32000
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0


def test_labels_keep_eos_and_mask_the_prompt(tokenizer):
    row = {"input": "I have a cough.", "output": "Hi, take rest and drink water."}
    ids, labels, status = tokenize_row(tokenizer, TokenizeConfig(), row)
    assert status is None
    assert ids[-1] == labels[-1] == tokenizer.eos_token_id
    answer = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer, skip_special_tokens=True) == row["output"]
    assert labels[0] == IGNORE_INDEX
    _, all_labels, _ = tokenize_row(tokenizer, TokenizeConfig(loss_on="all"), row)
    assert all_labels == ids


def test_truncation_keeps_eos(tokenizer):
    row = {"input": "short question", "output": "word " * 200}
    ids, labels, status = tokenize_row(tokenizer, TokenizeConfig(max_length=64), row)
    assert status == "truncated"
    assert len(ids) == 64 and ids[-1] == labels[-1] == tokenizer.eos_token_id
    _, _, status = tokenize_row(tokenizer, TokenizeConfig(max_length=16), {"input": "q " * 50, "output": "a"})
    assert status == "dropped"


def test_run_tokenize_writes_arrow_splits_and_report(tmp_path, project):
    processed = run_sample(DataConfig(rows=50), tmp_path / "processed")
    paths = run_tokenize(TokenizeConfig(max_length=256), ModelConfig(), processed, tmp_path / "tok")
    train = load_split(paths.train)
    assert len(train) + json.loads(Path(paths.report).read_text())["splits"]["train"]["dropped"] == 45
    pairs = zip(train["input_ids"], train["labels"], strict=True)
    assert all(ids[-1] == 2 and labels[-1] == 2 for ids, labels in pairs)
    report = json.loads(Path(paths.report).read_text())
    assert report["splits"]["eval"]["rows"] == 5
    assert 0 < report["splits"]["train"]["padding_share_if_padded"] < 1


@needs_real_rows()
def test_real_rows_are_cleaned_counted_and_reproducible(tmp_path, project):
    import datasets

    from chat_doctor.data.cleaning import normalise

    paths = run_sample(DataConfig(source=str(REAL_ROWS), rows=400, eval_fraction=0.1), tmp_path / "a")
    again = run_sample(DataConfig(source=str(REAL_ROWS), rows=400, eval_fraction=0.1), tmp_path / "b")
    for name in ("train", "eval", "report"):
        assert getattr(paths, name).read_bytes() == getattr(again, name).read_bytes()
    rows = read_jsonl(Path(paths.train)) + read_jsonl(Path(paths.eval))
    assert len(rows) == 400
    artefact = re.compile(r"chat\s*doctor", re.IGNORECASE)
    assert not [r for r in rows if artefact.search(r["output"]) or artefact.search(r["input"])]
    # The report's counts are what the raw rows contain.
    raw = datasets.load_from_disk(str(REAL_ROWS), keep_in_memory=True)
    report = json.loads(Path(paths.report).read_text())
    for field in ("input", "output"):
        expected = sum(1 for text in raw[field] if artefact.search(text))
        assert report["changed"].get(f"Chat Doctor artefact in {field}", 0) == expected
        reshaped = sum(1 for text in raw[field] if normalise(text) != text)
        assert report["changed"].get(f"whitespace/unicode in {field}", 0) == reshaped
    assert report["answers_cut_off"] == sum(1 for r in rows if not re.search(r"[.!?)\"'\]]$", r["output"]))
    assert report["chars"]["output"]["max"] == max(len(r["output"]) for r in rows)
    assert not list(REAL_ROWS.glob("cache-*"))  # the shared folder is left as it was
    # Every real row trains its EOS, and the prompt is masked.
    tokenized = run_tokenize(TokenizeConfig(), ModelConfig(), paths, tmp_path / "tokenized")
    train = load_split(tokenized.train)
    assert len(train) > 300 and all(labels[-1] == 2 and labels[0] == -100 for labels in train["labels"])


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("hel\x00lo", "hello"),  # NUL inside a word: the word stays one word
        ("wor\u200bld", "world"),  # zero-width space
        ("head\u00adache", "headache"),  # soft hyphen
        ("\ufeffMy son has a cough", "My son has a cough"),  # byte-order mark
        ("left\u200fright mark", "leftright mark"),  # bidi mark
        ("priv\ue000ate", "private"),  # private use
        ("fever\tand\ncough\r\nsince\x0bMonday\x1fnow", "fever and cough since Monday now"),  # separators
        ("\ufb01ne  ", "fine"),  # NFKC ligature, trailing spaces
    ],
)
def test_cleaning_drops_invisible_characters_without_splitting_words(raw, clean):
    from chat_doctor.data.cleaning import normalise

    assert normalise(raw) == clean
