"""Per-row attention for packed batches through PyTorch's own variable-length flash kernel.

With `train.packing`, a micro-batch is one long row of concatenated examples. `sdpa` keeps them
apart with a dense block-diagonal mask (every pair of positions is still computed); `varlen`
hands the row boundaries to `torch.nn.attention.varlen.varlen_attn` (flash attention, no mask, no
work between rows, no flash-attn package needed). CUDA only.
"""

from __future__ import annotations

import functools
import inspect

from chat_doctor.core.choices import VARLEN  # the name transformers knows this kernel by


@functools.cache
def _has_gqa(varlen_attn) -> bool:
    """torch >= 2.12 takes grouped key/value heads as they are; older builds need them repeated."""
    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: (1, heads, tokens, dim) in, (1, tokens, heads, dim) out."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        raise ValueError("train.attention = varlen needs train.packing: true (one packed row per micro-batch)")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    extra = {}
    if _has_gqa(varlen_attn):
        extra["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    window = kwargs.get("sliding_window")
    cu = cu.to(device=q.device, dtype=torch.int32)
    longest = int(kwargs.get("max_length_q"))
    out = varlen_attn(
        q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(window - 1 if window else -1, 0), **extra
    )
    return out.unsqueeze(0), None


def register() -> None:
    """Make `attn_implementation="varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, _varlen_attention)
