"""Store off the request path: the overhead run with every MongoDB message delayed by 50 ms.

`python -m bench.slow_store --target 127.0.0.1:27017 --delay 0.05` is a MongoDB-protocol TCP proxy:
it frames the wire protocol (int32 little-endian message length) and holds every client→server
message for `delay` seconds before forwarding it (messages stay pipelined and ordered; replies pass at
once), so each MongoDB operation takes ≥ 50 ms longer. It prints `slow-store listening on HOST:PORT`.

The benchmark runs bare mitmdump, the addon on SecantusDB directly, and the addon on the same
SecantusDB behind the proxy, against one fake upstream, and reports the slow store's added latency two ways.
Sequential (bench.overhead.compare, the targets one after the other): the latencies a client sees, but on this VM
the CPU's speed drifts between rounds by ±20 %, more than the 1 ms looked for. Co-scheduled (bench.cosched):
the fast-store addon, a second one on the same server directly (fast_store_2, its own database: the A/A
control, so the method's own noise shows) and the slow-store addon share one pinned core and are loaded at the
same moment; the verdict reads, per load, the median over rounds of slow p50 − fast p50.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import signal
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import cosched
from bench.overhead import add_keys, compare, loadgen_command, payloads, setup_fake_and_keys, warm_together
from bench.procs import ROOT, AddonMitm, BareMitm, MongoServer, ProcessOutput, stop_process, workdir


# ---- the proxy -------------------------------------------------------------------------------
async def _delayed_pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def sender() -> None:
        while True:
            item = await queue.get()
            if item is None:
                break
            due, msg = item
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(msg)
            await writer.drain()

    task = asyncio.create_task(sender())
    try:
        while True:
            head = await reader.readexactly(4)
            (length,) = struct.unpack("<i", head)
            rest = await reader.readexactly(length - 4)
            await queue.put((time.monotonic() + delay, head + rest))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        await queue.put(None)
        try:
            await task
        except ConnectionError:
            pass
        writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(target_host: str, target_port: int, delay: float, port: int = 0) -> None:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(target_host, target_port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(_delayed_pump(cr, sw, delay), _pump(sr, cw), return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    host, p = server.sockets[0].getsockname()[:2]
    sys.stdout.write(f"slow-store listening on {host}:{p}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.slow_store")
    ap.add_argument("--target", required=True, help="host:port of the MongoDB-protocol server")
    ap.add_argument("--delay", type=float, default=0.05)
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args(argv)
    host, _, port = a.target.rpartition(":")
    asyncio.run(serve(host or "127.0.0.1", int(port), a.delay, a.port))
    return 0


class SlowStore:
    def __init__(self, wd: Path, target_port: int, delay: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.slow_store", "--target",
                                      f"127.0.0.1:{target_port}", "--delay", str(delay)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.out = ProcessOutput(self.proc.stdout, wd / "slow-store.log")
        self.port = int(self.out.wait_for(r"listening on [\d.]+:(\d+)", timeout=20).group(1))
        self.uri = f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, timeout=10)


def measure_op_latency(uri: str, n: int = 5) -> float:
    """Median ms of a MongoDB ping through `uri` (shows the proxy really slows the store)."""
    import pymongo
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10000)
    try:
        client.admin.command("ping")
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.admin.command("ping")
            times.append((time.perf_counter() - t0) * 1000)
        return round(sorted(times)[len(times) // 2], 2)
    finally:
        client.close()


# ---- the co-scheduled verdict (pure; tests/test_bench_slow_store.py) --------------------------------------
FAST, CONTROL, SLOW = "fast_store", "fast_store_2", "slow_store"


def round_differences(p50_ms: dict[str, list[float]], a: str, b: str) -> list[float]:
    """Per round, `a`'s median latency minus `b`'s (ms): both were loaded at the same moment on the same core, so
    the VM's drift hits both. Rounds where either has no finite figure (or no figure: a target missing) give none."""
    return [round(x - y, 3) for x, y in zip(p50_ms.get(a, []), p50_ms.get(b, []), strict=False)
            if math.isfinite(x) and math.isfinite(y)]


def added_limit_ms(fast_p50_ms: float | None) -> float:
    """What "unchanged" allows: 1 ms, or 2 % of the fast store's median when that is more. Three addons share one
    core here, so at 16 and 64 clients a median is ~100+ ms and 1 ms alone is below the method's resolution."""
    if fast_p50_ms is None or not math.isfinite(fast_p50_ms):
        return 1.0
    return round(max(1.0, 0.02 * fast_p50_ms), 3)


def latency_summary(p50_ms: dict[str, list[float]]) -> dict[str, Any]:
    """One load's co-scheduled latencies: each target's median p50 over rounds, slow − fast and control − fast per
    round (median and range), the limit from the fast store's median, and whether the slow store's median
    difference is within it."""
    medians = {lb: round(statistics.median(xs), 3) if xs else None for lb, xs in p50_ms.items()}
    slow = round_differences(p50_ms, SLOW, FAST)
    control = round_differences(p50_ms, CONTROL, FAST)
    limit = added_limit_ms(medians.get(FAST))
    added = cosched.summary(slow)["median"]
    return {"p50_median_ms": medians, "slow_vs_fast_p50_ms": {"per_round": slow, **cosched.summary(slow)},
            "control_vs_fast_p50_ms": {"per_round": control, **cosched.summary(control)}, "limit_ms": limit,
            "met": added is not None and added <= limit}


# ---- the benchmark ---------------------------------------------------------------------------
def run(quick: bool = False, tiny: bool = False, delay: float = 0.05) -> dict[str, Any]:
    wd = workdir("slowstore")
    duration, warmup, rounds = (0.3, 0.1, 1) if tiny else (2.0, 0.5, 1) if quick else (6.0, 1.0, 2)
    co_duration, co_warmup, co_rounds = cosched.round_sizes(quick, tiny)
    concs = [1] if tiny else [1, 16, 64]
    fake, keys = setup_fake_and_keys(wd, 3 if tiny else 20)
    procs: list[Any] = []
    try:
        mongo = MongoServer(wd / "secantus").start()
        procs.append(mongo)
        slow = SlowStore(wd, mongo.port, delay)
        procs.append(slow)
        bare = BareMitm(wd / "bare", fake.url)
        procs.append(bare)
        t0 = time.monotonic()
        fast_sc = AddonMitm(wd / "addon-fast", fake.url, mongo.uri, "bench_fast", name="addon-fast")
        procs.append(fast_sc)  # before start: one that fails to come up is stopped too
        fast_sc.start()
        fast_start = time.monotonic() - t0
        t0 = time.monotonic()
        slow_sc = AddonMitm(wd / "addon-slow", fake.url, slow.uri, "bench_slow", name="addon-slow")
        procs.append(slow_sc)
        slow_sc.start()
        slow_start = time.monotonic() - t0
        # The A/A control: the fast store's twin on the same server directly, its own database (sharing one would
        # make the two a fleet of peers, which neither of the others is).
        fast_2 = AddonMitm(wd / "addon-fast-2", fake.url, mongo.uri, "bench_fast_2", name="addon-fast-2")
        procs.append(fast_2)
        fast_2.start()
        addons: dict[str, AddonMitm] = {FAST: fast_sc, CONTROL: fast_2, SLOW: slow_sc}
        for sc in addons.values():
            add_keys(sc, keys)
        if not tiny:  # steady state first: a sidecar's first seconds take the general key choice (PEER_GRACE_S)
            warm_together({lb: sc.bound_port for lb, sc in addons.items()})
        load_pids = [fake.proc.pid, mongo.proc.pid, slow.proc.pid]
        pids = [*load_pids, bare.pid, *(sc.pid for sc in addons.values())]
        rows = compare({"bare": bare.port, FAST: fast_sc.port, SLOW: slow_sc.port}, "bare",
                       [("json", c) for c in concs], duration, warmup, rounds, pids)
        for row in rows:
            row["slow_vs_fast_added_p50_ms"] = round(row[SLOW]["p50_ms"] - row[FAST]["p50_ms"], 3)
            row["slow_vs_fast_throughput_ratio"] = round(row[SLOW]["rps"] / row[FAST]["rps"], 3)
        co = co_scheduled(concs, {lb: (sc.pid, sc.bound_port) for lb, sc in addons.items()}, load_pids,
                          [bare.pid, *load_pids], co_rounds, co_duration, co_warmup)
        return {"delay_ms": delay * 1000, "mongo_ping_ms": {"direct": measure_op_latency(mongo.uri),
                                                            "slowed": measure_op_latency(slow.uri)},
                "startup_s": {"fast_store": round(fast_start, 2), "slow_store": round(slow_start, 2)},
                "duration_s": duration, "rounds": rounds, "rows": rows, "co_scheduled": co}
    finally:
        for p in reversed(procs):
            p.stop()
        fake.stop()


def co_scheduled(concs: list[int], targets: dict[str, tuple[int, int]], load_pids: list[int],
                 idle_pids: list[int], rounds: int, duration: float, warmup: float) -> dict[str, Any]:
    """bench.cosched over JSON at each concurrency: the fast-store addon (baseline), its twin (the A/A control) and
    the slow-store addon loaded at the same moment on one shared core, the fake, SecantusDB and the slow proxy on
    the other; each row gains its latency summary (latency_summary). Rounds start once every process is idle
    (`idle_pids`: the others that must be quiet too), i.e. the slow store's write-behind has drained."""
    body = payloads()["json"]
    cases = [{"payload": "json", "concurrency": c, "baseline": FAST, "control": CONTROL,
              "commands": {lb: loadgen_command(port, c, duration, warmup, body) for lb, (_, port) in targets.items()}}
             for c in concs]
    target_pids = [pid for pid, _ in targets.values()]
    co = cosched.measure(cases, target_pids, load_pids, [*target_pids, *idle_pids], rounds, duration, warmup)
    for row in co["rows"]:
        row.update(latency_summary(row["p50_ms"]))
    return co

if __name__ == "__main__":
    sys.exit(main())
