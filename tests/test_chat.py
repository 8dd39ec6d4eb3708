"""The chat on a registered champion (the shared run's v1, tests/conftest.py), as a user meets it:
one chat server with a login, as `make chat` starts it with CHAT_DOCTOR_UI_USER/PASSWORD set; the
Gradio page in headless Chromium (Playwright), its API through gradio_client, the terminal chat,
and the safe defaults (loopback only, login enforced, input bounded)."""

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.processes import free_port

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
# Headless, and no calls home: this machine's network is closed and Chromium would retry them.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
QUESTION = "I have had a headache and a fever for two days. What should I do?"
LOGIN = ("ann", "s3cret")


def project_env(root: Path) -> dict[str, str]:
    """The environment for a process in `root`: its own code and its own MLflow store (an earlier
    test's tracking URI, exported by mlflow.set_tracking_uri, must not leak in)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": str(root)}


@contextmanager
def served_chat(root: Path, log_dir: Path, *args: str, **env: str):
    """`python -m app.chat` in the project; yields (its URL, its process) once it answers."""
    port = free_port()
    log_path = log_dir / f"chat-{port}.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed below)
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
            assert server.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "the chat never answered"
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (a login page answers 401 to some paths)
            except OSError:
                time.sleep(1)
        yield url, server
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def watch_answer(page, timeout: float = 120) -> tuple[list[int], str]:
    """The lengths of the bot's last message as it streams in, and its final text (5 s unchanged)."""
    lengths, text, deadline, last_change = [], "", time.time() + timeout, time.time()
    while time.time() < deadline and time.time() - last_change < 5:
        bots = page.locator('[data-testid="bot"]')
        if bots.count():
            text = bots.last.inner_text()
            if not lengths or len(text) != lengths[-1]:
                last_change = time.time()
            lengths.append(len(text))
        time.sleep(0.05)
    return lengths, text


@pytest.fixture(scope="module")
def chat_server(shared_run, tmp_path_factory):
    user, password = LOGIN
    logs = tmp_path_factory.mktemp("chat-logs")
    with served_chat(shared_run.root, logs, CHAT_DOCTOR_UI_USER=user, CHAT_DOCTOR_UI_PASSWORD=password) as served:
        yield served


def test_browser_logs_in_and_sees_the_disclaimer_the_card_and_a_streamed_answer(chat_server):
    from playwright.sync_api import sync_playwright

    url, _ = chat_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_label("username").fill(LOGIN[0])
        page.get_by_label("password").fill(LOGIN[1])
        page.get_by_role("button", name="Login").click()
        box = page.get_by_placeholder("Describe your symptoms")
        box.wait_for(timeout=60_000)
        assert "not medical advice" in page.locator("#disclaimer").inner_text()
        assert "In an emergency" in page.locator("#disclaimer").inner_text()
        assert "chat-doctor-adapter v1 (@champion)" in page.locator("#model-label").inner_text()
        card = page.locator("#model-card").inner_text()
        assert "Evaluation: eval_split" in card and "Promoted to champion" in card
        box.fill(QUESTION)
        box.press("Enter")
        lengths, _ = watch_answer(page)
        browser.close()
    grown = sorted(set(n for n in lengths if n))
    assert len(grown) >= 3, f"the answer did not arrive in pieces: lengths seen {grown}"
    assert lengths[-1] == max(lengths)


def test_api_answer_ends_cleanly_and_long_input_is_refused(chat_server):
    from gradio_client import Client

    url, _ = chat_server
    client = Client(url, auth=LOGIN, verbose=False)
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


def test_binds_loopback_only_and_refuses_without_the_login(chat_server):
    """The listening socket itself is on 127.0.0.1 (whatever other addresses the host has), and
    the page and its API answer 401 without the login."""
    import psutil

    url, server = chat_server
    port = int(url.rsplit(":", 1)[1].strip("/"))
    listening = [c for c in psutil.Process(server.pid).net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert [(c.laddr.ip, c.laddr.port) for c in listening if c.laddr.port == port] == [("127.0.0.1", port)]
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(url + "config", timeout=10)
    assert denied.value.code == 401


# Full tier: the browser test above loads a registered version and streams its answer through the UI.
@pytest.mark.full
def test_terminal_chat(shared):
    done = subprocess.run(
        [sys.executable, "-m", "app.chat", "--terminal", "--model", "v1"],
        cwd=shared.root,
        env=project_env(shared.root),
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


def test_a_missing_version_or_folder_is_a_clear_error(shared):
    from app.chat import main

    with pytest.raises(SystemExit, match="chat-doctor-adapter: no version 7"):
        main(["--terminal", "--model", "v7"])
    with pytest.raises(FileNotFoundError, match=r"chat.model: './nowhere': no such folder"):
        main(["--terminal", "--model", "./nowhere"])
