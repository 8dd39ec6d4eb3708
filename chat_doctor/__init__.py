"""chat-doctor's foundations: everything the pipeline's steps (tasks/), its flow (flows/) and the chat
(app/) are built from. Nothing here imports a step, a flow or the app, and nothing runs at import time.

Sub-packages by role, each allowed to import only those below it (pyproject.toml's import-linter
contracts check it: `lint-imports`, part of `make test`):

    orchestration | serving | training    Prefect glue | chat UI model, GGUF, CLI | the train step's insides
    tracking                              MLflow runs, model registry, DVC lineage, model card
    evaluation                            metrics, scoring, report views
    data | models                         sources, cleaning, prompts, tokens | base and adapter loading
    config                                the one typed config
    core                                  files, project layout, step records, names, faults, logs
"""
