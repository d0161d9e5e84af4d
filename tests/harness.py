"""Real processes for end-to-end tests: a MongoDB-protocol server and mitmdump with the addon.

Everything binds 127.0.0.1 on free ports and is stopped, by pid, by whoever started it.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import requests

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addon" / "openhands.py"
BIN = Path(sys.executable).parent


T = TypeVar("T")

# Generous: the suite must pass on a loaded 2-core machine (several suites, sidecars and databases at once).
EVENTUALLY_TIMEOUT_S = 30.0


def eventually(predicate: Callable[[], T], timeout: float = EVENTUALLY_TIMEOUT_S, interval: float = 0.05) -> T:
    """Poll `predicate` until it returns a truthy value and return that value.

    Instead of fixed sleeps and fixed-time asserts: waits as long as a slow machine needs and no longer.
    An exception from the predicate counts as "not yet" (e.g. a server still starting). On timeout an
    AssertionError shows the last value (or exception), so a failure says what was seen.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # any failure (an assert too) is "not yet"; shown if it persists
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout:g}s; last value: {last!r}")
        time.sleep(interval)


class ProcessOutput:
    """Collects a child's output lines on a thread so tests can wait for a line."""

    def __init__(self, stream, sink: Path) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.sink = sink
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        with open(self.sink, "a", encoding="utf-8") as out:
            for line in stream:
                out.write(line)
                out.flush()
                with self.cond:
                    self.lines.append(line.rstrip("\n"))
                    self.cond.notify_all()
        with self.cond:
            self.lines.append("<EOF>")
            self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    if m:
                        return m
                    if self.lines[i] == "<EOF>":
                        raise AssertionError(f"process exited before {pattern!r}:\n" + self.text()[-3000:])
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {pattern!r}:\n" + self.text()[-3000:])
                self.cond.wait(left)

    def text(self) -> str:
        return "\n".join(self.lines)

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        with self.cond:
            return sum(1 for line in self.lines if rx.search(line))


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


class MongoServer:
    """`secantusd-py --port 0 --storage-path <dir>` as a child process."""

    def __init__(self, storage: Path, port: int = 0) -> None:
        self.storage = storage
        self.requested_port = port
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self) -> "MongoServer":
        self.storage.mkdir(parents=True, exist_ok=True)
        exe = BIN / "secantusd-py"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "secantus"]
        self.proc = subprocess.Popen(cmd + ["--host", "127.0.0.1", "--port", str(self.requested_port or self.port or 0),
                                            "--storage-path", str(self.storage), "--enable-test-commands"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.out = ProcessOutput(self.proc.stderr, self.storage.parent / f"{self.storage.name}.log")
        m = self.out.wait_for(r"listening on [\d.]+:(\d+)", timeout=30)
        self.port = int(m.group(1))
        return self

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM)
            self.proc = None

    def restart(self) -> None:
        """Same port and data, new process (outage tests)."""
        self.stop()
        self.requested_port = self.port or 0
        self.start()


class Sidecar:
    """A real `mitmdump -s addon/openhands.py` process."""

    def __init__(self, workdir: Path, upstream: str, mongo_uri: str, db: str, *, mode: str = "reverse",
                 env: dict[str, str] | None = None, args: list[str] | None = None, name: str = "sidecar") -> None:
        self.workdir = workdir
        self.upstream = upstream
        self.mongo_uri = mongo_uri
        self.db = db
        self.mode = mode
        self.extra_env = env or {}
        self.extra_args = args or []
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.confdir = workdir / "mitmproxy-conf"

    def command(self) -> list[str]:
        mode = ["--mode", f"reverse:{self.upstream}"] if self.mode == "reverse" else (
            ["--mode", self.mode] if self.mode != "regular" else [])
        return [str(BIN / "mitmdump"), "-s", str(ADDON), *mode, "--listen-host", "127.0.0.1", "--listen-port", "0",
                "--set", f"confdir={self.confdir}", "--set", "connection_strategy=lazy",
                "--set", f"openhands_upstream={self.upstream}", *self.extra_args]

    def start(self, wait_ready: bool = True) -> "Sidecar":
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update({"MONGODB_URI": self.mongo_uri, "OPENHANDS_MONGODB_DB": self.db,
                    "OPENHANDS_DATA_DIR": str(self.workdir / "data"), "OPENHANDS_SPEND_CHECKER": "false",
                    "PYTHONUNBUFFERED": "1"})
        env.update(self.extra_env)
        self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace")
        self.out = ProcessOutput(self.proc.stdout, self.workdir / f"{self.name}.log")
        m = self.out.wait_for(r"listening at [^\s]*:(\d+)", timeout=30)
        self.port = int(m.group(1))
        if wait_ready:
            self.out.wait_for(r"key-pool sidecar ready", timeout=60)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def proxies(self) -> dict[str, str]:
        return {"http": self.url, "https": self.url}

    def admin(self, method: str, path: str, json: Any = None, token: str | None = None, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        if token:
            headers["authorization"] = f"Bearer {token}"
        return requests.request(method, self.url + path, json=json, headers=headers, timeout=15, **kw)

    def add_key(self, key_id: str, api_key: str, budget: float | None = None) -> None:
        body: dict[str, Any] = {"id": key_id, "apiKey": api_key}
        if budget is not None:
            body["budgetLimit"] = budget
        r = self.admin("POST", "/admin/openhands/keys", body, token=self.extra_env.get("OPENHANDS_ADMIN_TOKEN"))
        assert r.status_code == 201, r.text

    def add_backup(self, key_id: str, api_key: str) -> None:
        r = self.admin("POST", "/admin/openhands/backup-keys", {"id": key_id, "apiKey": api_key},
                       token=self.extra_env.get("OPENHANDS_ADMIN_TOKEN"))
        assert r.status_code == 201, r.text

    def keys(self) -> dict[str, dict]:
        r = self.admin("GET", "/admin/openhands/keys", token=self.extra_env.get("OPENHANDS_ADMIN_TOKEN"))
        assert r.status_code == 200, r.text
        return {k["id"]: k for k in r.json()["keys"]}

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        rc = stop_process(self.proc)
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGKILL)
            self.proc = None
