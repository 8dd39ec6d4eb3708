"""Serve the `finetune/default` deployment: `python -m flows.deploy` (needs PREFECT_API_URL).

The process stays up and runs each flow run that `prefect deployment run finetune/default` asks for,
in this project folder. Stop it with Ctrl-C (or `make stop`).
"""

from flows.finetune import finetune


def main() -> None:
    finetune.serve(
        name="default",
        description="Fine-tune the base with QLoRA and register the adapter. overrides: dotted keys.",
        parameters={"overrides": {}},
        tags=["chat-doctor"],
    )


if __name__ == "__main__":
    main()
