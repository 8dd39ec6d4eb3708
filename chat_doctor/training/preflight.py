"""Checks that need more than the config's own values (this machine, the base model's files) and
still run before any data step, so that a run fails in seconds with nothing pushed or rewritten.
Each error names the params.yaml key to change."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from chat_doctor.config import Config, ConfigError
from chat_doctor.core.choices import EMBEDDED, VARLEN
from chat_doctor.core.files import is_local


def check_before_data(cfg: Config) -> None:
    check_device(cfg)
    check_optimizer(cfg)
    check_base(cfg)


def check_optimizer(cfg: Config) -> None:
    """train.optim names an optimizer transformers has (it would refuse it only once training starts)."""
    if cfg.train.optim == "auto":
        return
    from transformers.training_args import OptimizerNames

    known = sorted(o.value for o in OptimizerNames)
    if cfg.train.optim not in known:
        raise ConfigError(
            f"train.optim = {cfg.train.optim!r}: not an optimizer of transformers; use auto or one of {known}"
        )


def check_device(cfg: Config) -> None:
    """GPU-only settings need a GPU that has what they use; otherwise say, at once, every key to set
    (a T4-class GPU gets the preset's recipe with sdpa attention and fp16, liger where it runs)."""
    import torch

    t = cfg.train
    if not torch.cuda.is_available():
        if t.kernels_in_use(cuda=False) != "none":
            raise ConfigError(f"train.kernels = {t.kernels} needs a CUDA GPU; on a CPU set train.kernels: none")
        if t.attention == VARLEN:
            raise ConfigError("train.attention = varlen needs a CUDA GPU; on a CPU set train.attention: sdpa")
        return
    name, (major, minor) = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    problems = []
    if t.gpus != "auto" and t.gpus > torch.cuda.device_count():
        problems.append(f"train.gpus = {t.gpus}: this machine shows {torch.cuda.device_count()}; set train.gpus: auto")
    if t.attention == VARLEN and major < 8:
        problems.append(
            f"train.attention = varlen needs flash attention (compute capability 8.0+, this GPU has "
            f"{major}.{minor}): set train.attention: sdpa"
        )
    if cfg.model.compute_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        problems.append("model.compute_dtype = bfloat16: this GPU has no bf16; set model.compute_dtype: auto (fp16)")
    kernels = t.kernels_in_use(cuda=True)
    if kernels != "none":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            named = f"auto ({kernels} here)" if t.kernels == "auto" else kernels
            problems.append(
                f"train.kernels = {named} needs the liger-kernel package: `make venv EXTRAS=dev,gpu`, or set "
                "train.kernels: none"
            )
    if problems:
        raise ConfigError(f"on this {name}:\n" + "\n".join(problems))


def check_base(cfg: Config) -> None:
    """The base's config and weight files, and that every LoRA target is one of its modules,
    read from the files' headers (no weights are loaded)."""
    base = cfg.model.base
    if base in EMBEDDED:
        from chat_doctor.models.embedded import ensure_embedded

        try:
            folder = ensure_embedded(base)
        except FileNotFoundError as err:  # the package that ships its weights is not installed
            raise ConfigError(str(err)) from None
    elif is_local(base):
        folder = Path(base).expanduser()
    else:
        folder = _hub_files(base, cfg.model.revision)
    try:
        json.loads((folder / "config.json").read_text())
    except ValueError as err:
        raise ConfigError(f"model.base = {base!r}: its config.json is not valid JSON ({err})") from None
    modules = _module_names(folder, base)
    missing = [m for m in cfg.lora.target_modules if m not in modules]
    if missing:
        linear = sorted(m for m in modules if m.endswith("_proj") or m == "lm_head")
        raise ConfigError(f"lora.target_modules: {missing} are not modules of {base!r}; it has {linear}")


def _module_names(folder: Path, base: str) -> set[str]:
    """Names of the modules that hold weights, from model.safetensors.index.json or the headers."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        keys = json.loads(index.read_text())["weight_map"]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
            raise ConfigError(
                f"model.base = {base!r}: no safetensors weights there (found {found}); weights load from "
                "safetensors only"
            )
        from safetensors import safe_open

        keys = []
        for file in files:
            with safe_open(file, framework="pt") as handle:  # reads the header, not the tensors
                keys += list(handle.keys())
    return {key.rsplit(".", 2)[-2] for key in keys if key.count(".") >= 1}


def _hub_files(base: str, revision: str | None) -> Path:
    """A folder with the hub base's config.json and weight index (a few KB; from the local cache
    when offline). A base of one safetensors file gets an index made from its remote header."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        config = Path(hf_hub_download(base, "config.json", revision=revision))
        try:
            hf_hub_download(base, "model.safetensors.index.json", revision=revision)
        except EntryNotFoundError:
            weight_map = get_safetensors_metadata(base, revision=revision).weight_map
            folder = Path(tempfile.mkdtemp(prefix="chat-doctor-index-"))  # not inside the hub cache
            (folder / "config.json").write_text(config.read_text())
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
            return folder
    except Exception as err:  # offline and not cached, gated, misspelt: all mean the same to the user
        raise ConfigError(
            f"model.base = {base!r}: its config and weight index cannot be fetched ({type(err).__name__}: "
            f"{str(err)[:200]}); check the id and model.revision, and HF_TOKEN for a gated model"
        ) from None
    return config.parent
