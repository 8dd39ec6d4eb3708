"""Checkpointed layer inputs kept in host memory, copied off the GPU without stopping the host.

transformers' `offload` wraps each checkpointed layer in torch's `save_on_cpu`, whose copy to host
memory is synchronous: at every layer the host waits for the GPU to catch up, so it no longer
queues the next kernels ahead of it. Here the copy runs on a second CUDA stream, beside the next
layer's compute, and comes back on the compute stream when the backward pass reaches the layer
(unsloth's offloaded checkpointing copies the same tensors, without the side stream).
"""

from __future__ import annotations

import functools

import torch

# Tensors this small (row boundaries, position ids) stay on the GPU: a copy costs more than they hold.
MIN_OFFLOAD_BYTES = 1 << 20


class _HostCopies(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self, stream: torch.cuda.Stream) -> None:
        def pack(tensor: torch.Tensor):
            if not tensor.is_cuda or tensor.numel() * tensor.element_size() < MIN_OFFLOAD_BYTES:
                return tensor
            stream.wait_stream(torch.cuda.current_stream())  # the tensor is written before it is read
            with torch.cuda.stream(stream):
                host = torch.empty_like(tensor, device="cpu", pin_memory=True)
                host.copy_(tensor, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            tensor.record_stream(stream)  # its GPU memory is not reused before the copy ends
            return tensor.device, host, done

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host, done = packed
            torch.cuda.current_stream().wait_event(done)
            return host.to(device, non_blocking=True)

        super().__init__(pack, unpack)


@functools.cache
def _copy_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device_index)


def offloaded(checkpoint_func):
    """`checkpoint_func` (torch's checkpoint, as transformers calls it for a layer) with the tensors
    it keeps for the backward pass (the layer's inputs) held in pinned host memory."""

    @functools.wraps(checkpoint_func)
    def run(function, *args, **kwargs):
        with _HostCopies(_copy_stream(torch.cuda.current_device())):
            return checkpoint_func(function, *args, **kwargs)

    return run


def offload_checkpointed_layers(model) -> int:
    """Turn the checkpointed layers of `model` (checkpointing already enabled) to host-memory inputs
    copied on a side stream; returns how many layers. CUDA only."""
    layers = 0
    for module in model.modules():
        # transformers keeps each layer's checkpoint function here (modeling_utils._set_gradient_checkpointing).
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = offloaded(module._gradient_checkpointing_func)
            layers += 1
    return layers
