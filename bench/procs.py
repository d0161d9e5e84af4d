"""Processes every benchmark needs: fake upstream, bare mitmdump, mitmdump with the addon, RSS probes.

Everything binds 127.0.0.1 on free ports and is stopped by pid by the code that started it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness import ADDON, BIN, ROOT, MongoServer, ProcessOutput, Sidecar, stop_process

__all__ = ["Fake", "BareMitm", "AddonMitm", "MongoServer", "rss", "workdir", "QUIET"]

QUIET = ["--set", "flow_detail=0"]  # same for bare and addon: no per-flow console output


def workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))


def _post(url: str, body: dict, timeout: float = 10.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


def _get(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Fake:
    """`python -m tests.fake_upstream` in its own process (its CPU is not the proxy's)."""

    def __init__(self, wd: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", "--port", "0", *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.out = ProcessOutput(self.proc.stdout, wd / "fake-upstream.log")
        m = self.out.wait_for(r"listening on ([\d.]+):(\d+)", timeout=20)
        self.port = int(m.group(2))
        self.url = f"http://127.0.0.1:{self.port}"

    def add_key(self, api_key: str, budget: float, spend: float = 0.0) -> None:
        _post(self.url + "/_fake/keys", {"api_key": api_key, "budget": budget, "spend": spend})

    def config(self, **knobs: Any) -> None:
        _post(self.url + "/_fake/config", knobs)

    def state(self) -> dict:
        return _get(self.url + "/_fake/state")

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, timeout=10)


STREAM_SSE_ADDON = """def responseheaders(flow):
    if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
        flow.response.stream = True
"""  # the least any streaming-aware addon does: the SSE baseline


class BareMitm:
    """Plain `mitmdump --mode reverse:<upstream>`: the baseline. With `stream_sse`, plus the three-line
    addon above, so event streams are streamed (a default mitmdump buffers them whole)."""

    def __init__(self, wd: Path, upstream: str, extra: list[str] | None = None, name: str = "bare",
                 stream_sse: bool = False) -> None:
        wd.mkdir(parents=True, exist_ok=True)
        script: list[str] = []
        if stream_sse:
            (wd / "stream_sse.py").write_text(STREAM_SSE_ADDON)
            script = ["-s", str(wd / "stream_sse.py")]
        cmd = [str(BIN / "mitmdump"), "--mode", f"reverse:{upstream}", "--listen-host", "127.0.0.1",
               "--listen-port", "0", "--set", f"confdir={wd / 'mitmproxy-conf'}",
               "--set", "connection_strategy=lazy", *QUIET, *script, *(extra or [])]
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(cmd, cwd=wd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace")
        self.out = ProcessOutput(self.proc.stdout, wd / f"{name}.log")
        self.port = int(self.out.wait_for(r"listening at [^\s]*:(\d+)", timeout=30).group(1))
        self.pid = self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)


class AddonMitm(Sidecar):
    """`mitmdump -s addon/openhands.py` (tests.harness.Sidecar) with flow output off, like the baseline."""

    def __init__(self, wd: Path, upstream: str, mongo_uri: str = "embedded", db: str = "bench", *,
                 threshold: float | None = None, spend_checker: bool = False, env: dict[str, str] | None = None,
                 extra: list[str] | None = None, name: str = "addon") -> None:
        e = {"OPENHANDS_SPEND_CHECKER": "true" if spend_checker else "false"}
        if threshold is not None:
            e["OPENHANDS_SPEND_THRESHOLD"] = f"{threshold}"
        e.update(env or {})
        super().__init__(wd, upstream, mongo_uri, db, env=e, args=[*QUIET, *(extra or [])], name=name)

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index(str(ADDON))] = str(addon_snapshot() / "addon" / "openhands.py")
        return cmd

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def bound_port(self) -> int:
        """The port it listens on (`port` is None until it started)."""
        assert self.port is not None, f"{self.name} not started"
        return self.port


_SNAPSHOT: Path | None = None


def addon_snapshot() -> Path:
    """A copy of addon/ and pricing/ taken once per benchmark run.

    Others edit the addon while benchmarks run; mitmdump reloads a script whose file changes, so every
    sidecar of one run loads this frozen copy instead (the code measured is the tree at the run's start).
    """
    global _SNAPSHOT
    if _SNAPSHOT is None:
        snap = Path(tempfile.mkdtemp(prefix="bench-addon-"))
        for d in ("addon", "pricing"):
            shutil.copytree(ROOT / d, snap / d, ignore=shutil.ignore_patterns("__pycache__"))
        _SNAPSHOT = snap
    return _SNAPSHOT


def code_version() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "addon", "pricing"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head, "addon_tree_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {}


def rss(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            m = re.match(r"(VmRSS|VmHWM):\s+(\d+) kB", line)
            if m:
                out[m.group(1)] = int(m.group(2)) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (the addon's embedded database is its child)."""
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def settle(pids: list[int], timeout: float = 60.0, window: float = 0.5, idle_share: float = 0.10) -> float:
    """Wait until the processes together use < `idle_share` of one core over `window`; return the wait.

    After a load run the addon's write-behind queue keeps the sidecar and the database busy; measuring
    the next target before that drains would charge one target's work to another.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            before = sum(cpu_seconds(p) for p in pids)
            time.sleep(window)
            used = sum(cpu_seconds(p) for p in pids) - before
        except (OSError, IndexError, ValueError):
            return round(time.monotonic() - t0, 2)
        if used < idle_share * window:
            return round(time.monotonic() - t0 - window, 2)
    return round(time.monotonic() - t0, 2)


def pool_keys(n: int, prefix: str = "bench") -> list[tuple[str, str]]:
    return [(f"{prefix}{i:02d}", f"sk-{prefix}-pool-{i:02d}-{'x' * 24}") for i in range(1, n + 1)]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        import mitmproxy.version
        info["mitmproxy"] = mitmproxy.version.VERSION
    except Exception:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info
