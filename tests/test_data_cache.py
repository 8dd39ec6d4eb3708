"""The data steps' cache follows the data: after run A, run B and run A again, the third run's
data is A's (the cached result of A pointed at folders that B had overwritten)."""

import pytest
from prefect import flow

from bench.processes import task_states
from chat_doctor.config import load_config
from chat_doctor.core.files import content_hash
from chat_doctor.core.layout import PROCESSED_DIR, TOKENIZED_DIR

pytestmark = pytest.mark.slow
A = {"data.rows": 40}
B = {"data.rows": 60}


@flow(name="data-steps")
def data_steps(overrides: dict) -> dict:
    """The finetune flow's data steps, as it calls them."""
    from tasks.sample import sample
    from tasks.tokenize import tokenize

    cfg = load_config("params.yaml", overrides)
    tokenize(cfg.tokenize, cfg.model, sample(cfg.data))
    return {"processed": content_hash(PROCESSED_DIR), "tokenized": content_hash(TOKENIZED_DIR)}


def run(overrides: dict) -> tuple[dict, dict]:
    state = data_steps(overrides, return_state=True)
    states = task_states(state.state_details.flow_run_id)
    return state.result(), {name: states[name] for name in ("sample", "tokenize")}


def test_a_then_b_then_a_gives_a_s_data_again(project, prefect_server):
    first, states = run(A)
    assert states == {"sample": "Completed", "tokenize": "Completed"}
    again, states = run(A)
    assert again == first and states == {"sample": "Cached", "tokenize": "Cached"}
    other, _ = run(B)
    assert other["processed"] != first["processed"]
    back, states = run(A)  # A's cache entry still exists, but the folders hold B's data
    assert back == first and states == {"sample": "Completed", "tokenize": "Completed"}
    (PROCESSED_DIR / "eval.jsonl").write_text("edited by hand\n")  # outputs changed behind the cache
    _, states = run(A)
    assert states["sample"] == "Completed" and content_hash(PROCESSED_DIR) == first["processed"]
