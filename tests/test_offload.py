"""The side-stream offload of checkpointed layer inputs (chat_doctor/training/offload.py) gives the same
gradients as keeping them on the GPU, and really leaves the GPU. CUDA only: run on a GPU machine."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from chat_doctor.training.offload import MIN_OFFLOAD_BYTES, _copy_stream, _HostCopies, offloaded

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the offload copies from a CUDA GPU")


def _layers(seed: int):
    torch.manual_seed(seed)
    return torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1024)) for _ in range(4)
    ).cuda()


def _grads(checkpoint_func):
    layers = _layers(0)
    x = torch.randn(2048, 1024, device="cuda", requires_grad=True)
    h = x
    for layer in layers:
        h = checkpoint_func(layer, h, use_reentrant=False)
    h.square().mean().backward()
    return [x.grad, *(p.grad for p in layers.parameters())]


def test_offloaded_checkpoints_give_the_gradients_of_plain_ones():
    plain, offload = _grads(checkpoint), _grads(offloaded(checkpoint))
    for a, b in zip(plain, offload, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_big_saved_tensors_wait_in_pinned_host_memory_and_small_ones_stay():
    hooks = _HostCopies(_copy_stream(torch.cuda.current_device()))
    big = torch.randn(1024, 1024, device="cuda")  # 4 MiB
    small = torch.arange(8, device="cuda")
    assert big.numel() * big.element_size() >= MIN_OFFLOAD_BYTES > small.numel() * small.element_size()
    packed = hooks.pack_hook(big)
    device, host, _ = packed
    assert (device.type, host.device.type, host.is_pinned()) == ("cuda", "cpu", True)
    assert hooks.pack_hook(small) is small
    back = hooks.unpack_hook(packed)
    assert back.device.type == "cuda"
    torch.testing.assert_close(back, big, rtol=0, atol=0)
