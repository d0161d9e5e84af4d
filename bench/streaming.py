"""Streaming: first-byte and total time for SSE streams of 10 / 1 000 / 100 000 events, bare vs addon;
proof that the first event reaches the client while the upstream is still sending; peak RSS of the
mitmdump process while a 100 MB stream passes.

Bare mitmdump buffers whole bodies by default, which would make any comparison of first-byte times
meaningless, so the baseline is mitmdump plus a three-line addon that sets `flow.response.stream = True`
for `text/event-stream` answers: the least any streaming-aware addon does. The addon runs as shipped: it
streams `200 text/event-stream` itself (DESIGN §10).
Requests are chat completions without `stream_options`, the addon's heavier path (it adds
`include_usage` upstream and cuts the usage chunk out of what the client receives).
"""
from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from typing import Any

from bench.loadgen import build_request, read_response
from bench.overhead import CLIENT_KEY, MODEL, add_keys, setup_fake_and_keys
from bench.procs import AddonMitm, BareMitm, MongoServer, rss, workdir


async def one_stream(port: int, extra_headers: list[tuple[str, str]], session: str) -> dict[str, float]:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "stream"}], "stream": True}).encode()
    headers = [("authorization", f"Bearer {CLIENT_KEY}"), ("content-type", "application/json"),
               ("x-litellm-session-id", session), *extra_headers]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    try:
        first: list[float] = []
        events = [0]

        def on_body(data: bytes) -> None:
            if not first:
                first.append(time.perf_counter())
            events[0] += data.count(b"\n\n")

        t0 = time.perf_counter()
        writer.write(build_request("POST", "127.0.0.1", port, "/chat/completions", body, headers))
        status, _, nbytes, _ = await read_response(reader, on_body)
        t1 = time.perf_counter()
    finally:
        writer.close()
    if status != 200 or not first:
        raise RuntimeError(f"stream through port {port} failed: status {status}")
    return {"ttfb_ms": (first[0] - t0) * 1000, "total_ms": (t1 - t0) * 1000, "bytes": nbytes, "events": events[0]}


def streams(port: int, n: int, reps: int, extra: list[tuple[str, str]], session: str) -> list[dict[str, float]]:
    async def go():
        return [await one_stream(port, extra, session) for _ in range(reps)]
    return asyncio.run(go())


def rss_during(pid: int, port: int, total_bytes: int, session: str) -> dict[str, Any]:
    """Sample VmRSS every 20 ms while one stream of `total_bytes` passes through process `pid`."""
    before = rss(pid)
    samples: list[int] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            try:
                samples.append(rss(pid)["VmRSS"])
            except (OSError, KeyError):
                pass
            stop.wait(0.02)

    t = threading.Thread(target=sampler, daemon=True)
    t.start()
    try:
        r = streams(port, 0, 1, [("x-fake-stream-bytes", str(total_bytes))], session)[0]
    finally:
        stop.set()
        t.join()
    after = rss(pid)
    peak = max(samples + [after["VmRSS"]])
    mb = 1024 * 1024
    return {"stream_mb": round(r["bytes"] / mb, 1), "seconds": round(r["total_ms"] / 1000, 2),
            "rss_before_mb": round(before["VmRSS"] / mb, 1), "rss_peak_mb": round(peak / mb, 1),
            "rss_growth_mb": round((peak - before["VmRSS"]) / mb, 1),
            "hwm_before_mb": round(before["VmHWM"] / mb, 1), "hwm_after_mb": round(after["VmHWM"] / mb, 1),
            "samples": len(samples)}


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    wd = workdir("streaming")
    if tiny:
        sizes, big, delayed = {10: 2, 100: 1}, 2 * 1024 * 1024, (3, 0.05)
    elif quick:
        sizes, big, delayed = {10: 10, 1000: 10, 100000: 1}, 20 * 1024 * 1024, (10, 0.05)
    else:
        sizes, big, delayed = {10: 30, 1000: 30, 100000: 3}, 100 * 1024 * 1024, (20, 0.05)
    fake, keys = setup_fake_and_keys(wd, 3 if tiny else 20)
    bare = addon = mongo = None
    try:
        bare = BareMitm(wd / "bare", fake.url, stream_sse=True)
        mongo = MongoServer(wd / "secantus").start()
        addon = AddonMitm(wd / "addon", fake.url, mongo.uri, "bench_streaming").start()
        add_keys(addon, keys)
        targets = {"bare": bare.port, "addon": addon.port}
        rows = []
        for n, r in sizes.items():
            per: dict[str, list[dict[str, float]]] = {"bare": [], "addon": []}
            for label, port in targets.items():  # warm the connection path
                streams(port, n, 1, [("x-fake-stream-events", "10")], f"stream-{label}")
            for _ in range(r):  # interleave single streams so drift hits both
                for label, port in targets.items():
                    per[label] += streams(port, n, 1, [("x-fake-stream-events", str(n))], f"stream-{label}")
            row: dict[str, Any] = {"events": n, "reps": r}
            for label, res in per.items():
                row[label] = {"ttfb_ms": round(statistics.median(x["ttfb_ms"] for x in res), 3),
                              "total_ms": round(statistics.median(x["total_ms"] for x in res), 3),
                              "events_received": int(statistics.median(x["events"] for x in res))}
            row["ttfb_ratio"] = round(row["addon"]["ttfb_ms"] / row["bare"]["ttfb_ms"], 3)
            row["total_ratio"] = round(row["addon"]["total_ms"] / row["bare"]["total_ms"], 3)
            rows.append(row)

        # proof: the upstream waits `delay` before every event but the first (n deltas + finish + [DONE])
        n, delay = delayed
        proof: dict[str, Any] = {"events": n, "event_delay_s": delay, "upstream_send_s": round((n + 1) * delay, 3)}
        for label, port in targets.items():
            res = streams(port, n, 1, [("x-fake-stream-events", str(n)), ("x-fake-event-delay", str(delay))],
                          f"proof-{label}")[0]
            proof[label] = {"first_event_ms": round(res["ttfb_ms"], 1), "total_ms": round(res["total_ms"], 1),
                            "first_before_upstream_done": res["ttfb_ms"] / 1000 < delay}

        memory = {"bare": rss_during(bare.pid, bare.port, big, "rss-bare"),
                  "addon": rss_during(addon.pid, addon.port, big, "rss-addon")}
        return {"rows": rows, "first_event_proof": proof, "memory": memory,
                "baseline": "mitmdump + 3-line addon streaming text/event-stream", "database": "secantusdb"}
    finally:
        for p in (addon, bare, mongo):
            if p is not None:
                p.stop()
        fake.stop()
