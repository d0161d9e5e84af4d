"""Instructions per request of a real mitmdump, bare vs addon, counted by callgrind (deterministic).

Wall-clock ratios on a shared 2-vCPU machine move ±20 % between runs of the same code; an instruction count
does not (±0.5 %), so this is the figure to compare commits by. Both mitmdumps run under
`valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes` (with `python -X perf`, so Python
functions have names) against the same fake upstream; counting is switched on for N requests only, after a
warm-up, and per-thread totals are divided by N. The event-loop thread is what the throughput depends on;
the other threads' work (write-behind, sync, reservation sharing) is periodic, so under valgrind — some 50×
slower than real time — it is spread over far fewer requests than in real use and is reported apart.
Instructions are not time: the addon's Python code runs at a lower rate per instruction than mitmproxy's own
hot loop (colder caches), so the wall ratio is lower than the instruction ratio.

Needs `valgrind` and `callgrind_control` on PATH; without them it reports why and measures nothing.
Not part of the default `python -m bench` run (about 10 minutes): `python -m bench --only instructions`.
"""
from __future__ import annotations

import bisect
import collections
import glob
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.overhead import CLIENT_KEY, JSON_BODY, setup_fake_and_keys
from bench.procs import BIN, MongoServer, addon_snapshot, workdir
from tests.harness import ProcessOutput

STARTUP_S = 6.0  # a sidecar assumes unseen peers for PEER_GRACE_S (5 s) after its first reservation
START_TIMEOUT_S = 900.0  # mitmdump under valgrind imports and starts some 50x slower


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    return _run(quick, tiny, cache=False)


def run_cache(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    """`run` with valgrind's cache and branch simulation: where the CPU ratio's excess over the instruction
    ratio comes from (see `cache_case`)."""
    return _run(quick, tiny, cache=True)


def _run(quick: bool, tiny: bool, cache: bool) -> dict[str, Any]:
    missing = [t for t in ("valgrind", "callgrind_control") if shutil.which(t) is None]
    if missing:
        return {"skipped": f"not installed: {', '.join(missing)}"}
    cases = [(1, 20)] if tiny else [(1, 100), (16, 160)] if quick else [(1, 200), (16, 320)]
    if cache and not tiny:  # (one client under valgrind: the background threads run between every two requests)
        cases = cases[1:]
    wd = workdir("cache" if cache else "instructions")
    fake, keys = setup_fake_and_keys(wd, 3 if tiny else 20)
    mongo = MongoServer(wd / "secantus").start()
    rows, top = [], []
    caches = l2_geometry() if cache else None
    cache_rows = []
    try:
        for conc, n in cases:
            bare = _measure(wd / f"bare-c{conc}", fake.url, None, keys, conc, n, caches)
            addon = _measure(wd / f"addon-c{conc}", fake.url, mongo.uri, keys, conc, n, caches)
            if caches is not None:
                floor = _measure(wd / f"floor-c{conc}", fake.url, None, keys, conc, n, caches, _floor_copy(wd))
                cache_rows.append({**cache_case(conc, n, bare["events"], addon["events"], addon["hooks_events"]),
                                   "floor": counts(floor["events"]), "top_addon_l2": addon["top_l2"]})
            rows.append({"concurrency": conc, "requests": n, "bare": bare["threads"], "addon": addon["threads"],
                         "bare_main": bare["main"], "addon_main": addon["main"],
                         "main_ratio": round(addon["main"] / bare["main"], 4) if bare["main"] else None,
                         "addon_main_added": addon["main"] - bare["main"],
                         "addon_other_threads": sum(v for k, v in addon["threads"].items() if k != "main")})
            top = addon["top_addon"]
    finally:
        mongo.stop()
        fake.stop()
    if caches is not None:
        return {"l2": caches, "cases": cache_rows, "workdir": str(wd)}
    return {"cases": rows, "top_addon_inclusive": top, "workdir": str(wd)}


EVENTS = ("Ir", "Dr", "Dw", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw", "Bc", "Bcm", "Bi", "Bim")
HOOKS = "guarded.<locals>.run"  # addon.hooks.guarded: every per-request hook of the sidecar runs under it, unnested


def _floor_copy(wd: Path) -> Path:
    """bench/minimal_addon.py copied into the run's directory (mitmdump reloads a script whose file changes)."""
    dst = wd / "floor.py"
    if not dst.exists():
        shutil.copyfile(Path(__file__).with_name("minimal_addon.py"), dst)
    return dst


def _l2(e: dict[str, int]) -> int:
    return e.get("ILmr", 0) + e.get("DLmr", 0) + e.get("DLmw", 0)


def _l1(e: dict[str, int]) -> int:
    return e.get("I1mr", 0) + e.get("D1mr", 0) + e.get("D1mw", 0)


def _branches(e: dict[str, int]) -> int:
    return e.get("Bcm", 0) + e.get("Bim", 0)


COUNTS = {"instructions": lambda e: e.get("Ir", 0), "l1_misses": _l1, "l2_misses": _l2, "branch_misses": _branches}


def counts(events: dict[str, int]) -> dict[str, int]:
    """The four figures the cache benchmark reports, from one thread's events."""
    return {label: count(events) for label, count in COUNTS.items()}


def _top_l2(inclusive: dict[str, list[int]], n: int, limit: int = 15) -> list[dict[str, Any]]:
    """The addon's functions by inclusive simulated last-level misses per request (instruction and data)."""
    il, dl, dw, d1 = (EVENTS.index(e) for e in ("ILmr", "DLmr", "DLmw", "D1mr"))
    rows = [(name, v[il] + v[dl] + v[dw], v) for name, v in inclusive.items()
            if "/addon/" in name or "/pricing/" in name]
    rows.sort(key=lambda r: -r[1])
    return [{"function": _short(name), "l2_misses_per_request": round(m / n), "data_l2_misses": round(v[dl] / n),
             "l1_data_misses": round(v[d1] / n), "instructions_per_request": round(v[0] / n)}
            for name, m, v in rows[:limit]]


def l2_geometry() -> dict[str, int]:
    """The simulated last level: this CPU's L2 (valgrind's default LL is the L3, which the sidecar's working set
    fits into; the L2 it does not). Sizes as sysfs gives them, rounded down to what valgrind accepts."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")):
        try:
            if (idx / "level").read_text().strip() == "2" and (idx / "type").read_text().strip() == "Unified":
                size = _size_bytes((idx / "size").read_text().strip())
                ways = int((idx / "ways_of_associativity").read_text().strip())
                line = int((idx / "coherency_line_size").read_text().strip())
                return {"size": 1 << (size.bit_length() - 1), "ways": ways, "line": line}
        except (OSError, ValueError):
            continue
    return {"size": 512 << 10, "ways": 8, "line": 64}  # a common L2 when sysfs does not say


def _size_bytes(text: str) -> int:
    """`1024K` -> 1048576."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)


def cache_case(conc: int, n: int, bare: dict[str, int], addon: dict[str, int], hooks: dict[str, int]) -> dict[str, Any]:
    """One load's simulated misses per request (event-loop thread): bare, addon, and of the addon's added misses
    those inside its hooks and those in mitmproxy's own code around them (the working set the hooks evict)."""
    row: dict[str, Any] = {"concurrency": conc, "requests": n}
    b_counts, a_counts, h_counts = counts(bare), counts(addon), counts(hooks)
    for label in COUNTS:
        b, a, h = b_counts[label], a_counts[label], h_counts[label]
        row[label] = {"bare": b, "addon": a, "ratio": round(a / b, 3) if b else None, "added": a - b,
                      "in_hooks": h, "around_hooks": a - b - h}
    return row


def _measure(wd: Path, upstream: str, mongo_uri: str | None, keys: list[tuple[str, str]], conc: int,
             n: int, caches: dict[str, int] | None = None, script: Path | None = None) -> dict[str, Any]:
    """One mitmdump under callgrind: bare, bare with `script` (the floor), or the sidecar (`mongo_uri` given)."""
    wd.mkdir(parents=True, exist_ok=True)
    out_file = wd / "callgrind.out"
    sim = [] if caches is None else [
        "--cache-sim=yes", "--branch-sim=yes", f"--LL={caches['size']},{caches['ways']},{caches['line']}"]
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes", *sim,
           f"--callgrind-out-file={out_file}", sys.executable, "-X", "perf", str(BIN / "mitmdump")]
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONUNBUFFERED"] = "1"
    if mongo_uri is not None:
        cmd += ["-s", str(addon_snapshot() / "addon" / "openhands.py"), "--set", f"openhands_upstream={upstream}"]
        env.update({"MONGODB_URI": mongo_uri, "OPENHANDS_MONGODB_DB": f"bench_instr_{wd.name}".replace("-", "_"),
                    "OPENHANDS_DATA_DIR": str(wd / "data"), "OPENHANDS_SPEND_CHECKER": "false"})
    elif script is not None:
        cmd += ["-s", str(script)]
    cmd += ["--mode", f"reverse:{upstream}", "--listen-host", "127.0.0.1", "--listen-port", "0",
            "--set", f"confdir={wd / 'conf'}", "--set", "connection_strategy=lazy", "--set", "flow_detail=0"]
    proc = subprocess.Popen(cmd, cwd=wd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    out = ProcessOutput(proc.stdout, wd / "mitmdump.log")
    try:
        port = int(out.wait_for(r"listening at [^\s]*:(\d+)", timeout=START_TIMEOUT_S).group(1))
        if mongo_uri is not None:
            out.wait_for(r"key-pool sidecar ready", timeout=START_TIMEOUT_S)
            for key_id, api_key in keys:
                _call(port, "POST", "/admin/openhands/keys",
                      {"id": key_id, "apiKey": api_key, "budgetLimit": 1e6}, expect=201)
        _load(port, conc, 2 * conc + 20)  # warm-up: connections, caches, every worker's binding
        if mongo_uri is not None:  # past the pool's start-up grace (PEER_GRACE_S: unseen peers assumed)
            time.sleep(STARTUP_S)
            _load(port, conc, conc + 4)
        _control("-i", "on", proc.pid)
        _load(port, conc, n)
        _control("-i", "off", proc.pid)
        _control("-d", proc.pid)
        files = _wait_dumped(out_file)
        threads = _per_thread(files, n)
        main = threads.get("main", 0)
        inclusive: dict[str, list[int]] = {}
        top = _top_addon(files.get("main"), Path(f"/tmp/perf-{proc.pid}.map"), n,
                         inclusive=inclusive) if mongo_uri else []
        events = _event_totals(files["main"], n)
        hooks = next((v for k, v in inclusive.items() if k.startswith(f"py::{HOOKS}:")), [0] * len(EVENTS))
        return {"threads": threads, "main": main, "top_addon": top, "events": events,
                "hooks_events": {e: round(x / n) for e, x in zip(EVENTS, hooks, strict=False)},
                "top_l2": _top_l2(inclusive, n)}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        Path(f"/tmp/perf-{proc.pid}.map").unlink(missing_ok=True)


def _call(port: int, method: str, path: str, body: dict, expect: int) -> None:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        c.request(method, path, json.dumps(body), {"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        if r.status != expect:
            raise RuntimeError(f"{method} {path}: {r.status}, expected {expect}")
    finally:
        c.close()


def _load(port: int, conc: int, n: int) -> None:
    """`n` chat requests over `conc` keep-alive connections, one conversation (session id) each."""
    body = json.dumps(JSON_BODY)
    errors: list[str] = []

    def worker(i: int, count: int) -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        hdrs = {"authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json",
                "x-litellm-session-id": f"instr-{i}"}
        try:
            for _ in range(count):
                c.request("POST", "/chat/completions", body, hdrs)
                r = c.getresponse()
                r.read()
                if r.status != 200:
                    errors.append(f"status {r.status}")
        finally:
            c.close()

    share = [n // conc + (1 if i < n % conc else 0) for i in range(conc)]
    ts = [threading.Thread(target=worker, args=(i, share[i])) for i in range(conc)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests: {errors[:3]}")


def _control(*args: Any) -> None:
    subprocess.run(["callgrind_control", *map(str, args)], check=True, capture_output=True, timeout=300)


def _wait_dumped(out_file: Path, timeout: float = 120.0) -> dict[str, Path]:
    """The dump's per-thread files: {"main": …, "t2": …}; thread 1 is the event loop's."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for f in glob.glob(f"{out_file}.*-*"):
            m = re.search(r"-(\d+)$", f)
            if m and _totals(Path(f)) is not None:
                found["main" if int(m.group(1)) == 1 else f"t{int(m.group(1))}"] = Path(f)
        if "main" in found:
            return found
        time.sleep(0.5)
    raise RuntimeError(f"no callgrind dump at {out_file}")


def _totals(f: Path) -> int | None:
    try:
        with open(f) as fh:
            for line in fh:
                if line.startswith("totals:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _event_totals(f: Path, n: int) -> dict[str, int]:
    """Every event of the file's `events:` line, per request (the totals line may leave trailing zeros out)."""
    names: list[str] = []
    with open(f) as fh:
        for line in fh:
            if line.startswith("events:"):
                names = line.split()[1:]
            elif line.startswith("totals:"):
                values = [int(x) for x in line.split()[1:]]
                return {e: round(v / n) for e, v in zip(names, values + [0] * (len(names) - len(values)),
                                                        strict=True)}
    return {}


def _per_thread(files: dict[str, Path], n: int) -> dict[str, int]:
    out = {}
    for name, f in files.items():
        total = _totals(f) or 0
        if total:
            out[name] = round(total / n)
    return out


def _top_addon(cg_file: Path | None, perf_map: Path, n: int, limit: int = 25,
               inclusive: dict[str, list[int]] | None = None) -> list[dict[str, Any]]:
    """The addon's functions by inclusive instructions per request (event-loop thread), from the callgrind
    file's call costs and the perf map naming the JIT trampolines of Python functions. `inclusive` (given):
    filled with every named Python function's inclusive cost of each event, summed over the run."""
    if cg_file is None or not perf_map.exists():
        return []
    starts: list[int] = []
    ends: list[int] = []
    names: list[str] = []
    for line in perf_map.read_text().splitlines():
        addr, size, name = line.split(" ", 2)
        starts.append(int(addr, 16))
        ends.append(int(addr, 16) + int(size, 16))
        names.append(name)
    order = sorted(range(len(starts)), key=starts.__getitem__)
    starts, ends, names = [starts[i] for i in order], [ends[i] for i in order], [names[i] for i in order]

    def pyname(sym: str) -> str | None:
        if not sym.startswith("0x"):
            return None
        a = int(sym.split("'")[0], 16)
        i = bisect.bisect_right(starts, a) - 1
        return names[i] if i >= 0 and a < ends[i] else None

    fn_names: dict[str, str] = {}

    def resolve(tok: str) -> str:
        m = re.match(r"\((\d+)\)(?: (.*))?", tok)
        if m is None:
            return tok
        if m.group(2) is not None:
            fn_names[m.group(1)] = m.group(2)
        return fn_names.get(m.group(1), m.group(1))

    incl: collections.Counter[str] = collections.Counter()
    vectors: dict[str, list[int]] = {}
    calls: collections.Counter[str] = collections.Counter()
    target: str | None = None
    after_calls = False
    with open(cg_file) as fh:
        for line in fh:
            if line.startswith("fn="):
                resolve(line[3:].strip())
                target, after_calls = None, False
            elif line.startswith("cfn="):
                target = resolve(line[4:].strip())
            elif line.startswith("calls=") and target is not None:
                calls[target] += int(line[6:].split()[0])
                after_calls = True
            elif after_calls and target is not None and (line[:1].isdigit() or line[:1] in "+-*"):
                parts = line.split()
                if len(parts) >= 2:
                    incl[target] += int(parts[1])
                    if inclusive is not None:
                        vec = vectors.setdefault(target, [0] * len(EVENTS))
                        for k, x in enumerate(parts[1:1 + len(EVENTS)]):
                            vec[k] += int(x)
                after_calls = False
    if inclusive is not None:
        for sym, vec in vectors.items():
            name = pyname(sym)
            if name:
                total = inclusive.setdefault(name, [0] * len(EVENTS))
                for k, x in enumerate(vec):
                    total[k] += x
    agg: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for sym, cost in incl.items():
        name = pyname(sym)
        if name and ("/addon/" in name or "/pricing/" in name):
            agg[name][0] += cost
            agg[name][1] += calls[sym]
    rows = sorted(agg.items(), key=lambda kv: -kv[1][0])[:limit]
    return [{"function": _short(name), "instructions_per_request": round(c / n), "calls_per_request": round(k / n, 2)}
            for name, (c, k) in rows]


def _short(name: str) -> str:
    name = name.removeprefix("py::")
    func, _, path = name.partition(":")
    for marker in ("/addon/", "/pricing/"):
        if marker in path:
            return f"{func} ({marker[1:]}{path.split(marker, 1)[1]})"
    return name
