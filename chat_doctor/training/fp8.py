"""The frozen base's matrix products in fp8 (`train.fp8`), LoRA and everything trainable in bf16.

QLoRA trains only the adapters, so the base's linear layers need two products a step: the forward
one, y = x W^T, and the input gradient, grad_x = grad_y W; never a weight gradient. On GPUs with
fp8 tensor cores (compute capability 8.9+: Ada, Hopper) both run as `torch._scaled_mm` products
of e4m3 operands with one float32 scale per row (per token for activations and gradients, per
output row for the weight), accumulating in fp32 and returning bf16; that is PyTorch's own
maintained kernel (cuBLAS / CUTLASS), nothing hand-written here.

The weight, two ways (`train.fp8_weights`):
- `fp8` (Fp8Linear): each base Linear (bitsandbytes NF4, or plain) is dequantized once and kept as
  ONE fp8 copy, W ~ s_w[n] * Q[n, k], 1 byte a parameter (7.0 GB for Mistral-7B's 7.0B base-layer
  parameters), and the NF4 weights (3.8 GB) are freed. The input-gradient product needs the other
  orientation of Q (fp8 tensor cores take both operands K-major), so the backward transposes Q on
  the fly (a read and a write of 1 byte a parameter, one compiled copy kernel per layer) instead of
  holding a second copy (+7 GB); `keep_transposed=True` holds it. The weight's row scales are
  folded into the gradient before it is quantized, grad_x = (grad_y * s_w) Q, so the one copy and
  its scales serve both products exactly.
- `4bit` (Fp8LinearOnTheFly): the 4-bit weights stay as they are and every product dequantizes its
  weight (bitsandbytes' kernel, as the bf16 path does) and quantizes it to fp8 (one compiled pass,
  in the orientation that product needs: per output row forward, per input column backward). No
  memory beyond the 4-bit base; one more pass over each weight per product: the choice of a
  memory-bound recipe (mistral-7b-lean), whose recomputed forward pass pays for fp8 twice.

Quantizing activations and gradients is a memory-bound pass; on CUDA it is torch.compile'd into
one kernel per call (read bf16 once, write fp8 and the scales). Elsewhere (CPU) the products are
emulated: the same rounding to fp8, then a float32 product of the dequantized operands, which is
what the tensor cores compute up to the order of the fp32 sums.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import nn

from chat_doctor.core.logs import get_logger

logger = get_logger(__name__)

E4M3 = torch.float8_e4m3fn  # 3 mantissa bits, max 448: the forward operands and, by default, gradients
E5M2 = torch.float8_e5m2  # 2 mantissa bits, max 57344: more range, less precision
MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0) and later
FORWARD_FAST_ACCUM = True  # as torchao's float8 training: fast accumulation for the output only,
BACKWARD_FAST_ACCUM = False  # full fp32 accumulation for the gradient


# ---------------------------------------------------------------------------------------------
# When fp8 is used


def unsupported_reason() -> str | None:
    """Why this process cannot run fp8 products on its GPU, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return f"GPU compute capability {capability[0]}.{capability[1]} < 8.9 (no fp8 tensor cores)"
    return _probe_rowwise()


@functools.cache
def _probe_rowwise() -> str | None:
    """One tiny rowwise-scaled product: some torch/CUDA builds lack the rowwise kernel on some GPUs."""
    try:
        a = torch.ones(16, 32, device="cuda").to(E4M3)
        b = torch.ones(16, 32, device="cuda").to(E4M3)
        ones = torch.ones(16, 1, device="cuda")
        out = torch._scaled_mm(a, b.t(), scale_a=ones, scale_b=ones.t(), out_dtype=torch.bfloat16)
        torch.cuda.synchronize()
        return None if float(out[0, 0]) == 32.0 else f"rowwise fp8 product gave {float(out[0, 0])}, not 32"
    except (RuntimeError, AttributeError) as err:
        return f"rowwise fp8 product unavailable ({type(err).__name__}: {str(err)[:120]})"


def resolve_fp8(setting: bool | Literal["auto"], compute_dtype: torch.dtype) -> bool:
    """train.fp8 for this process: auto = on where the GPU has fp8 tensor cores and the model
    computes in bf16, otherwise off without error; true = on, or an error that says why not."""
    if setting is False:
        return False
    reason = unsupported_reason()
    if reason is None and compute_dtype != torch.bfloat16:
        reason = f"model.compute_dtype is {compute_dtype}, not bfloat16 (the fp8 products return bf16)"
    if reason is None:
        return True
    if setting == "auto":
        logger.info("train.fp8 = auto: bf16 products (%s)", reason)
        return False
    raise RuntimeError(f"train.fp8 = true: {reason}; set train.fp8 to auto or false")


# ---------------------------------------------------------------------------------------------
# Quantizing and the product


def quantize_rowwise(
    t: torch.Tensor, col_scale: torch.Tensor | None = None, dtype: torch.dtype = E4M3
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) with t * col_scale ~ s * q: q in fp8 `dtype`, s a float32 scale per row (shape
    (rows, 1)) that maps the row's largest magnitude to the format's largest value. `col_scale`
    (shape (1, cols)) multiplies the columns first: how the weight's row scales enter the gradient."""
    t = t.float() if col_scale is None else t.float() * col_scale
    fmax = torch.finfo(dtype).max
    # A row of zeros gets a tiny scale instead of 0, so it stays zeros rather than NaN.
    scale = t.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / fmax
    return (t / scale).clamp(-fmax, fmax).to(dtype), scale


@functools.cache
def _quantizer(on_cuda: bool):
    # Eager, quantize_rowwise is ~5 passes over the tensor; compiled it is one kernel. Dynamic
    # shapes: one graph for every token count and width.
    return torch.compile(quantize_rowwise, dynamic=True) if on_cuda else quantize_rowwise


def transpose_fp8(w: torch.Tensor) -> torch.Tensor:
    """w^T laid out row-major (a copy), bit for bit: moved as bytes."""
    return w.view(torch.uint8).t().contiguous().view(w.dtype)


def quantize_rowwise_transposed(t: torch.Tensor, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rowwise of t^T, written row-major: (q_t, s) with t^T ~ s * q_t, one scale per column of t."""
    q, scale = quantize_rowwise(t.t(), dtype=dtype)
    return q.contiguous(), scale


@functools.cache
def _transposed_quantizer(on_cuda: bool):
    return torch.compile(quantize_rowwise_transposed, dynamic=True) if on_cuda else quantize_rowwise_transposed


@functools.cache
def _transposer(on_cuda: bool):
    # Eager, PyTorch's copy kernel moves one byte per element at ~0.27 TB/s (0.43 ms for a 4096 x
    # 14336 weight on an H100); compiled, it is one tiled Triton kernel.
    return torch.compile(transpose_fp8, dynamic=True) if on_cuda else transpose_fp8


def fp8_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    fast_accum: bool,
) -> torch.Tensor:
    """(a_scale * a) @ (b * b_scale): a (M, K) row-major fp8 with scales (M, 1); b (K, N) fp8 laid
    out column-major (the transpose of a contiguous (N, K) tensor) with scales (1, N)."""
    if a.is_cuda:
        # The kernel takes contiguous scales only (a no-op for the ones made here).
        a_scale, b_scale = a_scale.contiguous(), b_scale.contiguous()
        return torch._scaled_mm(a, b, scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return ((a.float() * a_scale) @ (b.float() * b_scale)).to(out_dtype)


class _Fp8Product(torch.autograd.Function):
    """y = x W^T with W = w_scale * w_q (per output row); the backward returns grad_x only (the
    weight is frozen). The weight tensors travel as arguments and stay on ctx, not in
    save_for_backward: nothing of the layer's input is kept, and saved-tensor hooks (offloading,
    checkpointing) never see the weight."""

    @staticmethod
    def forward(ctx, x, w_q, w_scale, w_q_t, ones_k, grad_dtype):
        quantize = _quantizer(x.is_cuda)
        x2 = x.reshape(-1, x.shape[-1])
        x_q, x_scale = quantize(x2)
        y = fp8_mm(x_q, x_scale, w_q.t(), w_scale, x.dtype, FORWARD_FAST_ACCUM)
        ctx.weights = (w_q, w_scale, w_q_t, ones_k)
        ctx.grad_dtype, ctx.x_shape, ctx.x_dtype = grad_dtype, x.shape, x.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        w_q, w_scale, w_q_t, ones_k = ctx.weights
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        # grad_x = grad_y W = (grad_y * s_w) Q: fold the weight's row scales in, then one scale per token.
        g_q, g_scale = _quantizer(grad_y.is_cuda)(g2, w_scale, ctx.grad_dtype)
        # The product wants Q^T row-major, i.e. Q transposed in memory (held, or made here).
        q_t = w_q_t if w_q_t is not None else _transposer(w_q.is_cuda)(w_q)
        grad_x = fp8_mm(g_q, g_scale, q_t.t(), ones_k, ctx.x_dtype, BACKWARD_FAST_ACCUM)
        return grad_x.reshape(ctx.x_shape), None, None, None, None, None


class _Fp8ProductOnTheFly(torch.autograd.Function):
    """y = x W^T with W the frozen base layer's weight, quantized to fp8 for this product and again
    (in the other orientation) for the input gradient; nothing of it is kept between the two, so a
    checkpointed layer holds no fp8 weight while it waits for its backward pass."""

    @staticmethod
    def forward(ctx, x, layer, grad_dtype):
        on_cuda = x.is_cuda
        w_q, w_scale = _quantizer(on_cuda)(layer.dense_weight())
        x2 = x.reshape(-1, x.shape[-1])
        x_q, x_scale = _quantizer(on_cuda)(x2)
        y = fp8_mm(x_q, x_scale, w_q.t(), w_scale.reshape(1, -1), x.dtype, FORWARD_FAST_ACCUM)
        ctx.layer, ctx.grad_dtype, ctx.x_shape, ctx.x_dtype = layer, grad_dtype, x.shape, x.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        on_cuda = grad_y.is_cuda
        # grad_x = grad_y W: W^T row-major in fp8, one scale per input column (the product's column scales).
        w_t_q, w_t_scale = _transposed_quantizer(on_cuda)(ctx.layer.dense_weight())
        g_q, g_scale = _quantizer(on_cuda)(grad_y.reshape(-1, grad_y.shape[-1]), None, ctx.grad_dtype)
        grad_x = fp8_mm(g_q, g_scale, w_t_q.t(), w_t_scale.reshape(1, -1), ctx.x_dtype, BACKWARD_FAST_ACCUM)
        return grad_x.reshape(ctx.x_shape), None, None


class Fp8LinearOnTheFly(nn.Module):
    """A frozen Linear (bitsandbytes 4-bit, or plain) kept as it is, whose products run in fp8 from
    its weight dequantized and quantized to fp8 for each product (train.fp8_weights: 4bit)."""

    def __init__(self, base: nn.Module, *, grad_dtype) -> None:
        super().__init__()
        shape = _shape(base)
        if shape is None:
            raise TypeError(f"not a Linear layer: {type(base).__name__}")
        self.base = base  # its (4-bit) weight stays a frozen parameter of the model, as before
        self.out_features, self.in_features = shape
        self.grad_dtype = grad_dtype

    def dense_weight(self) -> torch.Tensor:
        weight = _dense_weight(self.base)
        assert weight is not None
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Fp8ProductOnTheFly.apply(x, self, self.grad_dtype)
        bias = getattr(self.base, "bias", None)
        return y if bias is None else y + bias.detach().to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 rowwise, on the fly"


class Fp8Linear(nn.Module):
    """A frozen Linear whose products run in fp8: what a LoRA wrapper's `base_layer` becomes.

    The fp8 weight and its scales are plain attributes, not parameters or buffers: nothing trains
    them, they are not saved with the adapter, and DDP would otherwise broadcast them (7 GB) from
    the first process before every forward pass."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, keep_transposed: bool, grad_dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w_q, w_scale = quantize_rowwise(weight)
        self.w_q = w_q
        self.w_scale = w_scale.reshape(1, -1).contiguous()  # (1, N): one scale per output row
        self.w_q_t = transpose_fp8(w_q) if keep_transposed else None
        self.ones_k = torch.ones(1, self.in_features, device=weight.device)  # the transposed product's scales
        self.bias = None if bias is None else bias.detach()
        self.grad_dtype = grad_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Fp8Product.apply(x, self.w_q, self.w_scale, self.w_q_t, self.ones_k, self.grad_dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        held = "both orientations" if self.w_q_t is not None else "one orientation"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 rowwise, {held}"


def _dense_weight(layer: nn.Module) -> torch.Tensor | None:
    """The layer's weight in full precision: bitsandbytes 4-bit dequantized, or a plain Linear's."""
    weight = getattr(layer, "weight", None)
    if weight is None:
        return None
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbf

        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # Re-laid out by a CPU forward pass (bitsandbytes' AVX-512 path); undone as bitsandbytes
            # does before saving (the undoing changes the state: it must happen once).
            weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    return weight.detach() if type(layer) is nn.Linear else None


def _shape(layer: nn.Module) -> tuple[int, int] | None:
    """(out, in) features of a Linear, plain or bitsandbytes 4-bit (whose packed weight hides them)."""
    out_f, in_f = getattr(layer, "out_features", None), getattr(layer, "in_features", None)
    return (out_f, in_f) if isinstance(out_f, int) and isinstance(in_f, int) else None


def fp8_base_layers(
    model: nn.Module,
    *,
    weights: Literal["fp8", "4bit"] = "fp8",
    keep_transposed: bool = False,
    grad_dtype: torch.dtype = E4M3,
) -> int:
    """Swap every LoRA wrapper's frozen base layer for an fp8 one: weights "fp8", an Fp8Linear (weights
    dequantized once into one fp8 copy, the 4-bit copies freed); "4bit", an Fp8LinearOnTheFly (the
    4-bit weights kept, quantized to fp8 for each product). Returns how many were swapped; layers
    whose sizes the fp8 product cannot take (not multiples of 16) stay as they are."""
    swapped, kept = 0, []
    # The wrappers only: each old base layer is dropped (and its memory freed) as it is replaced.
    wrappers = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    for name, module in wrappers:
        base = module.base_layer
        shape = _shape(base)
        usable = getattr(base, "weight", None) is not None and (
            getattr(base.weight, "quant_state", None) is not None or type(base) is nn.Linear
        )
        if not usable or shape is None or shape[0] % 16 or shape[1] % 16:
            kept.append(name)
            continue
        if weights == "4bit":
            module.base_layer = Fp8LinearOnTheFly(base, grad_dtype=grad_dtype)
        else:
            weight = _dense_weight(base)
            module.base_layer = Fp8Linear(
                weight, getattr(base, "bias", None), keep_transposed=keep_transposed, grad_dtype=grad_dtype
            )
            del weight  # with `base`, the last references to the 4-bit weight
        swapped += 1
        del base
    if kept:
        logger.warning("train.fp8: %d layers kept their own products (sizes or type): %s", len(kept), kept[:4])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the freed 4-bit weights
    return swapped
