"""Where a real mitmdump's CPU goes per request under load: bare, the floor, the sidecar; and which addon
functions cost what inside the real process.

The in-process profile (`profile`) times the addon's hooks back to back, warm; in a real mitmdump they run cold
between mitmproxy's long stretches, so they cost more there (about 1.5× in the runs of stop 24). This benchmark
measures the real process:

1. Three real mitmdumps against one fake upstream: bare `mitmdump --mode reverse`; the floor, bare plus
   `bench/minimal_addon.py` (the least a key-pool addon can do per request: swap the credential, meter the
   JSON usage into a dict); the sidecar on its embedded database. Paired rounds of closed-loop JSON load;
   per round and target the CPU per request of each part, read from /proc/<pid>/task/*/stat (utime + stime):
   the event-loop (main) thread, the process's other threads summed, the database child apart; requests/s.
   Ratios to bare per round (back to back, so drift hits both) and their medians.
2. With `perf` able to sample (`cpu-clock`; hardware counters need not exist) and Python ≥ 3.13
   (`PYTHON_PERF_JIT_SUPPORT`): a fresh bare mitmdump and sidecar with the perf trampolines on (the rounds
   above run without them: they cost a little per Python call), the main thread recorded
   (`perf record -e cpu-clock -F 999 -k 1 --call-graph dwarf`) for a few seconds of load, `perf inject --jit`,
   `perf script -F ip,sym`, bare and sidecar alternated over a few rounds; samples attributed to addon
   functions (inclusive and self µs per request), GC, mitmproxy's hook dispatch minus the addon's frames, the
   main-thread total. Without perf this part is
   skipped with the reason. The recordings (100+ MB each) and the jit files are deleted when done.

Not part of the default `python -m bench` run: `python -m bench --only realprofile [--quick|--tiny]`.
Wall-clock CPU figures on a shared 2-vCPU machine move ±20 % between runs: read the paired ratios.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import glob
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from bench.overhead import STARTUP_S, add_keys, loadgen, payloads, setup_fake_and_keys
from bench.procs import AddonMitm, BareMitm, addon_snapshot, descendants, settle, workdir

FLOOR_ADDON = Path(__file__).with_name("minimal_addon.py")
FLOOR_MEANS = ("floor = bare mitmdump + bench/minimal_addon.py: one pool key set as the credential, the JSON "
               "answer's usage × a price added to a dict and written to flow.comment — the least any key-pool "
               "addon does per request; sidecar − floor is what the sidecar's own design costs")
PERF_FREQ_HZ = 999
PERF_STACK = "dwarf,16384"
GC_SYMBOL = "gc_collect_main"
DISPATCH_FRAME = "py::AddonManager.invoke_addon:"  # mitmproxy's per-addon hook call (async events)
TICK = os.sysconf("SC_CLK_TCK")
PARTS = ("main", "other_threads", "database")


# -- pure helpers (unit-tested in tests/test_bench_real_profile.py) --------------------------------------------

def stat_cpu_seconds(stat: str) -> float:
    """utime + stime of one /proc/…/stat line, in seconds (the command name may hold spaces and parentheses)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def split_cpu(before: dict[tuple[int, int], float], after: dict[tuple[int, int], float], pid: int,
              requests: int) -> dict[str, float]:
    """CPU µs per request of each part of one mitmdump between two snapshots {(process, thread): seconds}:
    its main thread (thread id == pid), its other threads summed, its child processes (the database) summed.
    A thread born in between counts from zero; one that ended in between is lost (its counters go with it)."""
    out = dict.fromkeys(PARTS, 0.0)
    for (proc, tid), sec in after.items():
        part = ("main" if tid == pid else "other_threads") if proc == pid else "database"
        out[part] += sec - before.get((proc, tid), 0.0)
    return {k: round(v / requests * 1e6, 1) if requests else 0.0 for k, v in out.items()}


def summarise_rounds(per_round: list[dict[str, dict[str, float]]], base: str = "bare") -> dict[str, Any]:
    """Medians per target over the rounds, and per other target its ratios to `base` measured in the same round
    (requests/s and main-thread CPU per request) with their medians, and the main thread's added µs."""
    labels = list(per_round[0]) if per_round else []
    med = lambda xs: round(statistics.median(xs), 3) if xs else None  # noqa: E731
    targets = {lb: {k: med([r[lb][k] for r in per_round if lb in r])
                    for k in ("rps", *PARTS, "total")} for lb in labels}
    paired: dict[str, Any] = {}
    for lb in labels:
        if lb == base:
            continue
        rps = [r[lb]["rps"] / r[base]["rps"] for r in per_round if r.get(base, {}).get("rps") and lb in r]
        main = [r[lb]["main"] / r[base]["main"] for r in per_round if r.get(base, {}).get("main") and lb in r]
        added = [r[lb]["main"] - r[base]["main"] for r in per_round if base in r and lb in r]
        paired[lb] = {"rps_ratios": [round(x, 3) for x in rps], "rps_ratio_median": med(rps),
                      "main_ratios": [round(x, 3) for x in main], "main_ratio_median": med(main),
                      "main_added_us_median": med(added)}
    return {"targets": targets, "paired": paired}


def iter_samples(lines: Iterable[str]) -> Iterator[list[str]]:
    """The samples of `perf script -F ip,sym` output with call chains: each a list of frame symbols, innermost
    first (lines are `<hex ip> <symbol>`, samples end at a blank line)."""
    frames: list[str] = []
    for line in lines:
        s = line.strip()
        if not s:
            if frames:
                yield frames
                frames = []
            continue
        parts = s.split(None, 1)
        frames.append(parts[1] if len(parts) == 2 else parts[0])
    if frames:
        yield frames


def addon_function(frame: str, addon_root: str) -> str | None:
    """`Qualified.name (addon/file.py)` when `frame` is a Python frame (`py::name:path`) of the addon snapshot
    under `addon_root` (its addon/ or pricing/ tree), else None."""
    if not frame.startswith("py::"):
        return None
    name, sep, path = frame[4:].rpartition(":")
    if not sep:
        return None
    root = addon_root.rstrip("/") + "/"
    if not path.startswith(root):
        return None
    rel = path[len(root):]
    return f"{name} ({rel})" if rel.startswith(("addon/", "pricing/")) else None


def attribute(samples: Iterable[list[str]], addon_root: str | None) -> dict[str, Any]:
    """Sample counts of one main-thread recording: every sample; those with GC (`gc_collect_main`) on the stack;
    inside mitmproxy's hook dispatch (`AddonManager.invoke_addon`) and those of them without an addon frame (the
    dispatch's own cost); with any addon frame, those of them outside the dispatch (callbacks and tasks the addon
    left on the event loop), and those whose innermost Python frame is the addon's (the rest are in Python code
    it calls: mitmproxy's, the standard library's); per addon function, inclusive (on the stack, once per
    sample) and self (the innermost Python frame, its C callees included)."""
    total = gc = dispatch = dispatch_own = addon_any = addon_outside = addon_own = 0
    incl: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    cache: dict[str, str | None] = {}
    for frames in samples:
        total += 1
        if any(f.startswith(GC_SYMBOL) for f in frames):
            gc += 1
        funcs: list[str] = []
        innermost_py: str | None = None
        in_dispatch = False
        for f in frames:
            if not f.startswith("py::"):
                continue
            if f.startswith(DISPATCH_FRAME):
                in_dispatch = True
            if addon_root is None:
                fn = None
            elif f in cache:
                fn = cache[f]
            else:
                fn = cache[f] = addon_function(f, addon_root)
            if innermost_py is None:
                innermost_py = fn or ""
            if fn is not None:
                funcs.append(fn)
        if funcs:
            addon_any += 1
            addon_outside += not in_dispatch
            incl.update(set(funcs))
            if innermost_py:
                own[innermost_py] += 1
                addon_own += 1
        if in_dispatch:
            dispatch += 1
            if not funcs:
                dispatch_own += 1
    return {"samples": total, "gc": gc, "dispatch": dispatch, "dispatch_own": dispatch_own, "addon": addon_any,
            "addon_outside_dispatch": addon_outside, "addon_self": addon_own, "inclusive": dict(incl),
            "self": dict(own)}


def merge_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two recordings' `attribute` counts as one (the rounds of one target)."""
    out: dict[str, Any] = {k: a[k] + b[k] for k in ("samples", "gc", "dispatch", "dispatch_own", "addon",
                                                    "addon_outside_dispatch", "addon_self")}
    for k in ("inclusive", "self"):
        c = collections.Counter(a[k])
        c.update(b[k])
        out[k] = dict(c)
    return out


def per_request(counts: dict[str, Any], freq_hz: float, requests: int, top: int = 25) -> dict[str, Any]:
    """`attribute`'s counts as CPU µs per request (one cpu-clock sample ≈ 1/freq s of the thread's CPU), the addon
    functions ranked by inclusive µs."""
    k = 1e6 / freq_hz / requests if requests else 0.0
    us = lambda c: round(c * k, 1)  # noqa: E731
    funcs = sorted(counts["inclusive"].items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {"requests": requests, "samples": counts["samples"], "main_us": us(counts["samples"]),
            "gc_us": us(counts["gc"]), "dispatch_us": us(counts["dispatch"]),
            "dispatch_own_us": us(counts["dispatch_own"]), "addon_us": us(counts["addon"]),
            "addon_outside_dispatch_us": us(counts["addon_outside_dispatch"]),
            "addon_self_us": us(counts["addon_self"]),
            "top_addon": [{"function": f, "inclusive_us": us(c), "self_us": us(counts["self"].get(f, 0))}
                          for f, c in funcs]}


# -- measurement ------------------------------------------------------------------------------------------------

def _threads(pid: int) -> dict[tuple[int, int], float]:
    out: dict[tuple[int, int], float] = {}
    for proc in (pid, *descendants(pid)):
        try:
            tids = os.listdir(f"/proc/{proc}/task")
        except OSError:
            continue
        for t in tids:
            try:
                with open(f"/proc/{proc}/task/{t}/stat") as f:
                    out[(proc, int(t))] = stat_cpu_seconds(f.read())
            except (OSError, IndexError, ValueError):
                continue
    return out


def _measure(pid: int, port: int, conc: int, duration: float, warmup: float, body: bytes,
             quiet: list[int]) -> dict[str, float]:
    """One load run against one mitmdump: requests/s and CPU µs per request of its parts, counted from before the
    load until every process of the run is idle again (the sidecar's write-behind drained)."""
    settle(quiet)
    before = _threads(pid)
    res = loadgen(port, conc, duration, warmup, body)
    settle(quiet)
    cpu = split_cpu(before, _threads(pid), pid, res["requests_total"])
    if res["statuses"] != {"200": res["requests"]}:
        raise RuntimeError(f"non-200 answers from port {port}: {res['statuses']}")
    return {"rps": res["rps"], **cpu, "total": round(sum(cpu.values()), 1)}


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """`name=value` in this process's environment while a child starts (BareMitm passes os.environ on)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def perf_unavailable(wd: Path) -> str | None:
    """Why the per-function part cannot run here, or None."""
    if sys.version_info < (3, 13) or not hasattr(sys, "activate_stack_trampoline"):
        return f"Python {sys.version.split()[0]} has no perf jit trampoline (PYTHON_PERF_JIT_SUPPORT needs 3.13)"
    if shutil.which("perf") is None:
        return "perf not installed"
    probe = wd / "probe.data"
    try:
        r = subprocess.run(["perf", "--buildid-dir", str(wd / "buildid"), "record", "-e", "cpu-clock", "-o",
                            str(probe), "--", "true"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"perf record failed: {e}"
    finally:
        probe.unlink(missing_ok=True)
    return None if r.returncode == 0 else f"perf record -e cpu-clock failed: {r.stderr.strip()[-300:]}"


def _record(wd: Path, label: str, pid: int, port: int, conc: int, seconds: float, body: bytes,
            quiet: list[int], addon_root: str | None) -> dict[str, Any]:
    """perf of one mitmdump's main thread over `seconds` of load: the samples attributed (see `attribute`), the
    requests served, the main thread's CPU seconds by /proc over the same window, requests/s."""
    data, jit = wd / f"{label}.data", wd / f"{label}.jit.data"
    perf = ["perf", "--buildid-dir", str(wd / "buildid")]
    settle(quiet)
    before = _threads(pid)
    log = wd / f"{label}.perf.log"
    with open(log, "w") as err:
        rec = subprocess.Popen([*perf, "record", "-e", "cpu-clock", "-F", str(PERF_FREQ_HZ), "-k", "1",
                                "--call-graph", PERF_STACK, "-t", str(pid), "-o", str(data)],
                               stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while not (data.exists() and data.stat().st_size > 0):  # perf writes its header once it is recording
            if rec.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"perf record did not start: {log.read_text()[-500:]}")
            time.sleep(0.05)
        res = loadgen(port, conc, seconds, 0.2, body)
        settle(quiet)
    finally:
        rec.send_signal(signal.SIGINT)
        rec.wait(120)
    after = _threads(pid)
    try:
        subprocess.run([*perf, "inject", "--jit", "-i", str(data), "-o", str(jit)], check=True,
                       capture_output=True, timeout=600)
        data.unlink()
        script = subprocess.Popen([*perf, "script", "-i", str(jit), "-F", "ip,sym"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, errors="replace")
        assert script.stdout is not None
        counts = attribute(iter_samples(script.stdout), addon_root)
        script.wait(600)
    finally:
        data.unlink(missing_ok=True)
        jit.unlink(missing_ok=True)
    main_s = after.get((pid, pid), 0.0) - before.get((pid, pid), 0.0)  # /proc's figure over the same window
    return {"counts": counts, "requests": res["requests_total"], "main_s": main_s, "rps": res["rps"]}


def _remove_jit_files(pids: Iterable[int]) -> None:
    """Python's jitdump (/tmp/jit-<pid>.dump) and perf inject's jitted-<pid>-*.so of the processes we started."""
    for pid in pids:
        Path(f"/tmp/jit-{pid}.dump").unlink(missing_ok=True)
        for f in glob.glob(f"/tmp/jitted-{pid}-*.so"):
            Path(f).unlink(missing_ok=True)


def _perf_part(wd: Path, fake_url: str, fake_pid: int, keys: list[tuple[str, str]], conc: int, seconds: float,
               rounds: int, body: bytes) -> dict[str, Any]:
    why = perf_unavailable(wd)
    if why:
        return {"skipped": why}
    started: list[int] = []
    bare = sidecar = None
    try:
        with _env("PYTHON_PERF_JIT_SUPPORT", "1"):
            bare = BareMitm(wd / "perf-bare", fake_url, name="perf-bare")
        started.append(bare.pid)
        sidecar = AddonMitm(wd / "perf-sidecar", fake_url, "embedded", env={"PYTHON_PERF_JIT_SUPPORT": "1"},
                            name="perf-sidecar")
        sidecar.start()
        started += [sidecar.pid, *descendants(sidecar.pid)]
        add_keys(sidecar, keys)
        for port in (bare.port, sidecar.bound_port):
            loadgen(port, conc, STARTUP_S, 0.0, body)
        quiet = [fake_pid, bare.pid, sidecar.pid, *descendants(sidecar.pid)]
        root = str(addon_snapshot())
        targets = {"bare": (bare.pid, bare.port, None), "sidecar": (sidecar.pid, sidecar.bound_port, root)}
        raw: dict[str, list[dict[str, Any]]] = {"bare": [], "sidecar": []}
        for _ in range(rounds):  # alternated, so the machine's drift hits both alike
            for label, (pid, port, addon_root) in targets.items():
                raw[label].append(_record(wd, label, pid, port, conc, seconds, body, quiet, addon_root))
        rows: dict[str, dict[str, Any]] = {}
        for label, recs in raw.items():
            counts = functools.reduce(merge_counts, (r["counts"] for r in recs))
            n = sum(r["requests"] for r in recs)
            rows[label] = {**per_request(counts, PERF_FREQ_HZ, n),
                           "proc_main_us": round(sum(r["main_s"] for r in recs) / n * 1e6, 1) if n else 0.0,
                           "rps": round(statistics.median(r["rps"] for r in recs), 1),
                           "per_round_main_us": [round(r["counts"]["samples"] * 1e6 / PERF_FREQ_HZ / r["requests"], 1)
                                                 if r["requests"] else 0.0 for r in recs],
                           "per_round_rps": [r["rps"] for r in recs]}
        rows["bare"].pop("top_addon")
        s, b = rows["sidecar"], rows["bare"]
        return {"freq_hz": PERF_FREQ_HZ, "concurrency": conc, "seconds": seconds, "rounds": rounds, **rows,
                "added": {k: round(s[k] - b[k], 1) for k in ("main_us", "proc_main_us", "gc_us", "dispatch_own_us")}}
    finally:
        for m in (sidecar, bare):
            if m is not None:
                m.stop()
        _remove_jit_files(started)
        shutil.rmtree(wd / "buildid", ignore_errors=True)


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    wd = workdir("realprofile")
    if tiny:
        concs, rounds, duration, warmup, perf_s, perf_rounds = [4], 1, 0.5, 0.1, 0.0, 0
    elif quick:
        concs, rounds, duration, warmup, perf_s, perf_rounds = [16, 1], 3, 3.0, 0.3, 2.0, 2
    else:
        concs, rounds, duration, warmup, perf_s, perf_rounds = [16, 1], 5, 4.0, 0.3, 3.0, 3
    fake, keys = setup_fake_and_keys(wd, 3 if tiny else 20)
    body = payloads()["json"]
    floor_script = wd / "minimal_addon.py"  # a copy: mitmdump reloads a script whose file changes
    shutil.copyfile(FLOOR_ADDON, floor_script)
    bare = floor = sidecar = None
    cases = []
    try:
        bare = BareMitm(wd / "bare", fake.url)
        floor = BareMitm(wd / "floor", fake.url, extra=["-s", str(floor_script)], name="floor")
        sidecar = AddonMitm(wd / "sidecar", fake.url, "embedded", name="sidecar")
        sidecar.start()
        add_keys(sidecar, keys)
        targets = {"bare": (bare.pid, bare.port), "floor": (floor.pid, floor.port),
                   "sidecar": (sidecar.pid, sidecar.bound_port)}
        if not tiny:  # steady state first: the sidecar's first seconds take the general key choice (PEER_GRACE_S)
            for _, port in targets.values():
                loadgen(port, 16, STARTUP_S, 0.0, body)
        quiet = [fake.proc.pid, bare.pid, floor.pid, sidecar.pid, *descendants(sidecar.pid)]
        for conc in concs:
            per_round = [{label: _measure(pid, port, conc, duration, warmup, body, quiet)
                          for label, (pid, port) in targets.items()} for _ in range(rounds)]
            cases.append({"concurrency": conc, "per_round": per_round, **summarise_rounds(per_round)})
    finally:
        for p in (sidecar, floor, bare):
            if p is not None:
                p.stop()
    try:
        perf = (_perf_part(wd, fake.url, fake.proc.pid, keys, concs[0], perf_s, perf_rounds, body) if not tiny
                else {"skipped": "--tiny: no perf recording"})
    finally:
        fake.stop()
    return {"rounds": rounds, "duration_s": duration, "warmup_s": warmup, "keys": len(keys), "cases": cases,
            "perf": perf, "floor": FLOOR_MEANS, "workdir": str(wd)}

