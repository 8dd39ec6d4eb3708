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
    table = generation_table({"model": "smollm2-135m", "dtype": "bfloat16", "rows": 2, "forms": {"batch 1": figures}})
    assert table.splitlines()[2] == "| batch 1 | 40.7 | 1,536 | 50.0% | 71.4% | 0.0% | - |"


def test_gpu_scaling_checks_hold_each_case_to_one_gpu_and_its_goal():
    from bench.gpu_scaling import scaling_checks

    losses = [2.0 - 0.05 * i for i in range(22)]
    one = {"tokens_per_s": 10_000, "tokens_per_s_mean": 10_000, "timed_steps": 20, "losses": losses,
           "kind": "ddp", "processes": 1}  # fmt: skip
    verdicts = scaling_checks(
        {
            "1-gpu": one,
            "2-gpu": {**one, "tokens_per_s": 19_500, "processes": 2, "losses": [x * 1.001 for x in losses]},
            "4-gpu": {**one, "tokens_per_s": 36_000, "processes": 4},
            "2 nodes x 2 GPUs": {
                **one,
                "tokens_per_s": 37_000,
                "processes": 4,
                "kind": "nodes",
                "losses": [x * 1.05 for x in losses],
            },
            "fsdp 2 GPUs": {
                **one,
                "tokens_per_s": 8_000,
                "processes": 2,
                "kind": "fsdp",
                "adapter_check": "adapter does not load: boom",
            },
        }
    )
    assert verdicts["1-gpu"] == "ok: 22 steps train"
    assert verdicts["2-gpu"] == "ok: loss within 0.10% of 1 GPU step by step, 1.95x 1 GPU (goal 1.9x)"
    assert verdicts["4-gpu"] == (
        "FAILED: 3.60x 1 GPU, below the goal 3.8x "
        "(compared: loss within 0.00% of 1 GPU step by step, 3.60x 1 GPU (goal 3.8x))"
    )
    assert verdicts["2 nodes x 2 GPUs"].startswith("FAILED: loss differs from 1 GPU's by 5.0% (compared:")
    assert verdicts["fsdp 2 GPUs"].startswith("FAILED: adapter does not load: boom")
    # Without a one-GPU case nothing can be said about speed-up or loss: a failure, not an "ok".
    alone = scaling_checks({"2-gpu": {**one, "processes": 2}})
    assert alone["2-gpu"] == (
        "FAILED: no 1-GPU losses of the same steps to compare with; no 1-GPU figure in this run; compared with nothing"
    )
