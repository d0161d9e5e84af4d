"""Every command README.md shows, run as a new user would: in a fresh `git clone`, against a fake upstream.

The commands are read from the README itself (its `sh` code blocks, and inline `./dev …`, `mitmdump …`,
`mitmweb …` and `curl …` examples), so the README cannot drift from the product: a command this test has
no runner for fails the test. What is replaced, and only this:
- the upstream: the hosted OpenHands proxy (and the README's `http://my-litellm:4000` example) become the fake
  upstream on loopback, by `OPENHANDS_UPSTREAM` (as the README documents) or in the command's own URL;
- ports: the README's 8080/4000 become free loopback ports (mitmproxy's `~/.mitmproxy/config.yaml` in a
  temporary HOME sets the listen address, the web port and no browser, so the command line stays as written);
- `./dev test` runs one small test file in the clone (the whole suite is what CI runs with `./dev test`), and
  `./dev bench` runs its `--tiny` size of one benchmark (the full run takes many minutes).

The clone is of the committed HEAD, with no `.venv`: the first command builds it (pip's cache is reused).
The clones live on a RAM disk (/dev/shm) when there is one with room: the commands are the same, only the
thousands of small files of two fresh venvs are not written to (and deleted from) a slow disk.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests

from tests.fake_upstream import FakeUpstream
from tests.harness import ProcessOutput, stop_process

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e

HOSTED = "https://llm-proxy.app.all-hands.dev"
EXAMPLE_UPSTREAMS = (HOSTED, "http://my-litellm:4000")
README_KEY = "sk-..."  # the README's example pool key; the fake upstream accepts it
BANNER = r"key-pool sidecar ready: upstream (\S+) .* threshold \$([\d.]+)"
SETUP_TIMEOUT_S = 900.0  # building .venv from scratch on a loaded 2-core machine
START_TIMEOUT_S = 120.0


# -- extraction (pure) ----------------------------------------------------------------------------------
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(\./dev \w+(?: [^`]*)?|(?:mitmdump|mitmweb|curl) [^`]+)`")


def readme_commands(text: str) -> list[str]:
    """Each `sh` block is one script; each inline command is one; in README order, each once."""
    found: list[tuple[int, str]] = []
    for m in FENCE.finditer(text):
        if m.group(1) == "sh":
            found.append((m.start(), m.group(2).strip()))
    prose = FENCE.sub(lambda m: " " * len(m.group(0)), text)  # inline commands outside code blocks only
    for m in INLINE.finditer(prose):
        found.append((m.start(), m.group(1).replace("…", "").strip()))
    seen: set[str] = set()
    out = []
    for _, cmd in sorted(found):
        if cmd not in seen:
            seen.add(cmd)
            out.append(cmd)
    return out


def test_extraction_finds_the_commands_a_new_user_types():
    cmds = readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    for must in ("./dev run", "./dev test", "./dev web", "./dev bench"):
        assert must in cmds
    assert any(c.startswith("curl ") or "\ncurl " in c for c in cmds)
    assert any(c.startswith("mitmdump -s addon/openhands.py --mode reverse:") for c in cmds)
    assert all(runner_for(c) is not None for c in cmds), [c for c in cmds if runner_for(c) is None]


@pytest.mark.parametrize("text,expected", [
    ("Run:\n\n```sh\n./dev run\n```\n", ["./dev run"]),
    ("e.g. `./dev run --listen-port 4000`, or `mitmweb -s addon/openhands.py …`.", [
        "./dev run --listen-port 4000", "mitmweb -s addon/openhands.py"]),
    ("```\nmitmdump output, not a command\n```\n`./dev test` and `./dev test`", ["./dev test"]),
    ("```sh\ncurl -s a \\\n  -d b\n```\n", ["curl -s a \\\n  -d b"]),
    ("the option `openhands_upstream` and `mitmdump`", []),
])
def test_extraction(text, expected):
    assert readme_commands(text) == expected


# -- running them ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Started:
    proc: subprocess.Popen
    out: ProcessOutput
    err: ProcessOutput
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> int:
        rc = stop_process(self.proc, signal.SIGINT, timeout=60)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything of ours left in its session (none expected)
        except (ProcessLookupError, PermissionError):
            pass
        self.out.thread.join(10)
        self.err.thread.join(10)
        return rc


@dataclass
class Clone:
    """A fresh clone, a temporary HOME, the fake upstream; runs README commands there."""

    path: Path
    home: Path
    logs: Path
    upstream: FakeUpstream
    started: list[Started] = field(default_factory=list)
    test_clone: "DevTestInSecondClone | None" = None

    def env(self, **extra: str) -> dict[str, str]:
        real_home = Path.home()
        env = {k: v for k, v in os.environ.items()
               if not k.lower().endswith("_proxy") and not k.startswith(("OPENHANDS_", "PYTEST", "VIRTUAL_ENV"))
               and k not in ("MONGODB_URI", "PYTHONPATH")}
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                      if not p.startswith(str(ROOT)))  # not this checkout's .venv
        env.update(HOME=str(self.home), PYTHONUNBUFFERED="1",
                   # what a user keeps in their real home: pip's settings and cache, pyenv's Pythons
                   XDG_CONFIG_HOME=os.environ.get("XDG_CONFIG_HOME", str(real_home / ".config")),
                   XDG_CACHE_HOME=os.environ.get("XDG_CACHE_HOME", str(real_home / ".cache")))
        if (real_home / ".pyenv").is_dir():
            env.setdefault("PYENV_ROOT", str(real_home / ".pyenv"))
        env.update(extra)
        return env

    def mitmproxy_config(self) -> tuple[int, int]:
        """Free ports for the next process, in mitmproxy's own config file (the command line stays as written)."""
        port, web_port = free_port(), free_port()
        conf = self.home / ".mitmproxy"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "config.yaml").write_text(f"listen_host: 127.0.0.1\nlisten_port: {port}\nweb_host: 127.0.0.1\n"
                                          f"web_port: {web_port}\nweb_open_browser: false\n")
        return port, web_port

    def start(self, command: str, *, env: dict[str, str], port: int, name: str) -> Started:
        proc = subprocess.Popen(["bash", "-c", command], cwd=self.path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        n = len(self.started)
        s = Started(proc, ProcessOutput(proc.stdout, self.logs / f"{n}-{name}.out"),
                    ProcessOutput(proc.stderr, self.logs / f"{n}-{name}.err"), port)
        self.started.append(s)
        return s

    def run(self, command: str, *, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=self.path, env=env, capture_output=True, text=True,
                              errors="replace", timeout=timeout)

    @property
    def venv_ready(self) -> bool:
        return any((self.path / ".venv").glob(".installed-*"))


@dataclass
class DevTestInSecondClone:
    """`./dev test` as the first command of a second fresh clone, started with the first clone's `./dev run`:
    the two venv builds overlap (the suite stays lean), and both orders are covered — the first clone goes
    `./dev run` first, this one `./dev test` first and `./dev run` after it."""

    path: Path
    proc: subprocess.Popen
    out: Path
    err: Path

    def result(self, timeout: float) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout=timeout)
        return rc, self.out.read_text(errors="replace"), self.err.read_text(errors="replace")


DEV_TEST_ARGS = " -q -p no:cacheprovider tests/test_refresh.py"  # one small file: the suite is what CI runs
# pip's own setting (as a user may have it) for the `./dev test` clone: no byte-compiling of the ~10,000 files
# of the test extras, most of which that clone never imports (saves ~20 s of CPU; the install is the same).
NO_PYC = {"PIP_COMPILE": "false"}


def no_error_output(err: ProcessOutput | str, allow: tuple[str, ...] = ()) -> None:
    text = err if isinstance(err, str) else err.text()
    lines = [ln for ln in text.splitlines() if ln.strip() and ln != "<EOF>" and not ln.startswith(allow)]
    assert not lines, "error output:\n" + "\n".join(lines[-40:])


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.start()
    fake.add_key(README_KEY, budget=1000.0)
    yield fake
    fake.stop()


RAM_DISK = Path("/dev/shm")
RAM_DISK_MIN_FREE = 4 << 30  # two fresh venvs (one with the test extras) take well under 1 GB


def clone_base(tmp_path_factory) -> tuple[Path, bool]:
    """Where the fresh clones go: a RAM disk when there is one with room (a venv is ~10,000 small files; on a
    disk mounted with `discard` writing and deleting them costs more than pip's own work), else pytest's tmp.
    Returns (directory, whether the caller must delete it)."""
    try:
        st = os.statvfs(RAM_DISK)
        if st.f_bavail * st.f_frsize >= RAM_DISK_MIN_FREE and os.access(RAM_DISK, os.W_OK | os.X_OK):
            return Path(tempfile.mkdtemp(prefix="readme-clones-", dir=RAM_DISK)), True
    except OSError:
        pass
    return tmp_path_factory.mktemp("readme"), False


@pytest.fixture(scope="module")
def clone(tmp_path_factory, upstream) -> Iterator[Clone]:
    base, own_dir = clone_base(tmp_path_factory)
    path = base / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(path)], check=True, timeout=120)
    assert not (path / ".venv").exists()
    home = base / "home"
    home.mkdir()
    logs = tmp_path_factory.mktemp("readme-logs")  # on disk: kept after the run for a look
    c = Clone(path, home, logs, upstream)
    second = base / "clone-test-first"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(second)], check=True, timeout=120)
    out, err = logs / "dev-test.out", logs / "dev-test.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(["bash", "-c", "./dev test" + DEV_TEST_ARGS], cwd=second, env=c.env(**NO_PYC),
                                stdout=o, stderr=e, text=True, start_new_session=True)
    c.test_clone = DevTestInSecondClone(second, proc, out, err)
    yield c
    for s in c.started:
        s.stop()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    if own_dir:
        shutil.rmtree(base, ignore_errors=True)
    else:
        for p in (path, second):
            shutil.rmtree(p / ".venv", ignore_errors=True)


def check_pools_for_the_upstream(sc: Started, upstream: FakeUpstream, *, proxy: bool = False) -> None:
    """What the README promises of every run mode: the admin API answers locally, and a client's request
    reaches the upstream with a pool key instead of the client's own credential."""
    api_key = f"sk-readme-{uuid.uuid4().hex}"
    upstream.add_key(api_key, budget=1000.0)
    base = upstream.url if proxy else sc.url  # regular mode: address the upstream, through the proxy
    http = requests.Session()
    http.trust_env = False  # only the proxy named here
    if proxy:
        http.proxies = {"http": sc.url}
    before = len(upstream.requests)
    r = http.post(base + "/admin/openhands/keys", json={"id": f"readme-{uuid.uuid4().hex[:8]}",
                                                          "apiKey": api_key}, timeout=30)
    assert r.status_code == 201, r.text
    assert not any(q.path.startswith("/admin") for q in upstream.requests[before:])  # never forwarded
    r = http.post(base + "/chat/completions", headers={"authorization": "Bearer client-own-key"},
                  json={"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"], r.text
    chats = [q for q in upstream.requests[before:] if q.path.endswith("/chat/completions")]
    assert chats and chats[-1].credential != "client-own-key" and chats[-1].credential.startswith("sk-")


def upstream_replaced(command: str, fake: FakeUpstream) -> str:
    for url in EXAMPLE_UPSTREAMS:
        command = command.replace(url, fake.url)
    return command


def ports_replaced(command: str, port: int) -> str:
    command = re.sub(r"--listen-port \d+", f"--listen-port {port}", command)
    return command.replace("localhost:8080", f"127.0.0.1:{port}")


def wait_banner(sc: Started, timeout: float) -> re.Match:
    try:
        return sc.out.wait_for(BANNER, timeout=timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}\nstderr:\n{sc.err.text()[-3000:]}") from None


def run_dev_server(clone: Clone, command: str) -> None:
    """`./dev run …` / `./dev web …`: reverse mode in front of the (replaced) upstream, embedded database."""
    port, _ = clone.mitmproxy_config()
    if "--listen-port" in command:
        port = free_port()
    fresh = not clone.venv_ready
    sc = clone.start(ports_replaced(command, port), env=clone.env(OPENHANDS_UPSTREAM=clone.upstream.url),
                     port=port, name=command.split()[1])
    m = wait_banner(sc, SETUP_TIMEOUT_S if fresh else START_TIMEOUT_S)
    assert m.group(1) == clone.upstream.url
    want = re.search(r"openhands_spend_threshold=([\d.]+)", command)
    assert float(m.group(2)) == (float(want.group(1)) if want else 9.95)
    assert sc.out.count(r"database embedded SecantusDB") == 1
    assert sc.out.count(r"dev: installing") == (1 if fresh else 0)  # set up once, then reused
    check_pools_for_the_upstream(sc, clone.upstream)
    assert sc.stop() == 0
    no_error_output(sc.err)


def run_dev_test(clone: Clone, command: str) -> None:
    """`./dev test` on a fresh clone (the second one, started at set-up): test extras, browser step, pytest."""
    assert clone.test_clone is not None
    if command == "./dev test":
        rc, out, err = clone.test_clone.result(timeout=SETUP_TIMEOUT_S)
    else:
        proc = clone.run(command + DEV_TEST_ARGS, env=clone.env(), timeout=SETUP_TIMEOUT_S)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    assert rc == 0, out[-3000:] + err[-3000:]
    assert re.search(r"\d+ passed", out), out[-2000:]
    no_error_output(err, allow=("install-browser:",))  # a non-root run cannot install chromium
    # the other order: after `./dev test`, `./dev run` starts without installing anything
    after = subprocess.run(["bash", "-c", "./dev run --version"], cwd=clone.test_clone.path, env=clone.env(),
                           capture_output=True, text=True, timeout=START_TIMEOUT_S)
    assert after.returncode == 0 and "Mitmproxy:" in after.stdout, after.stdout + after.stderr
    assert "dev: installing" not in after.stdout
    no_error_output(after.stderr)


def run_dev_bench(clone: Clone, command: str) -> None:
    out = clone.path.parent / "bench.json"
    proc = clone.run(f"{command} --tiny --only streaming --out {out}", env=clone.env(), timeout=SETUP_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(out.read_text())["errors"] == {}
    no_error_output(proc.stderr, allow=("[bench] ",))  # its progress lines


def run_mitmproxy(clone: Clone, command: str) -> None:
    """`mitmdump -s addon/openhands.py …` / `mitmweb …` from the clone, `.venv/bin` on PATH as the README says."""
    if not clone.venv_ready:
        proc = clone.run("./dev run --version", env=clone.env(), timeout=SETUP_TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr[-3000:]
    port, _ = clone.mitmproxy_config()
    reverse = "--mode reverse:" in command
    env = clone.env()
    env["PATH"] = f"{clone.path / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    if not reverse:  # regular mode pools openhands_upstream: the hosted proxy, here replaced by the fake
        env["OPENHANDS_UPSTREAM"] = clone.upstream.url
    sc = clone.start(upstream_replaced(command, clone.upstream), env=env, port=port, name=command.split()[0])
    m = wait_banner(sc, START_TIMEOUT_S)
    assert m.group(1) == clone.upstream.url  # the upstream follows the mode (reverse) or the option (regular)
    check_pools_for_the_upstream(sc, clone.upstream, proxy=not reverse)
    assert sc.stop() == 0
    no_error_output(sc.err)


@pytest.fixture(scope="module")
def client_sidecar(clone) -> Iterator[Started]:
    """The sidecar the README's client examples talk to: `./dev run`, as the README starts it."""
    port, _ = clone.mitmproxy_config()
    fresh = not clone.venv_ready
    sc = clone.start("./dev run", env=clone.env(OPENHANDS_UPSTREAM=clone.upstream.url), port=port,
                     name="run-for-clients")
    wait_banner(sc, SETUP_TIMEOUT_S if fresh else START_TIMEOUT_S)
    yield sc
    sc.stop()


def run_client_script(clone: Clone, command: str, sidecar: Started) -> None:
    """A block of `curl` examples, run by bash as written, against the running sidecar."""
    proc = clone.run("set -e\n" + ports_replaced(command, sidecar.port), env=clone.env(), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    no_error_output(proc.stderr)
    assert proc.stdout.strip(), "no answer"
    for line in proc.stdout.splitlines():
        assert '"error"' not in line, proc.stdout
    if "/chat/completions" in command:
        assert '"choices"' in proc.stdout, proc.stdout
    if "/admin/openhands/keys | python3 -m json.tool" in command:
        assert '"id": "key-1"' in proc.stdout, proc.stdout


Runner = Callable[..., None]
RUNNERS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^\./dev (run|web)\b"), "dev_server"),
    (re.compile(r"^\./dev test\b"), "dev_test"),
    (re.compile(r"^\./dev bench\b"), "dev_bench"),
    (re.compile(r"^(mitmdump|mitmweb) -s addon/openhands\.py\b"), "mitmproxy"),
    (re.compile(r"(^|\n)\s*curl .*localhost:8080", re.S), "client"),
]


def runner_for(command: str) -> str | None:
    return next((name for rx, name in RUNNERS if rx.search(command)), None)


def committed_readme() -> str:
    """The README of HEAD: the clone is of HEAD, so its commands are the ones to run."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:README.md"], capture_output=True, text=True,
                              check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return (ROOT / "README.md").read_text(encoding="utf-8")


# `./dev test` last: its venv build (the slowest, in the second clone) overlaps every other command.
COMMANDS = sorted(readme_commands(committed_readme()), key=lambda c: runner_for(c) == "dev_test")


@pytest.mark.parametrize("command", COMMANDS, ids=[c.splitlines()[0][:60] for c in COMMANDS])
def test_readme_command_works_on_a_fresh_clone(command, clone, request):
    kind = runner_for(command)
    assert kind is not None, f"the README shows a command this test cannot run: {command!r}"
    if kind == "dev_server":
        run_dev_server(clone, command)
    elif kind == "dev_test":
        run_dev_test(clone, command)
    elif kind == "dev_bench":
        run_dev_bench(clone, command)
    elif kind == "mitmproxy":
        run_mitmproxy(clone, command)
    else:
        run_client_script(clone, command, request.getfixturevalue("client_sidecar"))
