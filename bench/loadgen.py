"""Closed-loop HTTP/1.1 load generator (asyncio, one keep-alive connection per worker).

Run in its own process so its CPU is not the proxy's:

    python -m bench.loadgen --url http://127.0.0.1:PORT/chat/completions --concurrency 16 --duration 5 \
        --body '{"model": "gpt-5-mini", ...}' --header 'authorization: Bearer sk-x' --session-per-worker

prints one JSON object: requests, errors, statuses, rps, p50_ms, p90_ms, p99_ms, mean_ms.

With `--pair-url URL2 --pairs N` it measures a client's latency on two proxies instead: one client, one keep-alive
connection to each, N pairs of requests (URL, URL2) back to back, the side going first alternating. Slow drift of
the machine hits both requests of a pair alike, which two load runs one after the other cannot promise.
The same HTTP reader (`read_response`) is used in-process by the streaming benchmark for first-byte times.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit


class HTTPError(Exception):
    pass


def build_request(method: str, host: str, port: int, path: str, body: bytes,
                  headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}:{port}", "connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_response(reader: asyncio.StreamReader, on_body: Callable[[bytes], None] | None = None
                        ) -> tuple[int, dict[str, str], int, bool]:
    """Read one response. Returns (status, headers, body bytes, keep_alive). `on_body` sees each body piece."""
    line = await reader.readline()
    if not line:
        raise HTTPError("connection closed before a response")
    parts = line.split(None, 2)
    status = int(parts[1])
    headers: dict[str, str] = {}
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    n = 0
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                break
            data = await reader.readexactly(size + 2)
            n += size
            if on_body is not None:
                on_body(data[:-2])
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.read(min(left, 1 << 20))
            if not data:
                raise HTTPError("connection closed mid-body")
            left -= len(data)
            n += len(data)
            if on_body is not None:
                on_body(data)
    else:  # read to close
        while True:
            data = await reader.read(1 << 20)
            if not data:
                break
            n += len(data)
            if on_body is not None:
                on_body(data)
        return status, headers, n, False
    keep = headers.get("connection", "").lower() != "close"
    return status, headers, n, keep


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[k]


def summarize(latencies: list[float], seconds: float, errors: int, statuses: dict[int, int]) -> dict:
    lat = sorted(latencies)
    ms = [x * 1000 for x in lat]
    return {
        "requests": len(lat), "errors": errors, "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "seconds": round(seconds, 3), "rps": round(len(lat) / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": round(percentile(ms, 0.50), 3), "p90_ms": round(percentile(ms, 0.90), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
        "mean_ms": round(statistics.fmean(ms), 3) if ms else float("nan"),
    }


LATE_S = 30.0


async def run(url: str, concurrency: int, duration: float, warmup: float, body: bytes,
              headers: list[tuple[str, str]], session_per_worker: bool, method: str = "POST") -> dict:
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    path = u.path + (f"?{u.query}" if u.query else "")
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    completed = [0]  # every answered request, warm-up included (CPU per request divides by this)
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + duration

    async def worker(i: int) -> None:
        nonlocal errors
        hdrs = list(headers)
        if session_per_worker:
            hdrs.append(("x-litellm-session-id", f"bench-session-{i}"))
        req = build_request(method, host, port, path, body, hdrs)
        reader = writer = None
        while True:
            now = time.perf_counter()
            # A window that caught no answer at all (a tiny run on a loaded machine) stays open until one
            # lands, up to LATE_S past its end: a figure of zero requests would measure nothing.
            if now >= t_end and (latencies or now >= t_end + LATE_S):
                break
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                t0 = time.perf_counter()
                writer.write(req)
                status, _, _, keep = await read_response(reader)
                t1 = time.perf_counter()
                completed[0] += 1
                if t0 >= t_measure and (t1 <= t_end or not latencies):
                    latencies.append(t1 - t0)
                    statuses[status] = statuses.get(status, 0) + 1
                if not keep:
                    writer.close()
                    reader = writer = None
            except (OSError, HTTPError, asyncio.IncompleteReadError, ValueError):
                if time.perf_counter() >= t_measure:
                    errors += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.01)
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    out = summarize(latencies, max(duration, min(time.perf_counter(), t_end + LATE_S) - t_measure)
                    if len(latencies) <= 1 else duration, errors, statuses)
    out["requests_total"] = completed[0]
    return out


def paired_summary(first: list[float], second: list[float]) -> dict:
    """Two proxies' latencies (seconds) measured in pairs: each side's summary, the difference of their medians
    (`added_p50_ms`, what the second adds to a client's median) and the median of the per-pair differences."""
    if len(first) != len(second) or not first:
        raise ValueError("paired latencies need equally many pairs, at least one")
    diffs = sorted((b - a) * 1000 for a, b in zip(first, second, strict=True))
    q = statistics.quantiles(diffs, n=4, method="inclusive") if len(diffs) > 1 else [diffs[0]] * 3
    a, b = summarize(first, sum(first), 0, {}), summarize(second, sum(second), 0, {})
    return {"pairs": len(diffs), "first": a, "second": b,
            "added_p50_ms": round(statistics.median(second) * 1000 - statistics.median(first) * 1000, 3),
            "paired_diff_ms": {"median": round(q[1], 3), "p25": round(q[0], 3), "p75": round(q[2], 3)}}


async def run_paired(urls: tuple[str, str], pairs: int, warm: int, body: bytes, headers: list[tuple[str, str]],
                     method: str = "POST") -> dict:
    """`pairs` (after `warm` unmeasured) pairs of one request to each URL, back to back, the side going first
    alternating; every answer must be a 200 (a failed request has no latency to compare)."""
    conns = []
    for url in urls:
        u = urlsplit(url)
        host, port = u.hostname or "127.0.0.1", u.port or 80
        req = build_request(method, host, port, u.path + (f"?{u.query}" if u.query else ""), body,
                            [*headers, ("x-litellm-session-id", "bench-session-0")])
        reader, writer = await asyncio.open_connection(host, port)
        conns.append([req, reader, writer, host, port])
    lat: tuple[list[float], list[float]] = ([], [])
    try:
        for i in range(warm + pairs):
            for side in ((0, 1) if i % 2 == 0 else (1, 0)):
                req, reader, writer, host, port = conns[side]
                t0 = time.perf_counter()
                writer.write(req)
                status, _, _, keep = await read_response(reader)
                t1 = time.perf_counter()
                if status != 200:
                    raise HTTPError(f"{urls[side]} answered {status}")
                if not keep:
                    writer.close()
                    conns[side][1:3] = await asyncio.open_connection(host, port)
                if i >= warm:
                    lat[side].append(t1 - t0)
    finally:
        for c in conns:
            c[2].close()
    return paired_summary(*lat)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen")
    ap.add_argument("--url", required=True)
    ap.add_argument("--method", default="POST")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--body", default="")
    ap.add_argument("--body-file", help="the body, read from this file (bodies beyond the 128 KB an argument holds)")
    ap.add_argument("--header", action="append", default=[], help="'name: value' (repeatable)")
    ap.add_argument("--session-per-worker", action="store_true",
                    help="x-litellm-session-id per worker, so the addon spreads workers over keys")
    ap.add_argument("--pair-url", help="a second proxy: measure one client's latency on both, in pairs")
    ap.add_argument("--pairs", type=int, default=1000, help="with --pair-url: measured pairs")
    ap.add_argument("--warm-pairs", type=int, default=50, help="with --pair-url: unmeasured pairs first")
    a = ap.parse_args(argv)
    if a.body and a.body_file:
        ap.error("--body and --body-file are exclusive")
    try:
        body = Path(a.body_file).read_bytes() if a.body_file else a.body.encode()
    except OSError as e:
        ap.error(f"--body-file: {e}")
    headers = []
    for h in a.header:
        k, _, v = h.partition(":")
        headers.append((k.strip(), v.strip()))
    if a.pair_url:
        if a.pairs < 1 or a.warm_pairs < 0:
            ap.error("--pairs must be at least 1 and --warm-pairs at least 0")
        res = asyncio.run(run_paired((a.url, a.pair_url), a.pairs, a.warm_pairs, body, headers, a.method))
        sys.stdout.write(json.dumps(res) + "\n")
        return 0
    res = asyncio.run(run(a.url, a.concurrency, a.duration, a.warmup, body, headers,
                          a.session_per_worker, a.method))
    res["concurrency"] = a.concurrency
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
