"""The unsloth peer for bench/gpu_speed.py: same model folder, same tokenized rows, same step timer.

Runs in its own environment (unsloth pins transformers <= 5.17 and trl <= 1.15), never imported by
the project; bench/gpu_speed.py starts it with PYTHONPATH pointing at that environment:

    PYTHONPATH=<unsloth site>:. python bench/peer_unsloth.py --model <folder> --data <train.arrow>

Its recipe is unsloth's own: NF4 base, LoRA r=32/alpha=64 on the seven projections, dropout 0,
its offloaded gradient checkpointing (or none: --checkpointing off), trl's SFTTrainer packing rows
into --seq-token bins, --batch bins per micro-batch, --grad-accum micro-batches per step, loss on the
answers only, 8-bit AdamW.

--varlen-gqa makes the peer fair on torch builds whose `varlen_attn` has no `enable_gqa` (2.11):
unsloth then turns its varlen path off and loops SDPA over every packed row. Given the work-around
chat_doctor/training/attention.py uses for our recipes (the key/value heads repeated to the query's), set in
this process before unsloth loads, every varlen call of unsloth goes through torch's kernel.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")


def give_varlen_gqa() -> bool:
    """Wrap torch's varlen_attn to take `enable_gqa` (repeating the key/value heads); False when
    this torch has it already."""
    import torch.nn.attention.varlen as varlen

    original = varlen.varlen_attn
    signature = inspect.signature(original)
    if "enable_gqa" in signature.parameters:
        return False
    query, key, value = list(signature.parameters)[:3]

    @functools.wraps(original)
    def varlen_attn(*args, enable_gqa: bool = False, **kwargs):
        bound = signature.bind(*args, **kwargs)
        q, k, v = (bound.arguments[name] for name in (query, key, value))
        if enable_gqa and k.shape[-2] < q.shape[-2]:  # (tokens, heads, dim)
            groups = q.shape[-2] // k.shape[-2]
            bound.arguments[key] = k.repeat_interleave(groups, dim=-2)
            bound.arguments[value] = v.repeat_interleave(groups, dim=-2)
        return original(*bound.args, **bound.kwargs)

    extra = inspect.Parameter("enable_gqa", inspect.Parameter.KEYWORD_ONLY, default=False)
    params = list(signature.parameters.values())
    varlen_attn.__signature__ = signature.replace(parameters=[*params, extra])
    varlen.varlen_attn = varlen_attn
    os.environ["UNSLOTH_LEAN_VARLEN"] = "0"  # every varlen call through torch's kernel
    return True


if "--varlen-gqa" in sys.argv:
    print(f"varlen_attn given enable_gqa: {give_varlen_gqa()}", flush=True)

import unsloth  # noqa: E402, F401  (must come before transformers, trl and peft: it patches them)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--checkpointing", choices=["unsloth", "off"], default="unsloth")
    parser.add_argument("--varlen-gqa", action="store_true", help="the fair peer (see the module's docstring)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="/tmp/unsloth-peer")
    args = parser.parse_args()

    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    from bench.speed_probe import StepTimer, emit

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model, max_seq_length=args.seq, load_in_4bit=True, dtype=torch.bfloat16, local_files_only=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=32,
        lora_alpha=64,
        lora_dropout=0,
        bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth" if args.checkpointing == "unsloth" else False,
        random_state=0,
    )
    rows = datasets.Dataset.from_file(args.data)
    rows = rows.map(lambda r: {"completion_mask": [int(x != -100) for x in r["labels"]]}, remove_columns=["labels"])
    timer = StepTimer(args.warmup)
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=rows,
        callbacks=[timer],
        args=SFTConfig(
            output_dir=args.out,
            max_length=args.seq,
            packing=True,
            completion_only_loss=True,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.grad_accum,
            max_steps=args.warmup + args.steps,
            learning_rate=2e-4,
            warmup_steps=0,
            optim="adamw_8bit",
            bf16=True,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=0,
            include_num_input_tokens_seen="non_padding",
        ),
    )
    trainer.train()
    from unsloth.utils import attention_dispatch

    varlen = getattr(attention_dispatch, "_TORCH_VARLEN_ATTN", None)
    emit(
        {
            **timer.figures(),
            "micro_batch": f"{args.batch} bins of <= {args.seq} tokens",
            "grad_accum": args.grad_accum,
            "varlen": getattr(varlen, "__name__", None) if varlen else None,
        }
    )


if __name__ == "__main__":
    main()
