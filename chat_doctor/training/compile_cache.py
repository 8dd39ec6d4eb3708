"""torch.compile's caches for a training process, kept in the project so compiling is paid once.

train.compile (the decoder layers) and train.fp8 (its quantizing passes) compile on first use. torch
keeps what it compiled on disk (inductor's FX graph cache, AOTAutograd's cache, Triton's kernels),
by default in the user's temp folder and ~/.triton, shared with everything else they compile. Here
they go to runs/compile-cache, or wherever TORCHINDUCTOR_CACHE_DIR already points (the train step
sets it for its child; a user's own setting wins), and the next run on this machine loads the
compiled layers instead of compiling them again. Only this process's environment is changed.
"""

from __future__ import annotations

import os
from pathlib import Path

from chat_doctor.core.layout import RUNS_ROOT

COMPILE_CACHE = Path(RUNS_ROOT) / "compile-cache"
ALLOW_CUSTOM_AUTOGRAD = "TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD"


def use_project_cache(folder: Path = COMPILE_CACHE) -> Path:
    """Point this process's torch.compile caches at `folder` (unless already set); returns the folder
    in use. Call before anything is compiled."""
    import torch._functorch.config as functorch_config

    cache = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder.resolve())))
    # Triton's kernels beside inductor's graphs; liger's own kernels (the fused lm_head + loss) too,
    # which would otherwise go to ~/.triton.
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    # AOTAutograd caches no graph that holds a custom autograd.Function unless allowed, and every
    # compiled decoder layer holds one (bitsandbytes' 4-bit product, or train.fp8's); a second run
    # would then trace and lower each graph again and take only Triton's kernels from the cache.
    # The functions' forward and backward are traced into the graph that keys the cache, so a
    # changed function is a new key, not a stale hit.
    if ALLOW_CUSTOM_AUTOGRAD not in os.environ:
        functorch_config.autograd_cache_allow_custom_autograd_functions = True
    return cache
