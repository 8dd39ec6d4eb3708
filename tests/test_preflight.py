"""Checks before any data step: a GPU without what a preset uses is told every key to set at once."""

import re
import sys

import pytest
import torch

from chat_doctor.config import ConfigError, build_config
from chat_doctor.training.preflight import check_device


def test_a_t4_class_gpu_is_told_every_key_the_preset_needs_changed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed
    cfg = build_config({"preset": "mistral-7b", "model": {"base": "tiny", "compute_dtype": "bfloat16"}})
    with pytest.raises(ConfigError) as err:
        check_device(cfg)
    lines = str(err.value).splitlines()
    assert lines[0] == "on this Tesla T4:"
    assert re.search(r"train.attention = varlen needs flash attention .* 7.5\): set train.attention: sdpa", lines[1])
    assert "model.compute_dtype = bfloat16: this GPU has no bf16" in lines[2]
    needs = "train.kernels = auto (liger-loss here) needs the liger-kernel package: `make venv EXTRAS=dev,gpu`"
    assert needs in lines[3]
    fixed = {"base": "tiny"}, {"attention": "sdpa", "kernels": "none"}
    check_device(build_config({"preset": "mistral-7b", "model": fixed[0], "train": fixed[1]}))  # runs


def test_kernels_auto_needs_no_gpu(monkeypatch):
    # auto is liger's kernels on a GPU and none on a CPU, where an explicit liger is refused.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_device(build_config({"train": {"kernels": "auto"}}))
    with pytest.raises(ConfigError, match=r"train\.kernels = liger needs a CUDA GPU"):
        check_device(build_config({"train": {"kernels": "liger"}}))
