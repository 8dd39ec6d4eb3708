"""Data-parallel training: the train step as several processes (gloo on the CPU, NCCL on GPUs)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chat_doctor.config import ConfigError, build_config, load_config
from chat_doctor.core.layout import RunFolder
from chat_doctor.core.records import Tokenized, Trained
from chat_doctor.models.loading import load_adapter, load_base_model
from chat_doctor.training.launch import launch_command
from tasks.sample import run_sample
from tasks.tokenize import run_tokenize
from tasks.train import run_train

TOKENIZED = Tokenized.at(Path("data/tokenized"))


@pytest.mark.slow
@pytest.mark.parametrize("pack_length", [pytest.param(0, marks=pytest.mark.full), 512], ids=["rows", "token-bins"])
def test_two_processes_train_one_adapter_at_the_same_effective_batch(project, caplog, pack_length):
    cfg = load_config(
        "params.yaml",
        {
            "data.rows": 40,
            "lora.r": 4,
            "train.max_steps": 2,
            "train.save_steps": 2,
            "train.logging_steps": 1,
            "train.packing": True,
            "train.pack_length": pack_length,  # 512: micro-batches of 4 bins of whole rows
            "train.micro_batch_size": 4,
            "train.grad_accum": 2,
            "train.gpus": 2,
        },
    )
    tokenized = run_tokenize(cfg.tokenize, cfg.model, run_sample(cfg.data))
    out = run_train(cfg, tokenized)
    run_dir = out.run.root
    # Both processes ran and reported; the first one wrote the adapter and the checkpoint.
    assert Trained.model_validate_json((run_dir / "outcome.json").read_text()) == out
    assert Trained.model_validate_json((run_dir / "outcome-rank1.json").read_text()) == out
    state = json.loads((run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 4  # 4 rows (bins) x 1 micro-batch x 2 processes = the configured 4 x 2
    budget = 2 * 2 * 4 * 512  # steps x processes x micro-batch x at most 512 tokens (a row, or a bin)
    if pack_length:  # bins of whole rows, each nearly full: several rows a bin
        assert state["num_input_tokens_seen"] > 0.7 * budget
    else:  # one row of ~160 tokens in each place
        assert state["num_input_tokens_seen"] < 0.5 * budget
    assert (run_dir / "checkpoints" / "checkpoint-2" / ".complete").is_file()
    saved = json.loads((out.run.adapter / "chat_doctor_config.json").read_text())
    assert (saved["train"]["micro_batch_size"], saved["train"]["grad_accum"]) == (4, 2)  # as configured
    assert "tokens/s" in caplog.text
    model = load_adapter(load_base_model(cfg.model, quantized=True), out.run.adapter)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_gpu_only_settings_are_refused_on_a_cpu(project):
    cfg = build_config({"preset": "mistral-7b", "model": {"base": "tiny"}, "train": {"kernels": "liger-loss"}})
    with pytest.raises(
        ConfigError, match=re.escape("train.kernels = liger-loss needs a CUDA GPU; on a CPU set train.kernels: none")
    ):
        run_train(cfg, TOKENIZED)
    cfg = build_config({"preset": "mistral-7b", "model": {"base": "tiny"}})  # kernels: auto is none on a CPU
    with pytest.raises(ConfigError, match=re.escape("train.attention = varlen needs a CUDA GPU")):
        run_train(cfg, TOKENIZED)
    assert not Path("runs").exists()  # refused before any run folder was made


def test_a_batch_that_does_not_split_over_the_gpus_is_refused(project):
    cfg = load_config("params.yaml", {"train.micro_batch_size": 3, "train.grad_accum": 1, "train.gpus": 2})
    with pytest.raises(ConfigError, match="3 rows per step cannot be split over 2 GPUs"):
        run_train(cfg, TOKENIZED)


def test_multi_node_launch_meets_at_the_rendezvous(tmp_path):
    cfg = build_config({"train": {"gpus": 2, "nnodes": 2, "node_rank": 0, "rdzv_endpoint": "10.0.0.1:29500"}})
    run = RunFolder(root=tmp_path)
    cmd = launch_command(cfg, run)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nproc-per-node=2", "--nnodes=2", "--node-rank=0", "--rdzv-endpoint=10.0.0.1:29500"} <= set(cmd)
    assert cmd[-3:] == ["-m", "chat_doctor.training.recipe", str(tmp_path / "attempt.json")]
    single = launch_command(build_config({"train": {"gpus": 1}}), run)
    assert single[1:] == ["-m", "chat_doctor.training.recipe", str(tmp_path / "attempt.json")]
    assert "--standalone" in launch_command(build_config({"train": {"gpus": 2}}), run)


def test_join_refuses_a_single_node_attempt_and_a_bad_rank(tmp_path):
    spec = tmp_path / "attempt.json"
    spec.write_text(json.dumps({"config": build_config({}).model_dump()}))
    join = [sys.executable, "-m", "tasks.train", "join", str(spec), "--node-rank", "1"]
    done = subprocess.run(join, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode != 0 and "not a multi-node attempt (train.nnodes = 1)" in done.stderr
    spec.write_text(json.dumps({"config": build_config({"train": {"nnodes": 2}}).model_dump()}))
    join[-1] = "2"
    done = subprocess.run(join, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode != 0 and "--node-rank must be 1 .. 1 (train.nnodes = 2)" in done.stderr


def test_several_machines_through_the_pool_need_a_deployment(project, monkeypatch):
    """train.join = work-pool outside a deployment's flow run: refused before any data step, saying
    what to do; the rendezvous node 0 offers is this machine's address and a port free now."""
    from chat_doctor.orchestration.nodes import ADDRESS_ENV, NodesError, rendezvous_endpoint
    from tasks.prepare import run_prepare

    with pytest.raises(NodesError, match=r"prefect deployment run finetune/default.*or set train\.join: by-hand"):
        run_prepare({"train.nnodes": 2})
    assert not Path("data/processed").exists()
    run_prepare({"train.nnodes": 2, "train.join": "by-hand"})  # the shared-filesystem way needs no pool
    monkeypatch.setenv(ADDRESS_ENV, "127.0.0.1")
    host, port = rendezvous_endpoint().rsplit(":", 1)
    assert host == "127.0.0.1" and 1024 <= int(port) < 65536
