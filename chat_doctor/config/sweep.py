"""Section `sweep`: how the `sweep` flow fans a grid of fine-tunes out over the work pool."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from chat_doctor.config.common import Section


class SweepConfig(Section):
    max_trials: int = Field(
        16, gt=0, description="The most trials one sweep may start; a larger one is refused before any trial starts."
    )
    search: Literal["grid", "random"] = Field(
        "grid",
        description="grid: every combination of the grid's values. random: `trials` combinations drawn "
        "from the grid without repeats (seeded by `seed`).",
    )
    trials: int | None = Field(None, gt=0, description="random search: combinations drawn (null: all, shuffled).")
    seed: int = Field(0, ge=0, description="random search: which combinations are drawn.")
    deployment: str = Field(
        "default",
        pattern=r"^[\w.-]+$",
        description="Each trial is a flow run of finetune/<deployment>, so it runs on that deployment's "
        "workers (a work pool: one trial per free GPU machine).",
    )
