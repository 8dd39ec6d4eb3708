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
