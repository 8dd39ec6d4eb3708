"""Token-budget micro-batches (train.pack_length): whole rows in bins, equal work per process."""

import math
import random
import re
from pathlib import Path

import pytest
from accelerate.data_loader import BatchSamplerShard

from chat_doctor.config import ConfigError, build_config, load_config
from chat_doctor.packing import PackedBatchSampler, pack_rows
from tasks.sample import run_sample
from tasks.tokenize import run_tokenize
from tasks.train import train_in_process


def _lengths(seed: int, n: int, low: int, high: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def test_best_fit_decreasing_puts_each_row_into_the_fullest_bin_it_fits():
    # 6 opens a bin, 5 another; 4 fits only the first (4 left); 3 and 2 then fill the second.
    assert pack_rows([6, 5, 4, 3, 2], capacity=10) == [[0, 2], [1, 3, 4]]


def test_bins_hold_every_row_once_within_the_budget_and_are_nearly_full():
    lengths = _lengths(7, 2000, 20, 512)
    bins = pack_rows(lengths, capacity=2048)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in b) for b in bins) <= 2048
    assert len(bins) <= math.ceil(sum(lengths) / 2048) + 1  # all bins but about one are full


def test_a_row_longer_than_the_budget_is_named():
    with pytest.raises(ValueError, match=re.escape("row 1 has 12 tokens, more than train.pack_length = 10")):
        pack_rows([3, 12, 4], capacity=10)


def test_the_sampler_shuffles_bins_by_epoch_and_seed_and_keeps_its_length():
    lengths = _lengths(1, 300, 5, 60)
    sampler = PackedBatchSampler(lengths, capacity=128, bins_per_batch=3, seed=42)
    first = list(sampler)
    assert len(first) == len(sampler) == math.ceil(len(sampler.bins) / 3)
    assert sorted(i for batch in first for i in batch) == list(range(300))  # one epoch = every row once
    assert all(sum(lengths[i] for i in batch) <= 3 * 128 for batch in first)
    assert list(sampler) == first  # same epoch, same order (a resumed run sees the same batches)
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(i for batch in second for i in batch) == list(range(300))


def test_data_parallel_processes_get_disjoint_whole_micro_batches():
    lengths = _lengths(2, 400, 5, 60)
    sampler = PackedBatchSampler(lengths, capacity=128, bins_per_batch=2, seed=0)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=i)) for i in range(2)]
    assert len(shards[0]) == len(shards[1])  # both processes take the same number of steps
    batches = list(sampler)
    assert shards[0][: len(batches) // 2] == batches[0::2][: len(batches) // 2]
    assert shards[1][: len(batches) // 2] == batches[1::2][: len(batches) // 2]
    seen = [i for shard in shards for batch in shard for i in batch]
    assert set(seen) == set(range(400))


def test_pack_length_is_checked_against_packing_and_the_row_length():
    with pytest.raises(ConfigError, match=re.escape("train.pack_length needs train.packing: true")):
        build_config({"train": {"pack_length": 1024}})
    with pytest.raises(ConfigError, match=re.escape("train.pack_length = 256 is shorter than tokenize.max_length")):
        build_config({"tokenize": {"max_length": 512}, "train": {"packing": True, "pack_length": 256}})


@pytest.mark.slow
def test_training_micro_batches_hold_whole_rows_up_to_the_budget(project, monkeypatch):
    import transformers

    overrides = {
        "data.rows": 60,
        "lora.r": 4,
        "tokenize.max_length": 256,
        "train.max_steps": 3,
        "train.save_steps": 3,
        "train.packing": True,
        "train.pack_length": 512,
        "train.micro_batch_size": 2,
        "train.grad_accum": 1,
    }
    cfg = load_config("params.yaml", overrides)
    tokenized = run_tokenize(cfg.tokenize, cfg.model, run_sample(cfg.data))
    seen = []

    class RecordingTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            seen.append({k: v.detach().clone() for k, v in inputs.items()})
            return super().compute_loss(model, inputs, *args, **kwargs)

    monkeypatch.setattr(transformers, "Trainer", RecordingTrainer)
    out = train_in_process(cfg, tokenized)
    assert len(seen) == 3
    for batch in seen:
        positions = batch["position_ids"][0]
        starts = (positions == 0).nonzero().flatten().tolist()
        assert positions.numel() <= 2 * 512  # two bins of at most 512 tokens
        assert all(batch["input_ids"][0][s].item() == 1 for s in starts)  # whole rows: each starts with BOS
        assert all(batch["labels"][0][s].item() == -100 for s in starts)
    # Bins are filled: a micro-batch holds far more rows than micro_batch_size.
    assert max(int((b["position_ids"][0] == 0).sum()) for b in seen) > 2
    assert (Path(out["adapter"]) / "adapter_model.safetensors").is_file()


def test_out_of_memory_halves_the_bins_of_a_micro_batch_then_names_pack_length(tmp_path):
    import json

    from tasks.train import TrainingFailed, _halve_micro_batch

    cfg = build_config({"preset": "mistral-7b"})  # 4 bins x 4 a step
    assert "2 x 8 (same effective batch)" in _halve_micro_batch(cfg, tmp_path, "CUDA out of memory")
    assert json.loads((tmp_path / "micro_batch.json").read_text()) == {"micro_batch_size": 2, "grad_accum": 8}
    one = cfg.model_copy(update={"train": cfg.train.model_copy(update={"micro_batch_size": 1, "grad_accum": 16})})
    with pytest.raises(TrainingFailed, match=re.escape("lower train.pack_length (and tokenize.max_length)")):
        _halve_micro_batch(one, tmp_path, "CUDA out of memory")
