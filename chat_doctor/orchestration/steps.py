"""The Prefect task decorator of the steps whose results a retry reuses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task

P = ParamSpec("P")
R = TypeVar("R")


def step(name: str, **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]:
    """`prefect.task` with the result stored as JSON (the step's record: paths, ids, figures; never a
    pickle): within a flow run, Prefect's default cache policy (inputs + run id) then hands a retry
    what already finished instead of redoing it."""
    return task(name=name, persist_result=True, result_serializer="json", **options)
