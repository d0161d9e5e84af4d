"""Streaming: first-byte and total time for SSE streams of 10 / 1 000 / 100 000 events, bare vs addon;
proof that the first event reaches the client while the upstream is still sending; peak RSS of the
mitmdump process while a 100 MB stream passes.

Bare mitmdump buffers whole bodies by default, which would make any comparison of first-byte times
meaningless, so the baseline is mitmdump plus a three-line addon that sets `flow.response.stream = True`
for `text/event-stream` answers: the least any streaming-aware addon does. The addon runs as shipped: it
streams `200 text/event-stream` itself (DESIGN §10).
Requests are chat completions without `stream_options`, the addon's heavier path (it adds
`include_usage` upstream and cuts the usage chunk out of what the client receives).

Both mitmdumps serve `STARTUP_S` of load first (the addon's steady state, as in the overhead benchmark).
Each stream size then runs rounds of bare and addon back to back, the side going first alternating: one
stream whose first event the upstream sends alone (`FIRST_EVENT_GAP_S`) for the time to first byte, one
sent at once for the total. A row's ratios are the medians of the per-round ratios; each TTFB is a few
milliseconds on a shared machine, where the ratio of two medians taken apart moved by ±30 % between runs.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from typing import Any

from bench.loadgen import build_request, read_response
from bench.overhead import CLIENT_KEY, MODEL, STARTUP_S, add_keys, loadgen, payloads, setup_fake_and_keys
from bench.procs import AddonMitm, BareMitm, MongoServer, rss, settle, workdir


async def one_stream(port: int, extra_headers: list[tuple[str, str]], session: str,
                     cut: bool = False) -> dict[str, float]:
    """One stream through `port`; with `cut`, the client closes the connection as soon as the first byte is in
    (then only `ttfb_ms` is measured)."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "stream"}], "stream": True}).encode()
    headers = [("authorization", f"Bearer {CLIENT_KEY}"), ("content-type", "application/json"),
               ("x-litellm-session-id", session), *extra_headers]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    try:
        first: list[float] = []
        events = [0]
        split = [False]  # the last piece ended inside an event's blank-line terminator

        def on_body(data: bytes) -> None:
            if not first:
                first.append(time.perf_counter())
                if cut:
                    raise _FirstByte
            # bare forwards the upstream's pieces as they come, so a "\n\n" may straddle two of them
            events[0] += data.count(b"\n\n") + (split[0] and data[:1] == b"\n")
            split[0] = data[-1:] == b"\n" and data[-2:] != b"\n\n"

        t0 = time.perf_counter()
        writer.write(build_request("POST", "127.0.0.1", port, "/chat/completions", body, headers))
        try:
            status, _, nbytes, _ = await read_response(reader, on_body)
        except _FirstByte:
            return {"ttfb_ms": (first[0] - t0) * 1000}
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


def ratio_summary(pairs: list[tuple[float, float]]) -> dict[str, float]:
    """Per-pair ratios (addon / bare, measured back to back) and their median and quartiles: drift of the
    shared machine hits both sides of a pair alike, so the median of the ratios is steadier than the ratio
    of the medians when each figure is a few milliseconds."""
    ratios = sorted(a / b for b, a in pairs)
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": round(q[1], 3), "p25": round(q[0], 3), "p75": round(q[2], 3)}


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


# Interleaved (bare, addon) pairs per stream size: 10-event streams take ~10 ms, 1,000 ~60 ms, 100,000 several s.
# Even counts: each side goes first equally often. Per size: (first-byte pairs, total-time pairs). A first byte is a
# few ms whose per-pair ratios spread 0.85-1.25 on this VM, so a median of 200 pairs moves by ±3 %: the first-byte
# pairs are the many, the totals (steadier, and long) the few.
PAIRS = {"full": {10: (800, 200), 1000: (400, 80), 100000: (240, 6)},
         "quick": {10: (200, 100), 1000: (100, 40), 100000: (60, 4)}, "tiny": {10: (4, 4), 100: (2, 2)}}
WARM_PAIRS = {10: 5, 100: 1, 1000: 3, 100000: 0}  # unmeasured pairs before a size's first measured one
# The first-byte streams: the upstream sends its first event, waits this long, then the rest at once. Without
# the wait the rest arrives with the first, and both proxies' first byte waits on their work on the events after
# it while the fake, on the same two cores, is still writing them (bare: 4.7 ms at 10 events, 8-12.6 ms at
# 100,000), so the figure grew with the stream for reasons neither side controls. 20 ms is several times the
# first event's trip through either proxy; the total time is taken from streams sent at once.
FIRST_EVENT_GAP_S = 0.02
# From this many events on, a stream is long: each starts on idle processes and a warm path, and a first-byte stream
# is closed by the client once its first byte is in (the first byte
# of a stream does not depend on what follows it, and 3 s streams could not be repeated hundreds of times); each
# starts on idle processes (the one before is torn down) and a warm path (a short stream first).
LONG_STREAM_EVENTS = 100000


class _FirstByte(Exception):
    """Raised from the body callback once the first byte is in, when the client stops reading there."""


def measure_pairs(targets: dict[str, int], n: int, pairs: tuple[int, int], pids: list[int]) -> dict[str, Any]:
    """Rounds of bare and addon back to back (the side that goes first alternating): `pairs[0]` of a stream with
    the first-event gap for the time to first byte, `pairs[1]` of one sent at once for the total. Ratios are taken
    within each round; their median is the row's figure."""
    gap = [("x-fake-stream-events", str(n)), ("x-fake-first-event-gap", str(FIRST_EVENT_GAP_S))]
    burst = [("x-fake-stream-events", str(n))]
    first: dict[str, list[dict[str, float]]] = {"bare": [], "addon": []}
    whole: dict[str, list[dict[str, float]]] = {"bare": [], "addon": []}
    warm = WARM_PAIRS.get(n, 1)
    long = n >= LONG_STREAM_EVENTS

    async def go() -> None:
        order = list(targets.items())
        for headers, into, count in ((gap, first, pairs[0]), (burst, whole, pairs[1])):
            for i in range(warm + count):
                for label, port in (order if i % 2 == 0 else order[::-1]):
                    if long:  # each long stream starts on idle processes, not on the tail of the one before,
                        settle(pids, timeout=10, window=0.1 if into is first else 0.5)  # then on a warm path
                        for _ in range(1 if into is first else 2):  # (short streams), as shorter ones do
                            await one_stream(port, [("x-fake-stream-events", "10")], f"stream-{label}")
                    r = await one_stream(port, headers, f"stream-{label}", cut=long and into is first)
                    if i >= warm:
                        into[label].append(r)
    asyncio.run(go())
    row: dict[str, Any] = {"events": n, "reps": pairs[1], "pairs": pairs[1], "ttfb_pairs": pairs[0],
                           "ttfb_cut": long}
    for label in targets:
        row[label] = {"ttfb_ms": round(statistics.median(x["ttfb_ms"] for x in first[label]), 3),
                      "total_ms": round(statistics.median(x["total_ms"] for x in whole[label]), 3),
                      "ttfb_burst_ms": round(statistics.median(x["ttfb_ms"] for x in whole[label]), 3),
                      "events_received": int(statistics.median(x["events"] for x in whole[label]))}
    for name, field, res in (("ttfb", "ttfb_ms", first), ("total", "total_ms", whole),
                             ("ttfb_burst", "ttfb_ms", whole)):
        r = ratio_summary([(b[field], a[field]) for b, a in zip(res["bare"], res["addon"], strict=True)])
        row[f"{name}_ratio"] = r["median"]  # ttfb_ratio and total_ratio are the figures the targets read
        row[f"{name}_ratio_p25"], row[f"{name}_ratio_p75"] = r["p25"], r["p75"]
        if name != "ttfb_burst":
            key = "ttfb_ms" if name == "ttfb" else "total_ms"
            row[f"{name}_ratio_of_medians"] = round(row["addon"][key] / row["bare"][key], 3)
    return row


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    wd = workdir("streaming")
    mode = "tiny" if tiny else "quick" if quick else "full"
    sizes = PAIRS[mode]
    big, delayed = {"tiny": (2 * 1024 * 1024, (3, 0.05)), "quick": (20 * 1024 * 1024, (10, 0.05)),
                    "full": (100 * 1024 * 1024, (20, 0.05))}[mode]
    fake, keys = setup_fake_and_keys(wd, 3 if tiny else 20)
    bare = addon = mongo = None
    try:
        bare = BareMitm(wd / "bare", fake.url, stream_sse=True)
        mongo = MongoServer(wd / "secantus").start()
        addon = AddonMitm(wd / "addon", fake.url, mongo.uri, "bench_streaming").start()
        add_keys(addon, keys)
        targets = {"bare": bare.port, "addon": addon.port}
        warmed_s = 0.0
        if not tiny:  # steady state first: the addon's first seconds take the general key choice (PEER_GRACE_S)
            t0 = time.monotonic()
            for port in targets.values():
                loadgen(port, 4, STARTUP_S, 0.0, payloads()["sse"])
            warmed_s = round(time.monotonic() - t0, 1)
        pids = [fake.proc.pid, bare.pid, addon.pid, *([mongo.proc.pid] if mongo.proc else [])]
        rows = [measure_pairs(targets, n, pairs, pids) for n, pairs in sizes.items()]

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
                "baseline": "mitmdump + 3-line addon streaming text/event-stream", "database": "secantusdb",
                "steady_state_s": warmed_s, "first_event_gap_s": FIRST_EVENT_GAP_S,
                "ratio": "median of per-pair ratios (bare and addon back to back, the side going first "
                         "alternating); ratio of the medians beside it"}
    finally:
        for p in (addon, bare, mongo):
            if p is not None:
                p.stop()
        fake.stop()
