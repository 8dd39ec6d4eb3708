"""The Prefect task decorator of the steps whose results a retry reuses."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.cache_policies import DEFAULT, CachePolicy

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class ThisCheckout(CachePolicy):
    """The project folder the step ran in, as this very checkout: a step's record holds paths in it
    (data folders, run folders, a DVC experiment's commit). A retry in the same folder reuses what
    finished; a retry that a work pool runs in a fresh clone (another folder, or the same path cloned
    again) makes it again instead of handing on paths and commits that clone does not have."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        # A fresh clone has a new .git folder (another inode); git's own writes inside it keep this one.
        git = os.stat(".git") if os.path.exists(".git") else os.stat(".")
        return f"{os.getcwd()}:{git.st_dev}:{git.st_ino}"


def step(name: str, **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]:
    """`prefect.task` with the result stored as JSON (the step's record: paths, ids, figures; never a
    pickle): within a flow run, Prefect's default cache policy (inputs + run id), in this checkout,
    then hands a retry what already finished instead of redoing it."""
    return task(
        name=name, persist_result=True, result_serializer="json", cache_policy=DEFAULT + ThisCheckout(), **options
    )
