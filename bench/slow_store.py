"""Store off the request path: the overhead run with every MongoDB message delayed by 50 ms.

`python -m bench.slow_store --target 127.0.0.1:27017 --delay 0.05` is a MongoDB-protocol TCP proxy:
it frames the wire protocol (int32 little-endian message length) and holds every client→server
message for `delay` seconds before forwarding it (messages stay pipelined and ordered; replies pass at
once), so each MongoDB operation takes ≥ 50 ms longer. It prints `slow-store listening on HOST:PORT`.

The benchmark runs bare mitmdump, the addon on SecantusDB directly, and the addon on the same
SecantusDB behind the proxy, against one fake upstream, and reports the slow store's added latency.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.overhead import add_keys, compare, setup_fake_and_keys
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


# ---- the benchmark ---------------------------------------------------------------------------
def run(quick: bool = False, tiny: bool = False, delay: float = 0.05) -> dict[str, Any]:
    wd = workdir("slowstore")
    duration, warmup, rounds = (0.3, 0.1, 1) if tiny else (2.0, 0.5, 1) if quick else (6.0, 1.0, 2)
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
        fast_sc = AddonMitm(wd / "addon-fast", fake.url, mongo.uri, "bench_fast", name="addon-fast").start()
        procs.append(fast_sc)
        fast_start = time.monotonic() - t0
        t0 = time.monotonic()
        slow_sc = AddonMitm(wd / "addon-slow", fake.url, slow.uri, "bench_slow", name="addon-slow").start()
        procs.append(slow_sc)
        slow_start = time.monotonic() - t0
        add_keys(fast_sc, keys)
        add_keys(slow_sc, keys)
        pids = [fake.proc.pid, mongo.proc.pid, slow.proc.pid, bare.pid, fast_sc.pid, slow_sc.pid]
        rows = compare({"bare": bare.port, "fast_store": fast_sc.port, "slow_store": slow_sc.port}, "bare",
                       [("json", c) for c in concs], duration, warmup, rounds, pids)
        for row in rows:
            row["slow_vs_fast_added_p50_ms"] = round(row["slow_store"]["p50_ms"] - row["fast_store"]["p50_ms"], 3)
            row["slow_vs_fast_throughput_ratio"] = round(row["slow_store"]["rps"] / row["fast_store"]["rps"], 3)
        return {"delay_ms": delay * 1000, "mongo_ping_ms": {"direct": measure_op_latency(mongo.uri),
                                                            "slowed": measure_op_latency(slow.uri)},
                "startup_s": {"fast_store": round(fast_start, 2), "slow_store": round(slow_start, 2)},
                "duration_s": duration, "rounds": rounds, "rows": rows}
    finally:
        for p in reversed(procs):
            p.stop()
        fake.stop()


if __name__ == "__main__":
    sys.exit(main())
