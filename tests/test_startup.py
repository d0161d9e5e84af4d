"""Start-up as an operator sees it, with a real mitmdump process (issue 12).

- every start-up failure is one clear line and exit status 1 (a supervisor must see it fail);
- in reverse mode the reverse target is the upstream, without `openhands_upstream`;
- numbers with a fraction can be set with `--set`;
- the upstream's prices load as soon as a usable key exists (not an hour later);
- every retry logs one line with its outcome.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests.fake_upstream import FakeUpstream
from tests.harness import ADDON, BIN, ProcessOutput, stop_process

pytestmark = pytest.mark.e2e
HOSTED = "https://llm-proxy.app.all-hands.dev"
CHAT = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and not k.startswith("OPENHANDS_") and k != "MONGODB_URI"}
    env.update(OPENHANDS_DATA_DIR=str(workdir / "data"), OPENHANDS_SPEND_CHECKER="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def mitmdump(workdir: Path, *args: str) -> list[str]:
    return [str(BIN / "mitmdump"), "-s", str(ADDON), "--listen-host", "127.0.0.1", "--listen-port", "0",
            "--set", f"confdir={workdir / 'conf'}", "--set", "connection_strategy=lazy", *args]


@pytest.mark.parametrize("case", ["database unreachable", "bad --set number", "bad --set text",
                                  "bad environment number", "embedded database cannot start",
                                  "upstream contradicts the mode", "mitmweb: bad --set number"])
def test_a_failed_start_is_one_line_and_exit_status_1(case, tmp_path, upstream):
    args: list[str] = []
    env = base_env(tmp_path)
    if case == "database unreachable":
        uri = f"mongodb://127.0.0.1:{dead_port()}/?directConnection=true&serverSelectionTimeoutMS=500"
        args, mentions = ["--set", f"openhands_mongodb_uri={uri}"], ["MongoDB", "unreachable"]
    elif case == "bad --set number":
        args, mentions = ["--set", "openhands_spend_threshold=11"], ["openhands_spend_threshold", "'11'"]
    elif case == "bad --set text":
        args, mentions = ["--set", "openhands_default_budget=lots"], ["openhands_default_budget", "'lots'"]
    elif case == "bad environment number":
        env["OPENHANDS_SPEND_CHECK_TICK_SECONDS"] = "fast"
        mentions = ["OPENHANDS_SPEND_CHECK_TICK_SECONDS", "fast"]
    elif case == "embedded database cannot start":
        (tmp_path / "not-a-dir").write_text("")
        env["OPENHANDS_DATA_DIR"] = str(tmp_path / "not-a-dir")
        mentions = ["start-up failed", "not-a-dir"]
    elif case == "upstream contradicts the mode":
        args = ["--mode", f"reverse:{upstream.url}", "--set", f"openhands_upstream={HOSTED}"]
        mentions = [HOSTED, upstream.url]
    else:  # mitmweb configures twice before it exits: still one line
        args = ["--set", "web_port=0", "--set", "web_open_browser=false", "--set", "openhands_spend_threshold=x"]
        mentions = ["openhands_spend_threshold", "'x'"]
    command = mitmdump(tmp_path, *args)
    if case.startswith("mitmweb"):
        command[0] = str(BIN / "mitmweb")
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    failures = [line for line in out.splitlines() if "❌ [OpenHands]" in line]
    assert len(failures) == 1, out[-3000:]
    for m in mentions:
        assert m in failures[0], failures[0]
    assert "Traceback" not in out and "ready" not in out


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def reverse_sidecar(tmp_path_factory, mongo, shared_upstream) -> Iterator[tuple[subprocess.Popen, ProcessOutput, str]]:
    """`--mode reverse:<fake>` and no openhands_upstream; a fractional threshold through `--set`. One process for
    the tests below, in this order: the price test needs the pool still empty."""
    tmp_path, upstream = tmp_path_factory.mktemp("reverse"), shared_upstream
    args = mitmdump(tmp_path, "--mode", f"reverse:{upstream.url}", "--set", "openhands_spend_threshold=9.8")
    env = base_env(tmp_path, MONGODB_URI=mongo.uri, OPENHANDS_MONGODB_DB="oh_startup_" + uuid.uuid4().hex[:8])
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    out = ProcessOutput(proc.stdout, tmp_path / "mitmdump.log")
    port = out.wait_for(r"listening at [^\s]*:(\d+)", timeout=60).group(1)
    out.wait_for(r"key-pool sidecar ready", timeout=60)
    yield proc, out, f"http://127.0.0.1:{port}"
    assert stop_process(proc, signal.SIGINT) == 0


def test_prices_load_as_soon_as_a_usable_key_exists(reverse_sidecar, shared_upstream):
    proc, out, url = reverse_sidecar
    upstream = shared_upstream
    info = [q for q in upstream.requests if q.path == "/v1/model/info"]
    assert info == []  # an empty pool has nothing to ask with
    upstream.add_key("sk-start-price-000000000000001")
    r = requests.post(url + "/admin/openhands/keys", json={"id": "p1", "apiKey": "sk-start-price-000000000000001"},
                      timeout=30)
    assert r.status_code == 201
    out.wait_for(r"💲 \[OpenHands/Metering\] prices loaded from the upstream's /v1/model/info", timeout=60)
    info = [q for q in upstream.requests if q.path == "/v1/model/info"]
    assert len(info) == 1 and info[0].credential == "sk-start-price-000000000000001"


def test_reverse_mode_pools_its_target_and_a_fractional_set_works(reverse_sidecar, shared_upstream):
    proc, out, url = reverse_sidecar
    upstream = shared_upstream
    banner = out.wait_for(r"ready: upstream (\S+) .* threshold \$([\d.]+)")
    assert banner.groups() == (upstream.url, "9.80")
    upstream.add_key("sk-start-k1-0000000000000001")
    before = len(upstream.requests)
    r = requests.post(url + "/admin/openhands/keys", json={"id": "k1", "apiKey": "sk-start-k1-0000000000000001"},
                      timeout=30)
    assert r.status_code == 201, r.text  # answered by the addon ...
    assert not any(q.path.startswith("/admin") for q in upstream.requests[before:])  # ... never forwarded
    r = requests.post(url + "/chat/completions", json=CHAT, headers={"authorization": "Bearer client-own"},
                      timeout=30)
    assert r.status_code == 200
    chat = [q for q in upstream.requests if q.path == "/chat/completions"][-1]
    assert chat.credential.startswith("sk-start-")  # a pool key: the client's own key never goes upstream


def test_every_retry_logs_one_line_with_its_outcome(reverse_sidecar, shared_upstream):
    proc, out, url = reverse_sidecar
    upstream = shared_upstream
    for key in requests.get(url + "/admin/openhands/keys", timeout=30).json()["keys"]:  # only the keys below
        assert requests.delete(url + f"/admin/openhands/keys/{key['id']}", timeout=30).status_code == 200
    upstream.add_key("sk-start-spent-0000000000000001", budget=10, spend=10.5)  # really exhausted upstream
    upstream.add_key("sk-start-fresh-0000000000000002", budget=10)
    r = requests.post(url + "/admin/openhands/keys", json={"id": "r1", "apiKey": "sk-start-spent-0000000000000001"},
                      timeout=30)
    assert r.status_code == 201, r.text
    r = requests.post(url + "/admin/openhands/backup-keys",  # the one key r1's budget error can rotate to
                      json={"id": "r2", "apiKey": "sk-start-fresh-0000000000000002"}, timeout=30)
    assert r.status_code == 201, r.text
    r = requests.post(url + "/chat/completions", json=CHAT, headers={"x-litellm-session-id": "retry-log"},
                      timeout=60)
    assert r.status_code == 200, r.text
    line = out.wait_for(r"↩️ \[OpenHands/Retry\] (\S+) -> (\S+) after (.+): (\S+)", timeout=30)
    assert line.groups() == ("r1", "r2", "budget error", "200")
    assert out.count(r"\[OpenHands/Retry\]") == 1
