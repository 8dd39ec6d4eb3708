"""Export to GGUF: the champion as f16 and q8_0 files that transformers loads back with the merged
model's logits, a Modelfile and a GGUF chat template that prompt exactly as training did, and the
files logged to the version's MLflow run."""

import shutil
from pathlib import Path

import jinja2
import pytest

from chat_doctor.data.prompts import TEMPLATES, build_prompt
from chat_doctor.serving.gguf_export import ExportError, chat_template, ollama_template

QUERY = "I have had a sore throat for two days. Should I worry?"
# Relative L2 distance of the logits to the merged model's: f16 rounds each weight to 11 bits
# (measured ~6e-4), q8_0 keeps 8 bits a weight plus a scale per 32 (measured ~0.015).
TOLERANCE = {"f16": 0.005, "q8_0": 0.05}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_the_modelfile_and_gguf_templates_give_the_training_prompt(template):
    ollama = ollama_template(template)
    assert ollama.replace("{{ .Prompt }}", QUERY).replace("{{ .Response }}", "") == build_prompt(template, QUERY)
    # As transformers renders chat templates (trim_blocks, lstrip_blocks).
    rendered = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(chat_template(template))
    earlier = [{"role": "user", "content": "an earlier question"}, {"role": "assistant", "content": "its answer"}]
    for messages in ([{"role": "user", "content": f"  {QUERY}\n"}], [*earlier, {"role": "user", "content": QUERY}]):
        assert rendered.render(messages=messages) == build_prompt(template, QUERY)


def test_unknown_types_fail_before_anything_loads(tmp_path):
    from chat_doctor.serving.cli import main as models_cli

    with pytest.raises(ExportError, match=r"--types q4_k_m: choose from f16, bf16, q8_0, f32"):
        models_cli(["export", "champion", "--gguf", str(tmp_path / "out"), "--types", "q4_k_m"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_champion_exported_loads_back_with_the_merged_models_logits(shared):
    """The export step as the flow runs it (export.gguf), on the shared run's champion (tiny Mistral)."""
    import torch
    from transformers import AutoModelForCausalLM

    from chat_doctor.config import load_config
    from chat_doctor.tracking.mlflow_runs import client
    from chat_doctor.tracking.registry import aliased_version
    from tasks.export import run_export

    out, stem = Path("runs/export-test"), "chat-doctor-adapter-v1-champion"
    champion = aliased_version("chat-doctor-adapter", "champion")
    cfg = load_config("params.yaml", {"export.gguf": True, "export.dir": str(out)})
    try:
        exported = run_export(cfg)
        names = ["Modelfile", f"{stem}-f16.gguf", f"{stem}-q8_0.gguf"]
        assert sorted(Path(f).name for f in exported.files) == names
        assert sorted(p.name for p in out.iterdir()) == names  # no partial file left
        assert sorted(Path(a.path).name for a in client().list_artifacts(champion.run_id, "gguf")) == names

        modelfile = (out / "Modelfile").read_text()
        assert f"FROM ./{stem}-q8_0.gguf" in modelfile
        assert 'PARAMETER stop "</s>"' in modelfile and "not medical advice" in modelfile
        assert f'TEMPLATE """{ollama_template(cfg.tokenize.template)}"""' in modelfile

        merged = AutoModelForCausalLM.from_pretrained(shared.run_dir / "merged", dtype=torch.float32)
        ids = torch.tensor([[1, *range(100, 140)]])
        with torch.no_grad():
            expected = merged(ids).logits
            for kind, tolerance in TOLERANCE.items():
                loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=f"{stem}-{kind}.gguf", dtype=torch.float32)
                got = loaded(ids).logits
                assert float((got - expected).norm() / expected.norm()) < tolerance, kind
    finally:  # the shared project is only read by the other tests
        shutil.rmtree(out, ignore_errors=True)
        artifacts = Path(client().get_run(champion.run_id).info.artifact_uri.removeprefix("file://"))
        shutil.rmtree(artifacts / "gguf", ignore_errors=True)
