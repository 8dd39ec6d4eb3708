"""train.fp8 (chat_doctor/training/fp8.py) on a CPU: the key, its resolution, and the numerics.

On a CPU the fp8 products are emulated (the same rounding to fp8, then a float32 product), so
what is checked here is the quantization and the autograd math; the GPU kernel is measured by
bench/fp8_check.py. Error bounds come from e4m3's 3 mantissa bits: rounding to nearest moves a
value by at most half a unit in the last place, u = 2^-4 of it (e5m2: 2^-3).
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from chat_doctor.config import TrainConfig, build_config, cli_overrides
from chat_doctor.training import fp8
from chat_doctor.training.fp8 import (
    E4M3,
    E5M2,
    Fp8Linear,
    Fp8LinearOnTheFly,
    fp8_base_layers,
    fp8_mm,
    quantize_rowwise,
    quantize_rowwise_transposed,
    resolve_fp8,
)

U = {E4M3: 2.0**-4, E5M2: 2.0**-3}  # unit roundoff: half the gap between neighbouring fp8 values
# Below the smallest normal value the gap is fixed: 2^-9 (e4m3), 2^-16 (e5m2) in scaled units.
SUBNORMAL_HALF_GAP = {E4M3: 2.0**-10, E5M2: 2.0**-17}
on_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's resolution")


# The key ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["auto", True, False])
def test_the_key_takes_auto_true_false(value):
    assert TrainConfig(fp8=value).fp8 == value


def test_the_key_rejects_other_values_and_fsdp():
    with pytest.raises(ValidationError, match="fp8"):
        TrainConfig(fp8="sometimes")
    with pytest.raises(ValidationError, match=r"train\.fp8"):
        TrainConfig(fp8=True, strategy="fsdp", upcast_layers=False)
    assert TrainConfig(fp8="auto", strategy="fsdp", upcast_layers=False).fp8 == "auto"  # resolved off at run time


def test_the_weights_key_takes_fp8_or_4bit():
    assert TrainConfig().fp8_weights == "fp8"
    assert TrainConfig(fp8=True, fp8_weights="4bit").fp8_weights == "4bit"
    with pytest.raises(ValidationError, match="fp8_weights"):
        TrainConfig(fp8_weights="nf4")


def test_the_key_from_the_command_line():
    cfg = build_config({"preset": "mistral-7b", **_nested(cli_overrides(["train.fp8=false"]))})
    assert cfg.train.fp8 is False
    cfg = build_config({"preset": "mistral-7b", **_nested(cli_overrides(["train.fp8=auto"]))})
    assert cfg.train.fp8 == "auto"


def _nested(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


@on_cpu_only
def test_auto_is_off_on_a_cpu_without_error():
    assert fp8.unsupported_reason() == "no CUDA GPU"
    assert resolve_fp8("auto", torch.bfloat16) is False
    assert resolve_fp8(False, torch.bfloat16) is False


@on_cpu_only
def test_true_on_a_cpu_is_an_error_naming_the_key():
    with pytest.raises(RuntimeError, match=r"train\.fp8 = true: no CUDA GPU"):
        resolve_fp8(True, torch.bfloat16)


# Quantizing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_rowwise_round_trip_within_half_an_fp8_step(dtype):
    # Rows six orders of magnitude apart: each gets its own scale.
    t = torch.randn(128, 512) * torch.logspace(-3, 3, 128).unsqueeze(1)
    q, scale = quantize_rowwise(t, dtype=dtype)
    assert q.dtype == dtype and scale.shape == (128, 1) and scale.dtype == torch.float32
    back = q.float() * scale
    # Normal range: |error| <= u |t|; below the smallest normal, <= half the fixed gap (times the scale).
    bound = torch.maximum(U[dtype] * t.abs(), SUBNORMAL_HALF_GAP[dtype] * scale) * (1 + 1e-6)
    assert ((back - t).abs() <= bound).all()
    # Each row's largest magnitude lands on the format's largest value: no range is wasted.
    assert torch.allclose(back.abs().amax(dim=1), t.abs().amax(dim=1), rtol=1e-6)


def test_a_zero_row_stays_zero():
    t = torch.randn(4, 64)
    t[2] = 0
    q, scale = quantize_rowwise(t)
    assert torch.isfinite(scale).all() and (q[2].float() == 0).all()


def test_column_scales_are_folded_in_before_quantizing():
    t, cols = torch.randn(8, 64), torch.rand(1, 64) + 0.5
    q, scale = quantize_rowwise(t, cols)
    reference = t * cols
    assert ((q.float() * scale - reference).abs() <= U[E4M3] * reference.abs() + 1e-6 * scale).all()


# The product and its gradient --------------------------------------------------------------------


def _error_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |fp8 product - exact product|: each operand is off by at most u of its
    value (plus the subnormal term), so each term a_ik b_kj by at most (2u + u^2) of its magnitude."""
    u = U[E4M3]
    return (2 * u + u * u) * (a.abs() @ b.abs()) + 1e-3 * (a.abs() @ b.abs()).amax() * 2.0**-6


def test_forward_and_input_gradient_within_the_fp8_bounds():
    torch.manual_seed(1)
    m, k, n = 96, 256, 160
    weight = torch.randn(n, k, dtype=torch.float64) / math.sqrt(k)
    x = torch.randn(m, k, dtype=torch.float64)
    grad_y = torch.randn(m, n, dtype=torch.float64)
    layer = Fp8Linear(weight.float(), None, keep_transposed=False, grad_dtype=E4M3)
    xf = x.float().requires_grad_()
    y = layer(xf)
    y.backward(grad_y.float())
    y_ref, gx_ref = x @ weight.T, grad_y @ weight

    # Elementwise: within the worst case the rounding allows.
    assert ((y.double() - y_ref).abs() <= _error_bound(x, weight.T)).all()
    assert ((xf.grad.double() - gx_ref).abs() <= _error_bound(grad_y, weight)).all()
    # In norm: the errors are independent and of either sign, so they add up to ~sqrt(2) x the
    # rms relative rounding error of one operand (~0.026 for e4m3): ~0.037, far under 2u = 0.125.
    for got, ref in ((y.detach().double(), y_ref), (xf.grad.double(), gx_ref)):
        rel = float((got - ref).norm() / ref.norm())
        assert 0.01 < rel < 0.05, rel  # above 0.01: the products really went through fp8


def test_the_weight_is_frozen_and_held_once():
    layer = Fp8Linear(torch.randn(32, 48), None, keep_transposed=False, grad_dtype=E4M3)
    assert list(layer.parameters()) == [] and list(layer.buffers()) == []
    assert layer.w_q.dtype == E4M3 and layer.w_q.shape == (32, 48) and layer.w_q_t is None
    both = Fp8Linear(torch.randn(32, 48), None, keep_transposed=True, grad_dtype=E4M3)
    assert torch.equal(both.w_q_t.float(), both.w_q.t().float())


def test_the_transposed_quantizer_writes_the_transpose_row_major_with_a_scale_per_column():
    t = torch.randn(40, 64) * torch.logspace(-2, 2, 64)  # columns of very different size
    q_t, scale = quantize_rowwise_transposed(t)
    assert q_t.shape == (64, 40) and q_t.is_contiguous() and scale.shape == (64, 1)
    reference_q, reference_scale = quantize_rowwise(t.t().contiguous())
    assert torch.equal(q_t.float(), reference_q.float()) and torch.equal(scale, reference_scale)


def test_quantized_on_the_fly_the_forward_is_the_held_copys_and_the_gradient_within_bounds():
    """train.fp8_weights: 4bit quantizes the weight for each product: the forward rounds it exactly as
    the held copy does; the input gradient uses a scale per input column instead of per output row,
    so it differs from the copy's, within the same fp8 bounds."""
    torch.manual_seed(2)
    m, k, n = 80, 192, 144
    base = torch.nn.Linear(k, n, bias=True)
    x = torch.randn(2, m // 2, k, dtype=torch.float64)
    grad_y = torch.randn(2, m // 2, n, dtype=torch.float64)
    held = Fp8Linear(base.weight.detach(), base.bias, keep_transposed=False, grad_dtype=E4M3)
    fly = Fp8LinearOnTheFly(base, grad_dtype=E4M3)
    assert list(fly.parameters()) == list(base.parameters())  # the base's own weights, nothing more
    xs = [x.float().requires_grad_() for _ in range(2)]
    ys = [layer(xi) for layer, xi in zip((held, fly), xs, strict=True)]
    assert torch.equal(ys[0], ys[1])
    for y in ys:
        y.backward(grad_y.float())
    weight = base.weight.detach().double()
    gx_ref = grad_y.reshape(m, n) @ weight
    got = xs[1].grad.reshape(m, k).double()
    assert ((got - gx_ref).abs() <= _error_bound(grad_y.reshape(m, n), weight)).all()
    assert 0.01 < float((got - gx_ref).norm() / gx_ref.norm()) < 0.05
    assert base.weight.grad is None  # frozen: no weight gradient is made


def test_held_and_on_the_fly_transposes_give_the_same_gradient():
    weight, x = torch.randn(64, 32), torch.randn(5, 7, 32)  # leading dimensions are kept
    grads = []
    for keep in (False, True):
        xi = x.clone().requires_grad_()
        Fp8Linear(weight, None, keep_transposed=keep, grad_dtype=E4M3)(xi).sum().backward()
        grads.append(xi.grad)
    assert grads[0].shape == x.shape and torch.equal(grads[0], grads[1])


def test_emulation_matches_torch_scaled_mm_on_the_cpu():
    a_q, a_s = quantize_rowwise(torch.randn(48, 64))
    b_q, b_s = quantize_rowwise(torch.randn(80, 64))
    emulated = fp8_mm(a_q, a_s, b_q.t(), b_s.reshape(1, -1), torch.bfloat16, False)
    try:
        kernel = torch._scaled_mm(a_q, b_q.t(), scale_a=a_s, scale_b=b_s.reshape(1, -1), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"this torch has no CPU rowwise _scaled_mm: {err}")
    # The same fp8 operands: only the rounding of the fp32 sums to bf16 may differ (2^-8 relative).
    assert torch.allclose(kernel.float(), emulated.float(), rtol=2**-7, atol=1e-2)


# Inside a LoRA model -----------------------------------------------------------------------------


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(64, 128, bias=False)
        self.down = torch.nn.Linear(128, 64, bias=True)
        self.odd = torch.nn.Linear(64, 24, bias=False)  # 24 is no multiple of 16: stays as it is

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + self.odd(x).sum(-1, keepdim=True)


def test_lora_wrappers_get_fp8_bases_and_the_adapters_still_train():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_Block(), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down", "odd"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)  # non-zero, so lora_A gets a gradient too
    x = torch.randn(3, 10, 64)
    before = model(x).detach()

    assert fp8_base_layers(model) == 2
    inner = model.base_model.model
    assert isinstance(inner.up.base_layer, Fp8Linear) and isinstance(inner.down.base_layer, Fp8Linear)
    assert isinstance(inner.odd.base_layer, torch.nn.Linear)
    after = model(x)
    assert float((after.detach() - before).norm() / before.norm()) < 0.05
    after.pow(2).mean().backward()
    trained = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(g is not None and g.abs().sum() > 0 for g in trained.values())
    assert all("lora_" in n for n in trained)  # nothing of the base trains


def test_the_4bit_base_of_the_pipeline_becomes_fp8():
    """The tiny Mistral as training loads it (NF4 through bitsandbytes, LoRA on all seven projections):
    every projection's base is dequantized once into fp8 and the 4-bit weights are gone."""
    from chat_doctor.training.trainer import adapted_model

    cfg = build_config({"preset": "cpu-tiny", "train": {"fp8": "auto"}})
    model = adapted_model(cfg)  # auto on a CPU: left as it was
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())
    ids = torch.randint(0, 1000, (1, 24))
    before = model(input_ids=ids).logits.detach()

    layers = cfg.lora.target_modules
    assert fp8_base_layers(model) == len(layers) * model.config.num_hidden_layers
    assert not any(type(p).__name__ == "Params4bit" for p in model.parameters())
    out = model(input_ids=ids, labels=ids)
    # 28 products of ~3.7% error each, compounding through 4 random layers: 6% seen; a weight
    # dequantized from the wrong layout (bitsandbytes re-lays it out on a CPU forward) gave 140%.
    assert float((out.logits.detach() - before).norm() / before.norm()) < 0.15
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_the_4bit_base_kept_when_fp8_is_made_on_the_fly():
    """train.fp8_weights: 4bit on the tiny Mistral as training loads it: every projection computes in
    fp8, the 4-bit weights stay (the same parameters, no fp8 copy), and the adapters still train."""
    from chat_doctor.training.trainer import adapted_model

    cfg = build_config({"preset": "cpu-tiny", "train": {"fp8": "auto", "fp8_weights": "4bit"}})
    model = adapted_model(cfg)
    ids = torch.randint(0, 1000, (1, 24))
    before = model(input_ids=ids).logits.detach()
    params_before = {n: p.data_ptr() for n, p in model.named_parameters()}

    swapped = fp8_base_layers(model, weights="4bit")
    assert swapped == len(cfg.lora.target_modules) * model.config.num_hidden_layers
    assert sum(isinstance(m, Fp8LinearOnTheFly) for m in model.modules()) == swapped
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())
    params_after = {n.replace(".base_layer.base.", ".base_layer."): p.data_ptr() for n, p in model.named_parameters()}
    assert params_after == params_before  # the same tensors: the 4-bit weights are neither copied nor freed
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())
    out = model(input_ids=ids, labels=ids)
    assert float((out.logits.detach() - before).norm() / before.norm()) < 0.15
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
