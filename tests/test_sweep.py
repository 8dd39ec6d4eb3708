"""Sweeps: the grid checked before any trial starts, the trials planned, the comparison rendered.
The sweep on the team stack's pool of two workers is in tests/test_team.py."""

from __future__ import annotations

import json

import pytest

from chat_doctor.config import ConfigError
from chat_doctor.orchestration.sweeps import plan_sweep
from chat_doctor.tracking.sweep_report import markdown, plot


@pytest.mark.parametrize(
    ("grid", "overrides", "message"),
    [
        ({}, {}, "sweep: the grid is empty"),
        ({"lora.rank": [8, 16]}, {}, "sweep grid: unknown key `lora.rank`"),
        ({"lora": [8]}, {}, "sweep grid: unknown key `lora`"),
        ({"lora.r": []}, {}, "sweep grid: `lora.r` is an empty list"),
        ({"lora.r": 8}, {}, "sweep grid: `lora.r` = 8: expected a list of values"),
        ({"lora.r": [8, 8]}, {}, "sweep grid: `lora.r` lists 8 more than once"),
        ({"lora.r": ["eight"]}, {}, 'sweep trial 1 ({"lora.r": "eight"}): params.yaml + overrides: `lora.r` = '),
        ({"train.learning_rate": [1e-4, -1.0]}, {}, "sweep trial 2 ({\"train.learning_rate\": -1.0})"),
        ({"lora.r": [8]}, {"lora.r": 4}, "sweep grid: `lora.r` is also in the overrides"),
        ({"sweep.max_trials": [2]}, {}, "sweep grid: `sweep.max_trials` configures the sweep itself"),
        ({"lora.r": [4, 8, 16], "lora.alpha": [8, 16]}, {"sweep.max_trials": 5}, "6 trials, more than sweep"),
        ({"lora.r": [8]}, {"lora.rank": 4}, "unknown key `lora.rank`"),
    ],
    ids=["empty", "unknown key", "section", "empty list", "not a list", "repeat", "wrong type", "out of range",
         "also overridden", "sweep key", "too many", "bad override"],
)  # fmt: skip
def test_a_bad_grid_is_refused_before_any_trial_naming_the_key(project, grid, overrides, message):
    with pytest.raises(ConfigError) as raised:
        plan_sweep(grid, overrides, "commit")
    assert message in str(raised.value)


def test_the_grid_expands_in_order_and_trials_of_equal_data_share_it(project):
    grid = {"lora.r": [4, 8], "data.rows": [24, 30]}
    plan = plan_sweep(grid, {"train.max_steps": 3}, "abc")
    assert [t.point for t in plan.trials] == [
        {"lora.r": 4, "data.rows": 24},
        {"lora.r": 4, "data.rows": 30},
        {"lora.r": 8, "data.rows": 24},
        {"lora.r": 8, "data.rows": 30},
    ]
    assert plan.trials[0].overrides == {"train.max_steps": 3, "lora.r": 4, "data.rows": 24}
    assert plan.data_groups == [{"data.rows": 24}, {"data.rows": 30}]
    assert [t.data_group for t in plan.trials] == [0, 1, 0, 1]
    # The same settings and code are the same trial; another commit or setting is not.
    again = plan_sweep(grid, {"train.max_steps": 3}, "abc")
    assert [t.key for t in again.trials] == [t.key for t in plan.trials]
    assert len({t.key for t in plan.trials}) == 4
    assert plan_sweep(grid, {"train.max_steps": 3}, "def").trials[0].key != plan.trials[0].key


def test_random_search_draws_distinct_points_seeded(project):
    grid = {"lora.r": [4, 8, 16], "train.learning_rate": [1e-4, 2e-4, 5e-4]}
    settings = {"sweep.search": "random", "sweep.trials": 4, "sweep.seed": 7}
    drawn = [t.point for t in plan_sweep(grid, settings, "c").trials]
    assert len(drawn) == 4 and len({json.dumps(p, sort_keys=True) for p in drawn}) == 4
    assert drawn == [t.point for t in plan_sweep(grid, settings, "c").trials]  # the seed decides
    assert drawn != [t.point for t in plan_sweep(grid, {**settings, "sweep.seed": 8}, "c").trials]
    # Nine combinations but four drawn: the limit counts the trials that would start.
    assert len(plan_sweep(grid, {**settings, "sweep.max_trials": 4}, "c").trials) == 4


def test_the_comparison_lists_every_trial_failed_ones_with_their_reason(tmp_path):
    rows = [
        {"trial": 1, "point": {"lora.r": 4}, "status": "completed", "tuned": 2.5, "base": 3.0, "version": 1},
        {"trial": 2, "point": {"lora.r": 8}, "status": "completed", "tuned": 2.25, "base": 3.0, "version": 2},
        {"trial": 3, "point": {"lora.r": 16}, "status": "failed", "reason": "train.fp8 = true: no CUDA GPU"},
    ]
    text = markdown(rows, ["lora.r"], "loss", "3 trials: 2 finished, 1 failed.")
    lines = text.splitlines()
    assert lines[0] == "3 trials: 2 finished, 1 failed."
    assert "| 3 | 16 | failed |  |  |  |  |  |  |  | train.fp8 = true: no CUDA GPU |" in lines
    assert "| 2 | 8 | completed | 2.25 | 3 | 2 |" in text
    # The bars: the best (lowest loss) is the shortest; a failed trial has none.
    bars = [line for line in lines if "#" in line]
    assert [b.split()[2] for b in bars] == ["1", "2"] and len(bars[1]) < len(bars[0])
    plot(rows, ["lora.r"], "loss", tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
