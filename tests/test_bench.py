"""The benchmark's own checks: a verdict says what it compared, and never "ok" for nothing."""

from bench.gpu_speed import checks


def test_gpu_speed_checks_say_what_they_compared():
    falling = {"losses": [2.0, 1.5, 1.2], "grad_norms": [1.0, 0.8, 0.7]}
    verdicts = checks(
        {
            "fast": falling,
            "lean": {"losses": [2.01, 1.51, 1.21], "grad_norms": [1.0, 0.9, 0.8]},
            "lean-gpu": {"losses": [2.0, 1.5], "grad_norms": [1.0, 1.0]},  # other steps than fast's
            "fast-2048": {"losses": [2.0], "grad_norms": []},
        }
    )
    assert verdicts["lean"] == "ok: 3 steps train, loss within 0.83% of fast"
    assert verdicts["fast"] == "ok: 3 steps train; not compared: loss against plain (other batches)"
    assert verdicts["lean-gpu"].startswith("ok: 2 steps train; not compared: loss against fast (no losses")
    assert verdicts["fast-2048"] == (
        "nothing compared; not compared: too few steps (1 losses, 0 grad norms), loss against plain (other batches)"
    )
    broken = checks({"fast": falling, "lean": {"losses": [2.0, 2.5, 3.0], "grad_norms": [1.0, 0.0, 1.0]}})
    assert broken["lean"].startswith("a grad norm is 0; loss did not fall (2.0 -> 3.0); loss differs from fast")
