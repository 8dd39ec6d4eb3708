"""Model behaviour on the tiny base: 4-bit QLoRA trains the adapter only, resumes, and merges exactly."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chat_doctor.config import load_config
from chat_doctor.files import content_hash
from tasks.merge import run_merge
from tasks.sample import run_sample
from tasks.tokenize import run_tokenize
from tasks.train import run_train, train_in_process
from tests.conftest import REAL_ROWS, needs_real_rows

pytestmark = pytest.mark.slow


@pytest.fixture
def trained(project):
    cfg = load_config(
        "params.yaml",
        {"data.rows": 40, "train.max_steps": 4, "train.save_steps": 2, "train.logging_steps": 1, "lora.r": 4},
    )
    processed = run_sample(cfg.data)
    tokenized = run_tokenize(cfg.tokenize, cfg.model, processed)
    base_hash = content_hash(Path("models/tiny-mistral"))
    return cfg, tokenized, run_train(cfg, tokenized), base_hash


def test_base_loads_in_4bit_through_bitsandbytes(project):
    import bitsandbytes as bnb

    from chat_doctor.modeling import load_base_model

    model = load_base_model(load_config("params.yaml").model, quantized=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.dtype == torch.float32  # packed 4-bit storage in the compute dtype


def test_training_changes_the_adapter_and_not_the_base(trained):
    _cfg, _, out, base_hash = trained
    weights = load_file(Path(out["adapter"]) / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert len(lora_b) == 4 * 7  # every target module of every layer has an adapter
    assert all(w.abs().sum() > 0 for w in lora_b)  # B starts at zero; all of them moved
    assert content_hash(Path("models/tiny-mistral")) == base_hash
    saved_cfg = json.loads((Path(out["adapter"]) / "chat_doctor_config.json").read_text())
    assert saved_cfg["lora"]["r"] == 4


def test_rerun_resumes_from_the_last_checkpoint(trained):
    cfg, tokenized, out, _ = trained
    assert sorted(p.name for p in (Path(out["run_dir"]) / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    again = run_train(cfg, tokenized)
    assert again["run_dir"] == out["run_dir"]
    assert again["resumed_from"].endswith("checkpoint-4")


def test_merged_weights_equal_base_plus_lora_delta(trained):
    cfg, _, out, _ = trained
    merged = run_merge(cfg, out["adapter"])
    assert merged["logit_error"] < 1e-5
    base = load_file("models/tiny-mistral/model.safetensors")
    adapter = load_file(Path(out["adapter"]) / "adapter_model.safetensors")
    result = load_file(Path(merged["merged"]) / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    a = next(w for k, w in adapter.items() if f"{name}.lora_A" in k)
    b = next(w for k, w in adapter.items() if f"{name}.lora_B" in k)
    expected = base[f"{name}.weight"] + (cfg.lora.alpha / cfg.lora.r) * b @ a
    torch.testing.assert_close(result[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(result[f"{name}.weight"], base[f"{name}.weight"])


@pytest.mark.parametrize(
    "source",
    [
        "data/raw/synthetic_healthcaremagic.jsonl",
        pytest.param(str(REAL_ROWS), marks=needs_real_rows()),
    ],
    ids=["synthetic", "real-rows"],
)
def test_packed_batches_attend_only_within_a_row(project, monkeypatch, source):
    """With train.packing the model gets one concatenated row whose position ids restart at every
    example and no attention mask; its logits equal those of each example alone."""
    import itertools

    import transformers
    from peft import PeftModel

    from chat_doctor.modeling import load_base_model

    overrides = {"data.source": source, "data.rows": 20, "train.max_steps": 1, "train.packing": True, "lora.r": 4}
    cfg = load_config("params.yaml", overrides)
    processed = run_sample(cfg.data)
    tokenized = run_tokenize(cfg.tokenize, cfg.model, processed)
    seen = []

    class RecordingTrainer(transformers.Trainer):
        """Records the batch exactly as the model receives it."""

        def compute_loss(self, model, inputs, *args, **kwargs):
            seen.append({**{k: v.detach().clone() for k, v in inputs.items()}, "use_cache": model.config.use_cache})
            return super().compute_loss(model, inputs, *args, **kwargs)

    monkeypatch.setattr(transformers, "Trainer", RecordingTrainer)
    out = train_in_process(cfg, tokenized)
    batch = seen[0]
    assert "attention_mask" not in batch and batch["use_cache"] is False
    positions, ids = batch["position_ids"][0], batch["input_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    assert len(starts) == cfg.train.micro_batch_size
    assert all(ids[s].item() == 1 for s in starts)  # every example starts with BOS at position 0
    assert all(batch["labels"][0][s].item() == -100 for s in starts)  # nothing predicted across a boundary

    model = PeftModel.from_pretrained(load_base_model(cfg.model, quantized=True), out["adapter"])
    with torch.no_grad():
        packed = model(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0]
        for start, end in itertools.pairwise([*starts, len(ids)]):
            alone = model(input_ids=ids[None, start:end], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-4, atol=1e-4)


def test_a_wrong_merge_fails_and_saves_nothing(trained, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    from tasks.merge import MergeMismatch

    cfg, _, out, _ = trained
    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, *a, **k: self.unload())  # adapter dropped
    with pytest.raises(MergeMismatch, match=r"merged logits differ from base \+ adapter by .* not saved"):
        run_merge(cfg, out["adapter"])
    assert not (Path(out["run_dir"]) / "merged").exists()


def test_evaluation_report_and_all_or_nothing_registration(trained, monkeypatch):
    import mlflow

    from chat_doctor.config import METRICS
    from chat_doctor.model_card import DISCLAIMER
    from chat_doctor.tracking import start_run, tracking_uri
    from tasks.evaluate import run_evaluate
    from tasks.register import run_register

    cfg, tokenized, out, _ = trained
    cfg = cfg.model_copy(
        update={
            "evaluate": cfg.evaluate.model_copy(update={"rows": 3, "max_new_tokens": 8}),
            "registry": cfg.registry.model_copy(update={"register_merged": True}),
        }
    )
    merged = run_merge(cfg, out["adapter"], {"dvc.data/processed": "0123abcd"})
    paths = run_evaluate(cfg, tokenized["eval"], "data/processed/eval.jsonl", merged["merged"])
    report = json.loads(Path(paths["report"]).read_text())
    figures = report["sets"]["eval_split"]["models"]
    for model in ("base", "tuned"):
        assert set(METRICS) | {"words"} <= set(figures[model]), model
    assert figures["tuned"]["loss"] < figures["base"]["loss"]
    samples = [json.loads(line) for line in Path(paths["samples"]).read_text().splitlines()]
    assert len(samples) == 3 and all(len(s["tuned"]["answer"].split()) <= 8 for s in samples)
    assert Path(paths["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tuned |" in Path(paths["summary"]).read_text()

    run_id = start_run("chat-doctor", "test", {}, {})
    lineage = {"dvc.data/processed": "0123abcd", "git_commit": "f" * 40}
    first = run_register(cfg, run_id, out["adapter"], merged["merged"], paths["report"], lineage)
    assert first["version"] == 1 and first["aliases"] == ["candidate", "champion"]
    client = mlflow.MlflowClient(tracking_uri())
    version = client.get_model_version_by_alias("chat-doctor-adapter", "champion")
    assert (
        version.tags["promotion.decision"] == "promoted" and "there was no champion" in version.tags["promotion.reason"]
    )
    assert float(version.tags["eval.tuned.loss"]) == pytest.approx(figures["tuned"]["loss"], rel=1e-5)
    assert int(client.get_model_version_by_alias("chat-doctor-adapter-merged", "champion").version) == 1
    for folder in (out["adapter"], merged["merged"]):
        card = (Path(folder) / "README.md").read_text()
        assert DISCLAIMER in card and "0123abcd" in card and "| tuned |" in card and "Promoted to `champion`" in card
    assert version.description.startswith("---\nbase_model: tiny")

    # A failure while moving the aliases deletes the new versions and leaves the aliases where they were.
    calls = []
    real = mlflow.MlflowClient.set_registered_model_alias

    def fail_once(self, *args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("registry went away")
        return real(self, *args)

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", fail_once)
    with pytest.raises(RuntimeError, match="registry went away"):
        run_register(cfg, run_id, out["adapter"], merged["merged"], paths["report"], lineage)
    for name in ("chat-doctor-adapter", "chat-doctor-adapter-merged"):
        assert [int(v.version) for v in client.search_model_versions(f"name = '{name}'")] == [1]
        assert int(client.get_model_version_by_alias(name, "champion").version) == 1


def test_profile_env_writes_where_two_training_steps_spend_their_time(project, monkeypatch, tmp_path):
    import gzip

    monkeypatch.setenv("CHAT_DOCTOR_PROFILE", str(tmp_path / "profile"))
    cfg = load_config("params.yaml", {"data.rows": 40, "lora.r": 4, "train.max_steps": 5, "train.save_steps": 5})
    train_in_process(cfg, run_tokenize(cfg.tokenize, cfg.model, run_sample(cfg.data)))
    table = (tmp_path / "profile" / "profile-rank0.txt").read_text()
    assert "== self_cpu_time_total (2 steps) ==" in table and "aten::mm" in table
    trace = json.loads(gzip.decompress((tmp_path / "profile" / "trace-rank0.json.gz").read_bytes()))
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])
