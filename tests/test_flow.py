"""The `finetune` flow end to end on the embedded default, under a real (temporary) Prefect server,
with the project's own DVC repo and MLflow store: values, files and registry entries. Most of it
reads the session's shared run (tests/conftest.py: two flow runs in one project)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from bench.processes import task_states
from chat_doctor.config import flatten, load_config
from chat_doctor.core.layout import RunFolder
from chat_doctor.core.records import Merged, Processed, Tokenized
from chat_doctor.tracking.mlflow_runs import tracking_uri
from tests.conftest import FAST, QUICK_EVAL, REAL_ROWS, SHORTER, copy_of_shared, needs_real_rows

pytestmark = pytest.mark.slow
METRICS = ("loss", "perplexity", "rougeL", "similarity", "eos_rate", "repetition", "words")


def shared_merged(shared) -> Merged:
    """The shared run's merged model, in the copy of its project that is the working directory."""
    return Merged(run=RunFolder(root=Path("runs") / shared.run_dir.name), logit_error=0.0, adapter_effect_kept=1.0)


def flow_run_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return [log.message for log in found]


def dvc_status() -> dict:
    from dvc.repo import Repo

    with Repo(".") as repo:
        return repo.status()


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


def dvc_experiments() -> list[str]:
    """The experiments `dvc exp show` lists (names)."""
    dvc = Path(sys.executable).parent / "dvc"
    shown = subprocess.run([dvc, "exp", "show", "--json"], capture_output=True, text=True, check=True).stdout
    names = []
    for baseline in json.loads(shown):
        for exp in baseline.get("experiments") or []:
            names += [run["name"] for run in exp.get("revs", [])] if exp.get("revs") else [exp.get("name")]
    return [n for n in names if n]


def test_flow_trains_registers_and_versions_data(shared):
    result = shared.first.result()
    assert result.version == 1 and result.uri == "models:/chat-doctor-adapter/1"
    assert result.aliases == ["candidate", "champion"]  # beats the base, and there is no champion yet

    client = mlflow.MlflowClient(tracking_uri())
    assert tracking_uri() == f"sqlite:///{shared.root / 'mlflow.db'}"
    version = client.get_model_version("chat-doctor-adapter", "1")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    # The whole config is on the run as params (as configured: the OOM retry's split is a tag).
    cfg = load_config("params.yaml", FAST)
    assert {k: str(v) for k, v in flatten(cfg).items()}.items() <= run.data.params.items()
    assert run.data.params["train.effective_batch_size"] == "8"  # micro-batch 4 x accumulation 2
    assert "train/peak_memory_gib" in run.data.metrics and "train/tokens_per_s" in run.data.metrics
    assert any(key.startswith("system/") for key in run.data.metrics), "no system metrics sampled"
    # Out of memory at step 7: Prefect retried `train` at half the micro-batch and twice the
    # accumulation, which resumed from checkpoint-5. Loss per logging step: 2, 4, 6 from the first
    # attempt, then 6 (again), 8, 10; no gap, no restart from step 0.
    assert run.data.tags["train.micro_batch_size_used"] == "2" and run.data.tags["train.grad_accum_used"] == "4"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [2, 4, 6, 6, 8, 10]
    assert losses[-1].value < losses[0].value
    assert (shared.run_dir / ".injected-oom_at_step").is_file()  # the fault fired (once: a marker)
    last_attempt = json.loads((shared.run_dir / "attempt.json").read_text())["config"]["train"]
    assert (last_attempt["micro_batch_size"], last_attempt["grad_accum"]) == (2, 4)
    assert json.loads((shared.run_dir / "micro_batch.json").read_text()) == {"micro_batch_size": 2, "grad_accum": 4}
    # Eval: every figure for base and tuned; the report on disk says the same as MLflow.
    metrics = run.data.metrics
    assert metrics["eval/tuned_loss"] < metrics["eval/base_loss"]
    assert shared.eval_dir == shared.run_dir / "eval" / run.info.run_id  # this flow run's evaluation
    report = json.loads((shared.eval_dir / "report.json").read_text())
    for model in ("base", "tuned"):
        figures = report["sets"]["eval_split"]["models"][model]
        for metric in METRICS:
            assert figures[metric] == pytest.approx(metrics[f"eval/{model}_{metric}"]), (model, metric)
    assert report["sets"]["eval_split"]["rows"] == 40 and report["generation"]["max_new_tokens"] == 16
    assert len((shared.eval_dir / "samples.jsonl").read_text().splitlines()) == 4
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {
        "eval/report.json",
        "eval/samples.jsonl",
        "eval/summary.md",
        "eval/chart.png",
        "eval/answers.json",
    } <= logged
    assert version.tags["eval.tuned.rougeL"] and version.tags["eval.key"] == report["eval_key"]
    assert "Chat-Doctor" not in version.description and "not medical advice" in version.description.lower()
    # Checkpoints every 5 steps, adapter and merged model on disk.
    checkpoints = shared.run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-10", "checkpoint-5"]
    assert (shared.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (shared.run_dir / "merged" / "model.safetensors").is_file()
    # Lineage: the run's DVC experiment (its dvc.lock's data hashes), the flow run and the commit
    # are on the version; the data it trained on is in folders named by those hashes.
    experiment = version.tags["dvc.experiment"]
    flow_run = shared.first.state_details.flow_run_id
    assert experiment.endswith(str(flow_run)[:8]) and run.data.tags["dvc.experiment"] == experiment
    lock = yaml.safe_load(git("show", f"{version.tags['dvc.experiment_rev']}:dvc.lock"))["stages"]
    for stage, path, folder in (
        ("sample", "data/processed", shared.processed),
        ("tokenize", "data/tokenized", shared.tokenized),
    ):
        md5 = lock[stage]["outs"][0]["md5"]
        assert version.tags[f"dvc.{path}"] == run.data.tags[f"dvc.{path}"] == md5
        assert folder.name == f"{Path(path).name}-{md5.removesuffix('.dir')}"
    experiments = {e for e in dvc_experiments()}
    assert experiment in experiments and len(experiments) == 2  # each flow run has its own
    assert version.tags["prefect.flow_run_id"] == str(flow_run)
    assert len(version.tags["git_commit"]) >= 40
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "data/processed")}
    assert artifacts == {"data/processed/report.json"}
    # The workspace is the user's: no tracked file changed, no data written into it.
    assert git("status", "--porcelain", "--untracked-files=no") == ""
    assert not Path("data/processed").exists() and not Path("data/tokenized").exists()
    assert list(Path("dvc-remote").rglob("*")), "dvc push left the default remote empty"
    # The registered adapter loads back from the alias, with the trained weights.
    mlflow.set_tracking_uri(tracking_uri())  # models:/ URIs resolve against the global one
    loaded = mlflow.transformers.load_model("models:/chat-doctor-adapter@champion", return_type="components")
    from safetensors.torch import load_file

    saved = load_file(shared.run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = next(k for k in saved if "lora_B" in k)
    assert saved[lora_b].abs().sum() > 0  # lora_B starts at zero: non-zero means it trained
    live = dict(loaded["model"].named_parameters())
    assert any(name.endswith(lora_b.removesuffix(".weight") + ".default.weight") for name in live)


def test_training_progress_is_shown_where_users_look(shared):
    """The `train-progress` artifact (Prefect UI: a bar and the latest step line) follows training."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flow_run_id = shared.first.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    progress = [a for a in found if a.key == "train-progress"]
    assert progress, [a.key for a in found]
    last = max(progress, key=lambda a: a.updated)
    assert last.type == "progress" and float(last.data) == 100.0
    assert last.description.startswith("step 10/10: loss ") and "tokens/s, ETA 0:00" in last.description


def test_a_second_run_reuses_the_data_and_its_worse_adapter_stays_candidate(shared):
    """Same data, fewer steps: the data comes from DVC's run cache (the second run's own experiment,
    the same folders); v2 does not beat v1."""
    flow_run = shared.second.state_details.flow_run_id
    states = task_states(flow_run)
    assert states["data"] == states["train"] == states["register"] == "Completed"
    logged = "\n".join(flow_run_logs(flow_run))
    assert "Stage 'sample' is cached - skipping run" in logged and "Stage 'tokenize' is cached" in logged
    worse = shared.second.result()
    assert (worse.version, worse.aliases) == (2, ["candidate"])
    client = mlflow.MlflowClient(tracking_uri())
    champion = client.get_model_version_by_alias("chat-doctor-adapter", "champion")
    candidate = client.get_model_version_by_alias("chat-doctor-adapter", "candidate")
    assert (int(champion.version), int(candidate.version)) == (1, 2)
    assert client.get_run(candidate.run_id).data.params["train.max_steps"] == str(SHORTER["train.max_steps"])
    champion_loss = float(champion.tags["eval.tuned.loss"])
    assert float(candidate.tags["eval.tuned.loss"]) > champion_loss
    assert candidate.tags["promotion.decision"] == "not promoted"
    # Same rows and settings: the champion's registered figure is used, not scored again.
    assert f"does not beat champion v1's {champion_loss:.4g}" in candidate.tags["promotion.reason"]
    assert candidate.tags["eval.key"] == champion.tags["eval.key"]
    assert "Not promoted to `champion`" in candidate.description


def test_the_registry_by_hand(shared, tmp_path, capsys):
    """chat-doctor-models as a user runs it (the first command from a shell, the rest through the
    same entry point in this process); the champion is put back at the end."""
    from chat_doctor.serving.cli import main

    def models(*args):
        capsys.readouterr()
        main(list(args))
        return capsys.readouterr().out

    shell = subprocess.run([sys.executable, "-m", "chat_doctor.serving.cli", "list"], capture_output=True, text=True)
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout == models("list")
    listing = shell.stdout.splitlines()
    assert listing[1].split()[:2] == ["v1", "champion"] and "there was no champion" in listing[1]
    assert listing[2].split()[:2] == ["v2", "candidate"] and "does not beat champion v1's" in listing[2]
    client = mlflow.MlflowClient(tracking_uri())
    assert "v2 (aliases: candidate)" in models("show", "candidate")
    assert models("promote", "2", "--reason", "answers read better") == "chat-doctor-adapter@champion -> v2\n"
    promoted = client.get_model_version_by_alias("chat-doctor-adapter", "champion")
    assert promoted.tags["promotion.manual"] == "champion by hand: answers read better"
    assert models("demote", "champion") == "chat-doctor-adapter@champion removed (was v2)\n"
    assert client.get_registered_model("chat-doctor-adapter").aliases == {"candidate": 2}
    adapter = Path(models("download", "v1", "--to", str(tmp_path / "fetched")).strip())
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert models("promote", "1", "--reason", "back as it was") == "chat-doctor-adapter@champion -> v1\n"
    assert client.get_registered_model("chat-doctor-adapter").aliases == {"candidate": 2, "champion": 1}


def test_the_shipped_dvc_lock_matches_the_shipped_code_and_params(tmp_path, monkeypatch):
    """A fresh clone's dvc.lock describes its own code and params.yaml (`dvc repro` after a change to
    a data stage's code or params); only the data outputs, which a clone does not have, are missing."""
    from tests.conftest import copy_project

    monkeypatch.chdir(copy_project(tmp_path / "clone", preset=None))
    stale = {}
    for stage, changes in dvc_status().items():
        for change in changes:
            deps = change.get("changed deps", {}) if isinstance(change, dict) else {}
            # data/processed, the sample stage's output, is tokenize's input: absent like the outputs.
            stale.setdefault(stage, {}).update({p: what for p, what in deps.items() if p != "data/processed"})
    assert not any(stale.values()), f"the committed dvc.lock is stale (run dvc repro): {stale}"
    assert set(stale) == {"sample", "tokenize"}  # both stages were looked at


@pytest.mark.full
@needs_real_rows()
def test_an_eval_source_of_real_rows_rescores_the_champion_on_them(shared, tmp_path, monkeypatch):
    """`evaluate.source` = a JSONL of real rows: base, tuned and the champion are scored on those
    rows (the champion's registered figures come from other rows) and promotion is judged there.
    (In `make test`: the champion scored again on new settings by the 4-bit evaluation test, the
    eval source cleaned and checked by tests/test_evaluate.py.)"""
    import datasets

    from chat_doctor.tracking.mlflow_runs import start_run
    from chat_doctor.tracking.registry import champion_record
    from tasks.eval_source import run_eval_source
    from tasks.evaluate import log_evaluation, run_evaluate
    from tasks.register import promotion

    monkeypatch.chdir(copy_of_shared(shared, tmp_path / "project"))
    held_out = tmp_path / "held_out_real.jsonl"
    datasets.load_from_disk(str(REAL_ROWS)).select(range(40)).to_json(str(held_out), lines=True)
    cfg = load_config("params.yaml", {**FAST, **QUICK_EVAL, "evaluate.source": str(held_out)})
    processed, tokenized = Processed.at(shared.processed), Tokenized.at(shared.tokenized)
    source = run_eval_source(cfg, processed.train)
    champion = champion_record(cfg.registry.model_name, cfg.registry.champion_alias)
    merged = shared_merged(shared)  # v1's merged model: the champion, merged
    paths = run_evaluate(cfg, tokenized, processed, merged, source, champion, tmp_path / "eval")
    report = json.loads(paths.report.read_text())
    assert report["gate_set"] == "source"
    assert report["champion"] == {"version": 1, "figures": "scored again on these rows"}
    real = report["sets"]["source"]
    assert real["cleaning"]["rows_read"] == 40 and real["rows"] == real["cleaning"]["rows_kept"] > 30
    for model in ("base", "tuned", "champion"):
        assert set(METRICS) <= set(real["models"][model]), model
    # The champion (v1's adapter on the base, from the registry) is the merged model scored as tuned.
    assert real["models"]["champion"]["loss"] == pytest.approx(real["models"]["tuned"]["loss"], rel=1e-4)
    promoted, reason = promotion(cfg, report)
    assert not promoted and "champion v1" in reason  # equal is not better
    run_id = start_run("chat-doctor", "eval-source", {}, {})
    log_evaluation(run_id, paths)
    run_metrics = mlflow.MlflowClient(tracking_uri()).get_run(run_id).data.metrics
    assert run_metrics["eval_source/tuned_loss"] == pytest.approx(real["models"]["tuned"]["loss"])
    assert "eval/tuned_loss" in run_metrics  # the eval split is still reported


def test_4bit_evaluation_scores_base_tuned_and_champion_on_one_quantized_base(shared, tmp_path, monkeypatch, caplog):
    """`evaluate.load_in_4bit` (the lean preset): base, tuned and the champion are the 4-bit base
    with no adapter, this run's adapter and the champion's adapter from the registry. The log says
    where each model's evaluation time went."""
    from chat_doctor.tracking.registry import champion_record
    from tasks.evaluate import run_evaluate

    monkeypatch.chdir(copy_of_shared(shared, tmp_path / "project"))
    cfg = load_config("params.yaml", {**FAST, **QUICK_EVAL, "evaluate.load_in_4bit": True})
    champion = champion_record(cfg.registry.model_name, cfg.registry.champion_alias)
    merged = shared_merged(shared)  # v1's run: its adapter is the champion's
    processed, tokenized = Processed.at(shared.processed), Tokenized.at(shared.tokenized)
    with caplog.at_level("INFO", logger="chat_doctor.evaluation.scoring"):
        paths = run_evaluate(cfg, tokenized, processed, merged, None, champion, tmp_path / "eval")
    report = json.loads(paths.report.read_text())
    rows = report["sets"]["eval_split"]["rows"]
    timings = re.compile(
        rf"(base|tuned|champion) on eval_split: loss over {rows} rows in [0-9.]+ s; 2 answers "
        r"\((\d+) new tokens, ([0-2]) stopped\) in [0-9.]+ s; scored in [0-9.]+ s"
    )
    found = [m for r in caplog.records if (m := timings.fullmatch(r.getMessage()))]
    assert [m[1] for m in found] == ["base", "tuned", "champion"], caplog.text
    assert all(int(m[2]) <= 2 * 8 for m in found)  # at most max_new_tokens for each of the 2 answers
    # The champion's registered figures came from full-precision models: another eval key.
    assert report["champion"] == {"version": 1, "figures": "scored again on these rows"}
    models = report["sets"]["eval_split"]["models"]
    full = json.loads((shared.eval_dir / "report.json").read_text())["sets"]["eval_split"]["models"]
    assert models["tuned"]["loss"] < models["base"]["loss"] - 0.1  # the adapter is on for tuned, off for base
    assert models["champion"]["loss"] == pytest.approx(models["tuned"]["loss"], rel=1e-4)  # the same adapter
    assert models["tuned"]["loss"] != full["tuned"]["loss"]  # 4-bit weights, not the merged fp32 ones
    assert models["tuned"]["loss"] == pytest.approx(full["tuned"]["loss"], rel=0.2)


@pytest.mark.full
@needs_real_rows()
def test_flow_on_real_rows(project, prefect_server):
    from flows.finetune import finetune

    overrides = {**FAST, "data.source": str(REAL_ROWS), "data.rows": 120, "train.micro_batch_size": 2}
    state = finetune(overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    client = mlflow.MlflowClient(tracking_uri())
    version = client.get_model_version_by_alias("chat-doctor-adapter", "candidate")
    assert float(version.tags["eval.tuned.loss"]) < float(version.tags["eval.base.loss"])
    report = json.loads(next(Path("runs").glob("run-*/eval/*/report.json")).read_text())
    assert set(report["sets"]["eval_split"]["models"]["tuned"]) >= {"rougeL", "similarity", "eos_rate", "repetition"}
    # The data override went into the run's DVC experiment, whose params.yaml names the real rows.
    experiment = yaml.safe_load(git("show", f"{version.tags['dvc.experiment_rev']}:params.yaml"))
    assert experiment["data"]["source"] == str(REAL_ROWS) and git("status", "--porcelain", "--untracked-files=no") == ""
    processed = Path("runs/data") / f"processed-{version.tags['dvc.data/processed'].removesuffix('.dir')}"
    report = json.loads((processed / "report.json").read_text())
    assert (report["source_rows"], report["train_rows"], report["eval_rows"]) == (400, 108, 12)
    # Every real row trains its EOS, and the prompt is masked.
    from chat_doctor.data.tokenized import load_split

    tokenized = Path("runs/data") / f"tokenized-{version.tags['dvc.data/tokenized'].removesuffix('.dir')}"
    train = load_split(tokenized / "train.arrow")
    assert all(labels[-1] == 2 and labels[0] == -100 for labels in train["labels"])
