"""Serve the `finetune/default` deployment: `python -m flows.deploy [--limit N]` (needs PREFECT_API_URL).

The process stays up and runs each flow run that `prefect deployment run finetune/default` asks for,
in this project folder. At most `--limit` runs (default 1: one training on this machine's GPUs, or
CPU) run at once; the others wait in Prefect as Scheduled (AwaitingConcurrencySlot) until a slot
frees. Stop it with Ctrl-C (or `make stop`).
"""

from __future__ import annotations

import argparse

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.finetune import finetune


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--limit",
        type=int,
        default=1,
        help="flow runs at once (default 1: a training takes the machine's GPUs; each run needs its own "
        "GPU and train.gpus: 1 for more)",
    )
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error(f"--limit must be at least 1, not {args.limit}")
    finetune.serve(
        name="default",
        description="Fine-tune the base with QLoRA and register the adapter. overrides: dotted keys.",
        parameters={"overrides": {}},
        tags=["chat-doctor"],
        # Queued, not cancelled: a run over the limit waits for a slot (state AwaitingConcurrencySlot).
        global_limit=ConcurrencyLimitConfig(limit=args.limit, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
    )


if __name__ == "__main__":
    main()
