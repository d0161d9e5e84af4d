"""The `embedded` database: a SecantusDB child process, so a fresh machine needs no MongoDB.

Started on a free loopback port with its data under the user's data directory, stopped in `done`.
A second sidecar on the same data directory reuses the running server (recorded in `server.json`)
instead of fighting over the storage lock.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")


class EmbeddedDBError(RuntimeError):
    pass


def server_command() -> list[str]:
    beside = Path(sys.executable).with_name("secantusd-py")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("secantusd-py")
    if found:
        return [found]
    return [sys.executable, "-m", "secantus"]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class EmbeddedDB:
    def __init__(self, data_dir: Path, *, start_timeout: float = 30.0) -> None:
        self.data_dir = data_dir
        self.storage = data_dir / "db"
        self.state_file = data_dir / "server.json"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        shared = self._running_peer()
        if shared is not None:
            self.port = shared
            log.info("🗄️ [OpenHands/DB] reusing the embedded database already running on 127.0.0.1:%d", shared)
            return self.uri
        cmd = server_command() + ["--host", "127.0.0.1", "--port", "0", "--storage-path", str(self.storage),
                                  "--log-level", "INFO"]
        log_path = self.data_dir / "secantusd.log"
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                         start_new_session=True)
        except OSError as e:
            raise EmbeddedDBError(f"cannot start the embedded database ({' '.join(cmd)}): {e}") from None
        port = self._await_port(log_path)
        self.port = port
        self.state_file.write_text(json.dumps({"pid": self.proc.pid, "port": port}))
        return self.uri

    def _await_port(self, log_path: Path) -> int:
        assert self.proc is not None and self.proc.stderr is not None
        found: list[int] = []
        ready = threading.Event()
        stderr = self.proc.stderr

        def pump() -> None:
            # Keep draining stderr for the server's lifetime so it never blocks on a full pipe.
            with open(log_path, "a", encoding="utf-8") as sink:
                for line in stderr:
                    if not found:
                        m = LISTENING.search(line)
                        if m:
                            found.append(int(m.group(2)))
                            ready.set()
                    sink.write(line)
                    sink.flush()
            ready.set()

        threading.Thread(target=pump, name="openhands-embedded-db-log", daemon=True).start()
        ready.wait(self.start_timeout)
        if not found:
            self.stop()
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-400:] if log_path.exists() else ""
            raise EmbeddedDBError(f"the embedded database did not start within {self.start_timeout:.0f}s "
                                  f"(log {log_path}): {tail.strip()[-200:]}")
        return found[0]

    def _running_peer(self) -> int | None:
        try:
            state = json.loads(self.state_file.read_text())
            pid, port = int(state["pid"]), int(state["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return port if _pid_alive(pid) and _port_open(port) else None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        try:
            state = json.loads(self.state_file.read_text())
            if state.get("pid") == proc.pid:
                self.state_file.unlink()
        except (OSError, ValueError):
            pass
