"""Model behaviour on the tiny base: 4-bit QLoRA trains the adapter only, resumes, merges exactly,
and packed rows attend only within themselves. The trained adapter is the shared run's
(tests/conftest.py); tests that write get a copy of it."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chat_doctor.config import load_config
from chat_doctor.core.files import content_hash
from chat_doctor.core.layout import RunFolder
from chat_doctor.core.records import Evaluated, Merged, Tokenized, Trained
from chat_doctor.training.recipe import train_in_process
from tasks.merge import run_merge
from tasks.sample import run_sample
from tasks.tokenize import run_tokenize
from tasks.train import run_train
from tests.conftest import FAST, REAL_ROWS, copy_of_shared, needs_real_rows

pytestmark = pytest.mark.slow


def test_base_loads_in_4bit_through_bitsandbytes(project):
    import bitsandbytes as bnb

    from chat_doctor.models.loading import load_base_model

    model = load_base_model(load_config("params.yaml").model, quantized=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.dtype == torch.float32  # packed 4-bit storage in the compute dtype


def test_training_changes_the_adapter_and_not_the_base(shared):
    adapter = shared.run_dir / "adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert len(lora_b) == 4 * 7  # every target module of every layer has an adapter
    assert all(w.abs().sum() > 0 for w in lora_b)  # B starts at zero; all of them moved
    assert content_hash(Path("models/tiny-mistral")) == shared.base_hash
    saved_cfg = json.loads((adapter / "chat_doctor_config.json").read_text())
    assert saved_cfg["lora"]["r"] == 16 and saved_cfg["train"]["max_steps"] == FAST["train.max_steps"]


def test_a_rerun_of_finished_training_resumes_at_its_end_and_trains_nothing(shared, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_of_shared(shared, tmp_path / "project"))
    cfg = load_config("params.yaml", FAST)
    run_dir = Path("runs") / shared.run_dir.name
    before = content_hash(run_dir / "adapter")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-5"]
    again = run_train(cfg, Tokenized.at(shared.tokenized))
    assert again.run.root == run_dir  # same data and settings: the same folder
    assert again.resumed_from.endswith("checkpoint-10")
    # No step past train.max_steps (the Trainer itself would take one when the last ended mid-epoch).
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-5"]
    assert content_hash(run_dir / "adapter") == before


def test_merged_weights_equal_base_plus_lora_delta(shared):
    cfg = load_config("params.yaml", FAST)
    base = load_file("models/tiny-mistral/model.safetensors")
    adapter = load_file(shared.run_dir / "adapter" / "adapter_model.safetensors")
    result = load_file(shared.run_dir / "merged" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    a = next(w for k, w in adapter.items() if f"{name}.lora_A" in k)
    b = next(w for k, w in adapter.items() if f"{name}.lora_B" in k)
    expected = base[f"{name}.weight"] + (cfg.lora.alpha / cfg.lora.r) * b @ a
    torch.testing.assert_close(result[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(result[f"{name}.weight"], base[f"{name}.weight"])


def _packed_batch(cfg, monkeypatch) -> dict:
    """One training step with packing; the batch exactly as the model received it."""
    import transformers

    tokenized = run_tokenize(cfg.tokenize, cfg.model, run_sample(cfg.data))
    seen = []

    compute_loss = transformers.Trainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        seen.append({**{k: v.detach().clone() for k, v in inputs.items()}, "use_cache": model.config.use_cache})
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "compute_loss", recording)
    train_in_process(cfg, tokenized)
    return seen[0]


@pytest.mark.parametrize(
    "source",
    [
        "data/raw/synthetic_healthcaremagic.jsonl",
        pytest.param(str(REAL_ROWS), marks=needs_real_rows()),
    ],
    ids=["synthetic", "real-rows"],
)
def test_packed_batches_attend_only_within_a_row(project, monkeypatch, source):
    """With train.packing the model gets one concatenated sequence whose position ids restart at
    every row, and no attention mask. Each row's logits must then be those of the row alone, and
    changing one row's tokens must change its own logits and no other row's.

    Checked on the base in fp32 without quantization: bitsandbytes' 4-bit CPU kernels compute in
    bf16 on CPUs with AVX512-BF16, where packed and alone differ by ~1e-3 from rounding alone; in
    fp32 they agree to ~1e-6 on any x86 CPU, so a tolerance of 1e-4 separates rounding from a leak
    (which moves logits by ~1e-1). The last check shows that a leak is caught."""
    import itertools

    from chat_doctor.models.loading import load_base_model

    overrides = {"data.source": source, "data.rows": 20, "train.max_steps": 1, "train.packing": True, "lora.r": 4}
    cfg = load_config("params.yaml", overrides)
    batch = _packed_batch(cfg, monkeypatch)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    positions, ids = batch["position_ids"][0], batch["input_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    assert len(starts) == cfg.train.micro_batch_size
    assert all(ids[s].item() == 1 for s in starts)  # every example starts with BOS at position 0
    assert all(batch["labels"][0][s].item() == -100 for s in starts)  # nothing predicted across a boundary
    rows = list(itertools.pairwise([*starts, len(ids)]))

    model = load_base_model(cfg.model.model_copy(update={"compute_dtype": "float32"}), quantized=False)
    assert next(model.parameters()).dtype == torch.float32

    def logits(input_ids, position_ids=None):
        with torch.no_grad():
            return model(input_ids=input_ids[None], position_ids=position_ids, use_cache=False).logits[0]

    packed = logits(ids, positions[None])
    for start, end in rows:
        torch.testing.assert_close(packed[start:end], logits(ids[start:end]), rtol=1e-4, atol=1e-4)
    # Other tokens in row 0 (same length, its BOS kept): row 0's logits change, the others' do not.
    (start, end), others = rows[0], rows[1:]
    changed = ids.clone()
    changed[start + 1 : end] = torch.roll(changed[start + 1 : end], 1)
    assert not torch.equal(changed, ids)
    after = logits(changed, positions[None])
    assert (after[start:end] - packed[start:end]).abs().max() > 1e-2
    for start, end in others:
        torch.testing.assert_close(after[start:end], packed[start:end], rtol=1e-5, atol=1e-5)
    # A leak is caught: position ids that do not restart let later rows attend to earlier ones.
    leaking = logits(ids, torch.arange(len(ids))[None])
    start, end = others[0]
    assert (leaking[start:end] - logits(ids[start:end])).abs().max() > 1e-2


def _copy_of_run(shared, dest: Path) -> Path:
    """The shared run's adapter, merged model and eval outputs in a folder of their own."""
    for name in ("adapter", "merged", "eval"):
        shutil.copytree(shared.run_dir / name, dest / name)
    return dest


def test_merge_checks_its_logits_and_a_wrong_merge_saves_nothing(shared, tmp_path, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    from tasks.merge import MergeMismatch

    cfg = load_config("params.yaml", FAST)
    run = RunFolder(root=tmp_path / "run")
    shutil.copytree(shared.run_dir / "adapter", run.adapter)
    merged = run_merge(cfg, Trained(run=run))
    assert merged.logit_error < 1e-5 and merged.adapter_effect_kept > 0.999
    assert merged.run.merged == tmp_path / "run" / "merged"
    shutil.rmtree(run.merged)
    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, *a, **k: self.unload())  # adapter dropped
    with pytest.raises(MergeMismatch, match=r"keeps -?0% of the adapter's effect .* not saved"):
        run_merge(cfg, Trained(run=run))
    assert not run.merged.exists()


def test_a_lost_light_adapter_is_caught_in_bf16_too(shared, tmp_path, monkeypatch):
    """An adapter whose effect on the logits is below bf16's rounding tolerance (a light fine-tune):
    a fixed tolerance would pass a merge that dropped it; judged by its own effect, it fails."""
    from peft.tuners.tuners_utils import BaseTuner
    from safetensors.torch import save_file

    from tasks.merge import ROUNDING, MergeMismatch

    cfg = load_config("params.yaml", {**FAST, "merge.dtype": "bfloat16"})
    adapter = tmp_path / "run" / "adapter"
    shutil.copytree(shared.run_dir / "adapter", adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    light = {k: w * 0.002 if "lora_B" in k else w for k, w in weights.items()}
    save_file(light, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, *a, **k: self.unload())  # adapter dropped
    with pytest.raises(MergeMismatch) as err:
        run_merge(cfg, Trained(run=RunFolder(root=adapter.parent)))
    relative = float(str(err.value).split(", ")[1].split("% of the logits")[0]) / 100
    assert "keeps 0% of the adapter's effect" in str(err.value)
    assert 0 < relative < ROUNDING["torch.bfloat16"]  # a fixed bf16 tolerance on the logits would have passed it
    assert not (adapter.parent / "merged").exists()


def test_evaluation_report_and_all_or_nothing_registration(shared, tmp_path, monkeypatch):
    """The shared run's evaluation files; then its adapter and merged model registered again in a
    store of their own, where a failure while moving the aliases must leave nothing behind."""
    import mlflow

    from chat_doctor.evaluation.metrics import METRICS
    from chat_doctor.tracking.mlflow_runs import start_run, tracking_uri
    from chat_doctor.tracking.model_card import DISCLAIMER
    from tasks.register import run_register

    cfg = load_config("params.yaml", {**FAST, "registry.register_merged": True})
    eval_dir = shared.eval_dir
    report = json.loads((eval_dir / "report.json").read_text())
    figures = report["sets"]["eval_split"]["models"]
    for model in ("base", "tuned"):
        assert set(METRICS) | {"words"} <= set(figures[model]), model
    assert figures["tuned"]["loss"] < figures["base"]["loss"]
    samples = [json.loads(line) for line in (eval_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(len(s["tuned"]["answer"].split()) <= 16 for s in samples)
    assert (eval_dir / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tuned |" in (eval_dir / "summary.md").read_text()

    run = RunFolder(root=_copy_of_run(shared, tmp_path / "run"))
    merged = Merged(run=run, logit_error=0.0, adapter_effect_kept=1.0)
    evaluation = run.eval / shared.eval_dir.name
    files = Evaluated(
        report=evaluation / "report.json", samples=evaluation / "samples.jsonl", summary=evaluation / "summary.md",
        chart=evaluation / "chart.png",
    )  # fmt: skip
    (tmp_path / "store").mkdir()
    monkeypatch.chdir(tmp_path / "store")  # a fresh sqlite store with its artifacts beside it
    run_id = start_run("chat-doctor", "test", {}, {})
    lineage = {"dvc.data/processed": "0123abcd", "git_commit": "f" * 40}
    first = run_register(cfg, run_id, merged, files, lineage)
    assert first.version == 1 and first.aliases == ["candidate", "champion"]
    client = mlflow.MlflowClient(tracking_uri())
    version = client.get_model_version_by_alias("chat-doctor-adapter", "champion")
    assert (
        version.tags["promotion.decision"] == "promoted" and "there was no champion" in version.tags["promotion.reason"]
    )
    assert float(version.tags["eval.tuned.loss"]) == pytest.approx(figures["tuned"]["loss"], rel=1e-5)
    assert int(client.get_model_version_by_alias("chat-doctor-adapter-merged", "champion").version) == 1
    for folder in (run.adapter, run.merged):
        card = (folder / "README.md").read_text()
        assert DISCLAIMER in card and "0123abcd" in card and "| tuned |" in card and "Promoted to `champion`" in card
        assert card.startswith("---\nbase_model: tiny\n") and "random weights (seed 1234)" in card
    # MLflow shows front matter as raw text: the registry gets the card without it, and the provenance.
    assert version.description.startswith("# chat-doctor adapter\n") and DISCLAIMER in version.description
    assert version.tags["base_source"].startswith("embedded base `tiny`: random weights")

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
        run_register(cfg, run_id, merged, files, lineage)
    for name in ("chat-doctor-adapter", "chat-doctor-adapter-merged"):
        assert [int(v.version) for v in client.search_model_versions(f"name = '{name}'")] == [1]
        assert int(client.get_model_version_by_alias(name, "champion").version) == 1


@pytest.mark.full
def test_profile_env_writes_where_two_training_steps_spend_their_time(project, monkeypatch, tmp_path):
    import gzip

    monkeypatch.setenv("CHAT_DOCTOR_PROFILE", str(tmp_path / "profile"))
    cfg = load_config("params.yaml", {"data.rows": 40, "lora.r": 4, "train.max_steps": 5, "train.save_steps": 5})
    train_in_process(cfg, run_tokenize(cfg.tokenize, cfg.model, run_sample(cfg.data)))
    table = (tmp_path / "profile" / "profile-rank0.txt").read_text()
    assert "== self_cpu_time_total (2 steps) ==" in table and "aten::mm" in table
    trace = json.loads(gzip.decompress((tmp_path / "profile" / "trace-rank0.json.gz").read_bytes()))
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])


@pytest.mark.full
def test_the_same_seed_and_data_train_the_same_adapter(project, tmp_path):
    """train.seed: same seed + data = same adapter, whatever the process drew before (LoRA's A
    matrices start random); another seed starts from other A matrices."""
    from chat_doctor.training.trainer import adapted_model

    cfg = load_config("params.yaml", {"data.rows": 24, "lora.r": 4, "train.max_steps": 1, "train.save_steps": 1})
    tokenized = run_tokenize(cfg.tokenize, cfg.model, run_sample(cfg.data))

    def adapter(name: str, noise: int) -> dict:
        torch.manual_seed(noise)  # the global generator in another state before each run
        torch.rand(noise)
        out = train_in_process(cfg, tokenized, RunFolder(root=tmp_path / name))
        return load_file(out.run.adapter / "adapter_model.safetensors")

    first, again = adapter("a", 1), adapter("b", 7)
    assert first.keys() == again.keys() and len(first) == 4 * 7 * 2
    assert all(torch.equal(first[k], again[k]) for k in first)

    def initial_a(seed: int) -> torch.Tensor:
        run = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
        return next(p for n, p in adapted_model(run).named_parameters() if "lora_A" in n).detach().clone()

    assert torch.equal(initial_a(42), initial_a(42)) and not torch.equal(initial_a(42), initial_a(43))
