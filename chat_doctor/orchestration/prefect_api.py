"""Which Prefect server a command-line flow run reports to, without touching the user's profile.

`PREFECT_API_URL` (environment or Prefect profile) wins when it is set, and must answer. Otherwise
the project's own server, which `make server` records in .local/prefect-api-url, while it answers;
otherwise Prefect's temporary server for this one process (after `make stop`, or on a fresh clone).
"""

from __future__ import annotations

import urllib.request

from chat_doctor.core.layout import STATE_DIR
from chat_doctor.core.logs import get_logger

logger = get_logger(__name__)

RECORDED = STATE_DIR / "prefect-api-url"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=3):
            return True
    except OSError:
        return False


def api_url_for_this_run() -> str | None:
    """The server to use when none is configured (None: Prefect's temporary one); raises when a
    configured one does not answer, saying how to go on."""
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if configured:
        if not _answers(configured):
            raise SystemExit(
                f"PREFECT_API_URL = {configured} does not answer. Start that server (`make server` for the "
                "project's), or unset PREFECT_API_URL (`unset PREFECT_API_URL`, and `prefect config unset "
                "PREFECT_API_URL` if your Prefect profile sets it) to run on a temporary server."
            )
        return None
    if RECORDED.is_file():
        url = RECORDED.read_text().strip()
        if url and _answers(url):
            logger.info("Prefect: this project's server at %s", url)
            return url
    logger.info("Prefect: a temporary server for this run (start the project's with `make server` to keep its history)")
    return None


def deployment_exists(name: str) -> bool:
    """Whether deployment `flow/name` is on the Prefect server this process uses."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            return False
    return True


def wait_for_flow_runs(flow_run_ids: list[str], timeout_s: float | None = None, poll_s: float = 5) -> dict:
    """{id: flow run} once every one is final, or as they are when `timeout_s` has passed."""
    import time
    from uuid import UUID

    from prefect.client.orchestration import get_client

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = {i: client.read_flow_run(UUID(i)) for i in flow_run_ids}
            done = all(r.state and r.state.is_final() for r in runs.values())
            if done or (deadline is not None and time.monotonic() >= deadline):
                return runs
            time.sleep(poll_s)


def cancel_flow_runs(runs: list, message: str) -> list:
    """Cancel those of `runs` that have not ended; the ones cancelled. Not forced: Prefect's rules make
    a run that no worker has started Cancelled at once, and a running one Cancelling (its worker stops it)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    cancelled = [r for r in runs if not (r.state and r.state.is_final())]
    with get_client(sync_client=True) as client:
        for run in cancelled:
            client.set_flow_run_state(run.id, Cancelling(message=message))
    return cancelled
