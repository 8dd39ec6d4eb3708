"""The chat on a registered champion: the Gradio page in headless Chromium (Playwright), its API
through gradio_client, the terminal chat, and the safe defaults (loopback only, optional login)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.processes import free_port
from tests.conftest import QUICK_EVAL, copy_project

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
# Headless, and no calls home: this machine's network is closed and Chromium would retry them.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
QUESTION = "I have had a headache and a fever for two days. What should I do?"


@pytest.fixture(scope="module")
def champion_project(tmp_path_factory, tiny_model_dir) -> Path:
    """A project copy whose registry holds a trained adapter as `champion`."""
    from chat_doctor.config import load_config
    from chat_doctor.tracking import start_run
    from tasks.evaluate import run_evaluate
    from tasks.merge import run_merge
    from tasks.register import run_register
    from tasks.sample import run_sample
    from tasks.tokenize import run_tokenize
    from tasks.train import run_train

    root = copy_project(tmp_path_factory.mktemp("chat") / "project")
    (root / "models").mkdir()
    shutil.copytree(tiny_model_dir, root / "models" / "tiny-mistral")
    before, env_uri = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(root)
    try:
        cfg = load_config("params.yaml", {"data.rows": 40, "train.max_steps": 6, **QUICK_EVAL})
        processed = run_sample(cfg.data)
        tokenized = run_tokenize(cfg.tokenize, cfg.model, processed)
        adapter = run_train(cfg, tokenized)["adapter"]
        merged = run_merge(cfg, adapter)["merged"]
        report = run_evaluate(cfg, tokenized["eval"], processed["eval"], merged)["report"]
        registered = run_register(cfg, start_run("chat-doctor", "chat", {}, {}), adapter, merged, report, {})
        assert registered["aliases"] == ["candidate", "champion"]
    finally:
        os.chdir(before)
        if env_uri:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri
    return root


def project_env(root: Path) -> dict[str, str]:
    """The environment for a process in `root`: its own code and its own MLflow store (an earlier
    test's tracking URI, exported by mlflow.set_tracking_uri, must not leak in)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": str(root)}


@contextmanager
def served_chat(root: Path, *args: str, **env: str):
    """`python -m app.chat` in the project; yields its URL once it answers."""
    port = free_port()
    log = open(root / f"chat-{port}.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "app.chat", "--port", str(port), *args],
        cwd=root,
        env={**project_env(root), **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, (root / f"chat-{port}.log").read_text()[-3000:]
            assert time.time() < deadline, "the chat never answered"
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (a login page answers 401 to some paths)
            except OSError:
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def chat_url(champion_project):
    with served_chat(champion_project) as url:
        yield url


def test_browser_sees_the_disclaimer_the_card_and_a_streamed_answer(chat_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(chat_url, wait_until="domcontentloaded")
        box = page.get_by_placeholder("Describe your symptoms")
        box.wait_for(timeout=60_000)
        assert "not medical advice" in page.locator("#disclaimer").inner_text()
        assert "In an emergency" in page.locator("#disclaimer").inner_text()
        assert "chat-doctor-adapter v1 (@champion)" in page.locator("#model-label").inner_text()
        card = page.locator("#model-card").inner_text()
        assert "Evaluation: eval_split" in card and "Promoted to champion" in card
        box.fill(QUESTION)
        box.press("Enter")
        lengths, deadline, last_change = [], time.time() + 120, time.time()
        while time.time() < deadline and time.time() - last_change < 5:  # until 5 s without change
            bots = page.locator('[data-testid="bot"]')
            if bots.count():
                length = len(bots.last.inner_text())
                if not lengths or length != lengths[-1]:
                    last_change = time.time()
                lengths.append(length)
            time.sleep(0.05)
        browser.close()
    grown = sorted(set(n for n in lengths if n))
    assert len(grown) >= 3, f"the answer did not arrive in pieces: lengths seen {grown}"
    assert lengths[-1] == max(lengths)


def test_api_answer_ends_cleanly_and_long_input_is_refused(chat_url):
    from gradio_client import Client

    client = Client(chat_url, verbose=False)
    result = client.predict(QUESTION, api_name="/answer")
    assert result["finish"] in ("eos", "limit")
    assert result["tokens"] == 125 if result["finish"] == "limit" else 0 < result["tokens"] < 125
    assert result["answer"] and "</s>" not in result["answer"] and "### Patient query" not in result["answer"]
    with pytest.raises(Exception, match=r"Your message is 2500 characters long; the limit is 2000"):
        client.predict("x" * 2500, api_name="/answer")
    # The chat endpoint streams: several partial answers before the last one.
    job = client.submit(QUESTION, 125, 1.15, 0.0, 0.9, api_name="/chat")
    final = job.result()
    assert len(job.outputs()) > 3 and final == job.outputs()[-1]


def test_terminal_chat(champion_project):
    done = subprocess.run(
        [sys.executable, "-m", "app.chat", "--terminal", "--model", "v1"],
        cwd=champion_project,
        env=project_env(champion_project),
        input=f"{'y' * 2001}\n{QUESTION}\n/quit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "chat-doctor: chat-doctor-adapter v1" in out and "not medical advice" in out
    assert "Your message is 2001 characters long; the limit is 2000" in out
    assert "doctor> " in out and ("[stopped]" in out or "[reached max_new_tokens]" in out)


def test_binds_loopback_only_and_login_when_asked(champion_project):
    with served_chat(champion_project, CHAT_DOCTOR_UI_USER="ann", CHAT_DOCTOR_UI_PASSWORD="s3cret") as url:
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(url + "config", timeout=10)
        assert denied.value.code == 401
        port = int(url.rsplit(":", 1)[1].strip("/"))
        outside = [a for a in socket.gethostbyname_ex(socket.gethostname())[2] if not a.startswith("127.")]
        for address in outside:  # the machine's other addresses do not reach it
            with socket.socket() as s, pytest.raises(OSError):
                s.settimeout(3)
                s.connect((address, port))
        from gradio_client import Client

        answer = Client(url, auth=("ann", "s3cret"), verbose=False).predict(QUESTION, api_name="/answer")
        assert answer["finish"] in ("eos", "limit")


def test_a_missing_version_or_folder_is_a_clear_error(champion_project):
    for model, message in (
        ("v7", "chat-doctor-adapter: no version 7"),
        ("./nowhere", "chat.model: './nowhere': no such folder"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "app.chat", "--terminal", "--model", model],
            cwd=champion_project,
            env=project_env(champion_project),
            input="",
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode != 0 and message in done.stderr, done.stderr[-1000:]
