"""Overhead: bare `mitmdump --mode reverse:<fake>` vs `mitmdump -s addon/openhands.py` (embedded database,
20 keys), same fake upstream, same run. Requests/s, median and p99 latency, and their ratios.

The load generator (`bench.loadgen`) runs in its own process, closed loop, one keep-alive connection
per worker; targets are measured in turn (bare, addon, bare, addon, …) so drift hits both alike.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.procs import ROOT, AddonMitm, BareMitm, Fake, MongoServer, pool_keys, settle, workdir

CLIENT_KEY = "sk-bench-client-0000000000000000"
MODEL = "gpt-5-mini-2025-08-07"
JSON_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
SSE_BODY = {**JSON_BODY, "stream": True}


def payloads() -> dict[str, bytes]:
    return {"json": json.dumps(JSON_BODY).encode(), "sse": json.dumps(SSE_BODY).encode()}


def loadgen(port: int, concurrency: int, duration: float, warmup: float, body: bytes,
            path: str = "/chat/completions") -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.loadgen", "--url", f"http://127.0.0.1:{port}{path}",
           "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(warmup),
           "--body", body.decode(), "--header", f"authorization: Bearer {CLIENT_KEY}",
           "--header", "content-type: application/json", "--session-per-worker"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=duration + warmup + 120)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(targets: dict[str, int], baseline: str, cases: list[tuple[str, int]], duration: float,
            warmup: float, rounds: int = 1, pids: list[int] | None = None) -> list[dict[str, Any]]:
    """For each (payload, concurrency): every target measured `rounds` times, interleaved; best round kept
    per target (the least disturbed by the other processes on the box); ratios against `baseline`.

    With `pids` (every process of the run), each measurement waits until they are idle again and
    records that wait as `drain_s`: for the addon, the time its write-behind queue needs to reach
    the database after the load stops."""
    bodies = payloads()
    rows = []
    for kind, conc in cases:
        best: dict[str, dict] = {}
        for _ in range(rounds):
            for label, port in targets.items():
                if pids:
                    settle(pids)
                r = loadgen(port, conc, duration, warmup, bodies[kind])
                if pids:
                    r["drain_s"] = settle(pids)
                if label not in best or r["rps"] > best[label]["rps"]:
                    best[label] = r
        base = best[baseline]
        row: dict[str, Any] = {"payload": kind, "concurrency": conc}
        for label, r in best.items():
            row[label] = r
            if label != baseline:
                row[f"{label}_throughput_ratio"] = round(r["rps"] / base["rps"], 3) if base["rps"] else None
                row[f"{label}_added_p50_ms"] = round(r["p50_ms"] - base["p50_ms"], 3)
                row[f"{label}_added_p99_ms"] = round(r["p99_ms"] - base["p99_ms"], 3)
        rows.append(row)
    return rows


def setup_fake_and_keys(wd: Path, n_keys: int) -> tuple[Fake, list[tuple[str, str]]]:
    # Cheap requests and huge budgets: no rotation during an overhead run.
    fake = Fake(wd, "--cost-per-request", "0.0001", "--stream-events", "10")
    fake.add_key(CLIENT_KEY, 1e12)
    keys = pool_keys(n_keys)
    for _, api_key in keys:
        fake.add_key(api_key, 1e12)
    return fake, keys


def add_keys(sc: AddonMitm, keys: list[tuple[str, str]]) -> None:
    for key_id, api_key in keys:
        sc.add_key(key_id, api_key, budget=1e6)


def run(quick: bool = False, tiny: bool = False, database: str = "embedded") -> dict[str, Any]:
    wd = workdir("overhead")
    duration, warmup, rounds = (0.3, 0.1, 1) if tiny else (2.0, 0.5, 1) if quick else (6.0, 1.0, 2)
    concs = [1] if tiny else [1, 16, 64]
    cases = [("json", c) for c in concs] + [("sse", 16 if not tiny else 2)]
    fake, keys = setup_fake_and_keys(wd, 3 if tiny else 20)
    bare = addon = mongo = None
    try:
        bare = BareMitm(wd / "bare", fake.url)
        if database == "embedded":
            addon = AddonMitm(wd / "addon", fake.url).start()
        else:  # a SecantusDB we start: the same server the embedded mode runs as a child process
            mongo = MongoServer(wd / "secantus").start()
            addon = AddonMitm(wd / "addon", fake.url, mongo.uri, "bench_overhead").start()
        add_keys(addon, keys)
        pids = [fake.proc.pid, bare.pid, addon.pid] + ([mongo.proc.pid] if mongo and mongo.proc else [])
        rows = compare({"bare": bare.port, "addon": addon.port}, "bare", cases, duration, warmup, rounds, pids)
        return {"duration_s": duration, "warmup_s": warmup, "rounds": rounds, "keys": len(keys),
                "database": database, "rows": rows}
    finally:
        for p in (addon, bare, mongo):
            if p is not None:
                p.stop()
        fake.stop()
