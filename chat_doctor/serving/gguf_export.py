"""Take the model home: a registered version (or a local adapter or merged folder) as GGUF files for
llama.cpp and Ollama, with an Ollama Modelfile that prompts it exactly as it was trained.

    chat-doctor-models export champion --gguf out/
    ollama create chat-doctor -f out/Modelfile

The conversion is llama.cpp's own `convert_hf_to_gguf.py` (and `convert_lora_to_gguf.py` for
--lora), taken from the `llama-cpp-python` source package on PyPI (which vendors llama.cpp) and run
with the gguf-py copy it ships: nothing is compiled. It writes f16, bf16, q8_0 (and f32); k-quants
such as q4_k_m need llama.cpp's compiled `llama-quantize` (`llama-quantize in.gguf out.gguf Q4_K_M`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from chat_doctor.config import Config
from chat_doctor.core.files import atomic_dir, is_local, write_text
from chat_doctor.core.layout import STATE_DIR
from chat_doctor.data.prompts import TEMPLATES
from chat_doctor.models.embedded import LICENCE
from chat_doctor.models.loading import base_location, load_adapter, load_base_model
from chat_doctor.serving.chat_model import locate, located_tokenizer
from chat_doctor.tracking.mlflow_runs import client
from chat_doctor.tracking.model_card import DISCLAIMER

CONVERTER_PACKAGE = "llama-cpp-python==0.3.36"  # vendors llama.cpp at commit 0c1e57098
CONVERTER_DIR = STATE_DIR / "llama.cpp"  # the project's copy of the converter (downloaded once)
_WANTED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
TYPES = ("f16", "bf16", "q8_0", "f32")  # what the converter writes itself
CONVERT, CONVERT_LORA = "convert_hf_to_gguf.py", "convert_lora_to_gguf.py"


class ExportError(ValueError):
    """The export cannot be done as asked; the message says what to change."""


def ensure_converter(folder: Path = CONVERTER_DIR) -> Path:
    """llama.cpp's converter scripts, extracted from the llama-cpp-python source package (~2 MB of it)."""
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", tmp,
             CONVERTER_PACKAGE],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with atomic_dir(folder) as staging, tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                _, found, rest = member.name.partition("/vendor/llama.cpp/")
                if found and member.isfile() and rest.startswith(_WANTED):
                    member.name = rest
                    archive.extract(member, staging, filter="data")
    return folder


def _convert(script: str, args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("NO_LOCAL_GGUF", None)  # the converter needs its own gguf-py, newer than PyPI's gguf
    done = subprocess.run([sys.executable, str(ensure_converter() / script), *args], env=env, capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode:
        raise ExportError(f"{script} failed:\n{(done.stdout + done.stderr)[-3000:]}")


def chat_template(template: str) -> str:
    """The training prompt as a Jinja chat template (GGUF `tokenizer.chat_template`): the last user
    message in the prompt, the generation prompt included."""
    before, after = TEMPLATES[template].split("{input}")
    return (
        "{%- for message in messages if message['role'] == 'user' -%}{%- if loop.last -%}"
        f"{before}{{{{ message['content'] | trim }}}}{after}"
        "{% endif %}{% endfor %}"  # no "-": the prompt's last newline is part of it
    )


def ollama_template(template: str) -> str:
    """The training prompt as an Ollama (Go) TEMPLATE; the answer follows it directly."""
    return TEMPLATES[template].replace("{input}", "{{ .Prompt }}") + "{{ .Response }}"


def modelfile(gguf_name: str, template: str, eos: str, cfg: Config, licence: str, disclaimer: str) -> str:
    chat = cfg.chat
    return "\n".join(
        [
            "# Ollama: ollama create chat-doctor -f Modelfile",
            f"FROM ./{gguf_name}",
            f'TEMPLATE """{ollama_template(template)}"""',
            f'PARAMETER stop "{eos}"',
            f"PARAMETER temperature {chat.temperature}",
            f"PARAMETER top_p {chat.top_p}",
            f"PARAMETER repeat_penalty {chat.repetition_penalty}",
            f"PARAMETER num_predict {chat.max_new_tokens}",
            f'LICENSE """{licence}\n\n{disclaimer}"""',
            "",
        ]
    )


@dataclass(frozen=True)
class Source:
    merged: Path  # full-precision folder with its tokenizer
    template: str  # tokenize.template it was trained with
    label: str
    base: str  # the base config value (embedded name, hub id or folder)
    base_folder: str  # where its config and tokenizer are
    adapter: Path | None  # None for a merged folder
    eos: str  # the token that ends an answer (Ollama's stop)


def _merged_source(spec: str, cfg: Config, work: Path) -> Source:
    found = locate(spec, cfg, work / "download", key="export")
    tokenizer = located_tokenizer(found)
    base, template, label, eos = found.model.base, found.template, found.label, tokenizer.eos_token
    if found.adapter is None:  # a merged folder already
        return Source(Path(base), template, label, base, base, None, eos)
    model = load_base_model(found.model, quantized=False, dtype_name="float32", on_cpu=True)
    merged = work / "merged"
    load_adapter(model, found.adapter).merge_and_unload().save_pretrained(merged, safe_serialization=True)
    tokenizer.save_pretrained(merged)
    return Source(merged, template, label, base, base_location(found.model), found.adapter, eos)


def _convert_to(path: Path, script: str, args: list[str]) -> Path:
    """Run a converter into a temporary sibling of `path`, then move it into place (no torn file)."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        _convert(script, [*args, "--outfile", str(tmp)])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_gguf(spec: str, out: Path, cfg: Config, types: tuple[str, ...] = ("f16", "q8_0"), lora: bool = False):
    """Write `<name>-<type>.gguf` for each type into `out`, a Modelfile on the last one, and (with
    `lora`) the adapter alone as GGUF; returns the files written. Bad types fail before anything loads."""
    unknown = [t for t in types if t not in TYPES]
    if unknown or not types:
        raise ExportError(f"--types {','.join(types)}: choose from {', '.join(TYPES)} (q4_k_m: see llama-quantize)")
    ensure_converter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = _merged_source(spec, cfg, Path(tmp))
        staged = Path(tmp) / "stage"
        shutil.copytree(source.merged, staged)
        # The tokenizer's own chat template may differ from the prompt the model was trained on.
        (staged / "chat_template.jinja").write_text(chat_template(source.template))
        name = re.sub(r"[^\w.-]+", "-", Path(source.label).name if is_local(spec) else source.label).strip("-")
        written = [
            _convert_to(out / f"{name}-{kind}.gguf", CONVERT, [str(staged), "--outtype", kind]) for kind in types
        ]
        if lora and source.adapter is not None:
            args = [str(source.adapter), "--base", source.base_folder, "--outtype", "f16"]
            written.append(_convert_to(out / f"{name}-lora-f16.gguf", CONVERT_LORA, args))
        licence = f"Fine-tuned from {source.base}; its licence: {LICENCE.get(source.base, 'see the base model')}."
        text = modelfile(written[len(types) - 1].name, source.template, source.eos, cfg, licence, DISCLAIMER)
        written.append(out / "Modelfile")
        write_text(written[-1], text)
    return written


def log_export(run_id: str, files: list[Path]) -> None:
    """The exported files as artifacts (`gguf/`) of the MLflow run behind the registered version."""
    for path in files:
        client().log_artifact(run_id, str(path), "gguf")
