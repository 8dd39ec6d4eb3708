"""Token-budget micro-batches (train.pack_length): whole rows in bins, equal work per process."""

import math
import random
import re
from pathlib import Path

import pytest
from accelerate.data_loader import BatchSamplerShard

from chat_doctor.config import ConfigError, build_config, load_config
from chat_doctor.training.packing import PackedBatchSampler, pack_rows
from chat_doctor.training.recipe import train_in_process
from tasks.sample import run_sample
from tasks.tokenize import run_tokenize


def _lengths(seed: int, n: int, low: int, high: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def test_best_fit_decreasing_puts_each_row_into_the_fullest_bin_it_fits():
    # 8 and 6 open a bin each (2 and 4 left); 3 fits only the second (1 left); the first 1 goes
    # where the least room is left (the second), the last one into the first. First-fit would
    # have put both 1s into the first bin.
    assert pack_rows([8, 6, 3, 1, 1], capacity=10) == [[0, 4], [1, 2, 3]]


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
    batches = list(sampler)
    assert len(batches) % 2 == 0  # (an odd count would make accelerate repeat the first micro-batch)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=i)) for i in range(2)]
    assert shards == [batches[0::2], batches[1::2]]  # whole micro-batches, taken in turn
    rows = [[i for batch in shard for i in batch] for shard in shards]
    assert not set(rows[0]) & set(rows[1]) and set(rows[0]) | set(rows[1]) == set(range(400))


def test_a_data_parallel_run_resumed_mid_epoch_needs_the_epoch_told_to_the_sampler():
    """What the Trainer does on resume: skip the micro-batches already trained, behind the
    process's shard. Only a sampler told the epoch replays the rest of that epoch's order."""
    from accelerate.data_loader import SkipBatchSampler

    def shard(sampler):
        return BatchSamplerShard(sampler, num_processes=2, process_index=1)

    lengths = _lengths(3, 400, 5, 60)
    uninterrupted = PackedBatchSampler(lengths, capacity=128, bins_per_batch=2, seed=0)
    uninterrupted.set_epoch(1)
    rest_of_epoch_1 = list(shard(uninterrupted))[5:]
    resumed = PackedBatchSampler(lengths, capacity=128, bins_per_batch=2, seed=0)  # a new process
    assert list(SkipBatchSampler(shard(resumed), skip_batches=5)) != rest_of_epoch_1  # epoch 0's order
    resumed.set_epoch(1)
    assert list(SkipBatchSampler(shard(resumed), skip_batches=5)) == rest_of_epoch_1


@pytest.mark.slow
def test_the_trainer_tells_the_bin_sampler_each_epoch(project):
    from transformers import TrainerState

    from chat_doctor.training.trainer import build_trainer

    overrides = {"data.rows": 40, "lora.r": 4, "train.packing": True, "train.pack_length": 512}
    cfg = load_config("params.yaml", overrides)
    tokenized = run_tokenize(cfg.tokenize, cfg.model, run_sample(cfg.data))
    trainer = build_trainer(cfg, tokenized.train, Path("runs/checkpoints"))
    trainer.get_train_dataloader()
    state = TrainerState()
    state.epoch = 1.5  # e.g. resumed from a checkpoint halfway through the second epoch
    trainer.callback_handler.on_epoch_begin(trainer.args, state, trainer.control)
    assert trainer.packed_sampler.epoch == 1


def test_epochs_give_the_steps_that_cover_the_rows_or_bins_once_per_epoch(project, caplog):
    from chat_doctor.data.tokenized import load_split
    from chat_doctor.training.plan import steps_for_epochs

    cfg = load_config("params.yaml", {"data.rows": 60, "train.epochs": 2, "train.packing": True})
    tokenized = run_tokenize(cfg.tokenize, cfg.model, run_sample(cfg.data))
    rows = len(load_split(tokenized.train))
    assert cfg.train.max_steps is None  # until the data is known
    derived = steps_for_epochs(cfg, tokenized.train).train
    assert (derived.max_steps, derived.epochs) == (2 * math.ceil(rows / 8), None)  # 4 x 2 rows a step
    assert f"train.epochs = 2: {2 * math.ceil(rows / 8)} steps ({rows} rows, 8 a step" in caplog.text
    in_bins = {"train.pack_length": 512, "train.micro_batch_size": 2, "train.grad_accum": 1}
    bins = load_config("params.yaml", {"data.rows": 60, "train.epochs": 0.5, "train.packing": True, **in_bins})
    lengths = [len(ids) for ids in load_split(tokenized.train)["input_ids"]]
    per_epoch = math.ceil(len(pack_rows(lengths, 512)) / 2)
    assert steps_for_epochs(bins, tokenized.train).train.max_steps == math.ceil(0.5 * per_epoch)
    assert steps_for_epochs(load_config("params.yaml"), tokenized.train).train.max_steps == 60  # no epochs


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

    compute_loss = transformers.Trainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "compute_loss", recording)
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
    assert (out.run.adapter / "adapter_model.safetensors").is_file()


def test_out_of_memory_halves_the_bins_of_a_micro_batch_then_names_pack_length(tmp_path):
    import json

    from chat_doctor.core.layout import RunFolder
    from chat_doctor.training.launch import TrainingFailed, halve_micro_batch

    cfg = build_config({"preset": "mistral-7b"})  # 4 bins x 4 a step
    run = RunFolder(root=tmp_path)
    assert "2 x 8 (same effective batch)" in halve_micro_batch(cfg, run, "CUDA out of memory")
    assert json.loads((tmp_path / "micro_batch.json").read_text()) == {"micro_batch_size": 2, "grad_accum": 8}
    one = cfg.model_copy(update={"train": cfg.train.model_copy(update={"micro_batch_size": 1, "grad_accum": 16})})
    with pytest.raises(TrainingFailed, match=re.escape("lower train.pack_length (and tokenize.max_length)")):
        halve_micro_batch(one, run, "CUDA out of memory")


def test_a_packed_micro_batch_is_counted_without_reading_the_gpu(monkeypatch):
    """The Trainer counts real tokens on the device and reads the sum back, a host wait per
    micro-batch; a packed micro-batch has no padding, so its length is the count."""
    from types import SimpleNamespace

    import torch

    from chat_doctor.training.trainer import PackedTrainer

    def no_read_back(self):
        raise AssertionError("a value was read back from the device")

    monkeypatch.setattr(torch.Tensor, "item", no_read_back)
    args = SimpleNamespace(include_num_input_tokens_seen="non_padding")
    trainer = SimpleNamespace(args=args, state=SimpleNamespace(num_input_tokens_seen=7))
    batch = {"input_ids": torch.ones(1, 1500, dtype=torch.long), "position_ids": torch.zeros(1, 1500, dtype=torch.long)}
    PackedTrainer._track_num_input_tokens(trainer, batch)
    assert trainer.state.num_input_tokens_seen == 1507
    trainer.args.include_num_input_tokens_seen = "no"
    PackedTrainer._track_num_input_tokens(trainer, batch)
    assert trainer.state.num_input_tokens_seen == 1507


def test_batches_are_pinned_and_copied_without_waiting_on_a_gpu(monkeypatch):
    from chat_doctor.training import trainer as training

    cfg = build_config({"preset": "cpu-tiny", "model": {"compute_dtype": "float32"}})
    args = training.training_args(cfg, Path("unused"))
    assert not args.dataloader_pin_memory and not args.accelerator_config.non_blocking  # nothing to pin for
    monkeypatch.setattr(training, "device", lambda: "cuda")
    monkeypatch.setattr(training, "TrainingArguments", lambda **kwargs: kwargs)  # as they would be passed
    kwargs = training.training_args(cfg, Path("unused"))
    assert kwargs["dataloader_pin_memory"] and kwargs["accelerator_config"] == {"non_blocking": True}
