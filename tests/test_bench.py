"""The benchmark's own checks: a verdict says what it compared, and never "ok" for nothing."""

from bench.gpu_speed import checks

TIMED = {"timed_steps": 20, "timed_tokens": 480_000}


def test_gpu_speed_checks_say_what_they_compared():
    falling = {"losses": [2.0, 1.5, 1.2], "grad_norms": [1.0, 0.8, 0.7], "tokens_per_s": 15_000, **TIMED}
    verdicts = checks(
        {
            "fast": falling,
            "lean": {"losses": [2.01, 1.51, 1.21], "grad_norms": [1.0, 0.9, 0.8], "tokens_per_s": 9_000, **TIMED},
            "lean-gpu": {"losses": [2.0, 1.5], "grad_norms": [1.0, 1.0], **TIMED},  # other steps than fast's
            "fast-2048": {"losses": [2.0], "grad_norms": [], **TIMED},
            "unsloth-fair-nockpt": {"losses": [2.0, 1.6], "grad_norms": [1.0, 0.9], "tokens_per_s": 12_000, **TIMED},
        }
    )
    # lean's peer (unsloth with checkpointing) is not in this run: a failure, not a silent pass.
    assert verdicts["lean"] == ("FAILED: not compared with its peer unsloth-fair (no figure for it in this run)")
    assert verdicts["fast"] == (
        "ok: 3 steps train, 1.25x unsloth-fair-nockpt; not compared: loss against plain (other batches)"
    )
    assert verdicts["lean-gpu"].startswith("ok: 2 steps train; not compared: loss against fast (no losses")
    assert verdicts["fast-2048"] == (
        "FAILED: compared with nothing; not compared: too few steps (1 losses, 0 grad norms), "
        "loss against plain (other batches)"
    )
    assert verdicts["unsloth-fair-nockpt"] == "ok: 2 steps train"
    broken = checks({"fast": falling, "lean": {"losses": [2.0, 2.5, 3.0], "grad_norms": [1.0, 0.0, 1.0], **TIMED}})
    assert broken["lean"].startswith("FAILED: a grad norm is 0; loss did not fall (2.0 -> 3.0); loss differs from fast")
    short = checks({"plain": {"losses": [2.0, 1.0], "grad_norms": [1.0, 1.0], "timed_steps": 6, "timed_tokens": 9}})
    assert short["plain"].startswith("FAILED: only 6 timed steps, 9 tokens")


def test_generation_figures_count_words_shared_before_the_first_difference():
    from bench.gpu_speed import _shared_prefix_share, generation_table

    baseline = ["take rest and fluids", "see a doctor"]
    # first: 2 of 4 words before "water"; second: identical (3 of 3)
    assert _shared_prefix_share(["take rest with water", "see a doctor"], baseline) == 5 / 7
    assert _shared_prefix_share(baseline, baseline) == 1.0
    figures = {"seconds": 40.7, "new_tokens_per_s": 1536.2, "same_answers_as_first": 0.5,
               "shared_words_with_first": 5 / 7, "stopped": 0.0, "peak_gib": None}  # fmt: skip
    table = generation_table({"model": "smollm2-135m", "rows": 2, "forms": {"batch 1": figures}})
    assert table.splitlines()[2] == "| batch 1 | 40.7 | 1,536 | 50.0% | 71.4% | 0.0% | - |"
