"""Scale benchmark (issue 14): does the sidecar's cost follow activity rather than history?

Two pools on one SecantusDB, in one run: small = 20 keys / 100 bindings / 1 sidecar; large = 1,000 keys /
100,000 bindings / 3 sidecars (seeded straight into the database, bindings spread over the keys).

"The sync's database work" is compared per sync, which is fair across sidecar counts (three sidecars
sync three times as often as one, whatever the pool's size):
- `sync_db_ms`: database CPU per pass of the periodic sync (`lifecycle.sync_once`: delta read, cooled
  keys, binding heal), driven in this process against the seeded database, after the database's own
  idle CPU (TTL sweeps) is taken out; `sync_db_ops`: database requests per pass.
- `db_cpu_idle_per_sidecar`: with the real sidecars up and idle, the database's CPU above its own
  baseline, per sidecar (share of one core); `db_cpu_idle` is the raw total (it grows with the
  number of sidecars by design).
Then the same closed-loop load on the first sidecar (request median and p99, database CPU under
load) and the sidecars' RSS. Ratios large/small; the target is ≤ 1.1 for `p50` and `sync_db_ms`.

    .venv/bin/python -m bench.scale [--quick|--tiny]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from typing import Any

import pymongo

from bench.overhead import loadgen
from bench.procs import AddonMitm, Fake, MongoServer, cpu_seconds, rss, settle, workdir
from addon.lifecycle import sync_once
from addon.pool.pool import Pool
from addon.store.mongo import PoolStore, new_key_doc, utcnow
from addon.store.writer import StoreWriter

SIZES = {"full": {"small": (20, 100, 1), "large": (1000, 100_000, 3)},
         "quick": {"small": (20, 100, 1), "large": (1000, 100_000, 3)},
         "tiny": {"small": (5, 20, 1), "large": (50, 2_000, 2)}}


def seed(uri: str, db: str, fake: Fake, n_keys: int, n_bindings: int) -> list[str]:
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10_000, socketTimeoutMS=300_000)
    try:
        now = utcnow()
        idle = now - dt.timedelta(days=1)  # history: sessions that ended yesterday (within the 7-day TTL)
        keys = [(f"sc{i:05d}", f"sk-scale-{i:05d}-{'x' * 20}") for i in range(n_keys)]
        client[db].openhands_keys.insert_many([new_key_doc(k, a, 1000.0, now) for k, a in keys])
        for lo in range(0, n_bindings, 2000):
            client[db].openhands_bindings.insert_many([
                {"clientId": f"idle-client-{i}", "openhandsKeyId": keys[i % n_keys][0], "isActive": True,
                 "createdAt": idle, "updatedAt": idle} for i in range(lo, min(n_bindings, lo + 2000))])
        # A deployment that already runs this version has its indexes: build them before the sidecars
        # start (SecantusDB answers nothing while it builds one, which a start-up would take for an outage).
        store = PoolStore(uri, db, timeout_ms=600_000)
        store.ensure_indexes(30, 7)
        store.close()
        for _, api_key in keys:
            fake.add_key(api_key, 1000.0)
        return [k for k, _ in keys]
    finally:
        client.close()


def db_cpu(pid: int, seconds: float) -> float:
    """Share of one core the database used over `seconds`."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return round((cpu_seconds(pid) - before) / seconds, 4)


def _requests(client: pymongo.MongoClient) -> int:
    """Requests the server has answered so far (serverStatus), or -1 when it does not say."""
    try:
        status = client.admin.command("serverStatus")
    except pymongo.errors.PyMongoError:
        return -1
    ops = status.get("opcounters") or {}
    counted = sum(int(ops.get(k) or 0) for k in ("query", "getmore", "command", "insert", "update", "delete"))
    return counted or int((status.get("network") or {}).get("numRequests") or -1)


def per_sync(uri: str, db: str, mongo_pid: int, wd: Any, passes: int, baseline: float) -> dict[str, Any]:
    """The periodic sync's database work per pass, on a quiet database: one Pool in this process,
    started as a sidecar starts (one full read), then `passes` passes of `sync_once`."""
    store = PoolStore(uri, db, timeout_ms=60_000)
    writer = StoreWriter(store, wd / f"journal-{db}.jsonl")
    probe = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10_000)
    try:
        pool = Pool(store, writer, threshold=lambda: 9.95, default_budget=lambda: 10.0)
        pool.sync()
        sync_once(pool, heal_all=True)  # the first pass of a sidecar's loop
        ops0, cpu0, t0 = _requests(probe), cpu_seconds(mongo_pid), time.monotonic()
        for _ in range(passes):
            sync_once(pool)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(mongo_pid) - cpu0 - baseline * elapsed
        ops1 = _requests(probe)
        return {"sync_db_ms": round(max(cpu, 0.0) / passes * 1000, 3),
                "sync_wall_ms": round(elapsed / passes * 1000, 3),
                "sync_db_ops": round((ops1 - ops0 - 1) / passes, 2) if ops0 >= 0 and ops1 >= 0 else None,
                "passes": passes, "keys_in_memory": len(pool.keys), "bindings_in_memory": len(pool.bindings)}
    finally:
        writer.stop(flush_timeout=0.5)
        probe.close()
        store.close()


def pool_run(wd, fake: Fake, mongo: MongoServer, name: str, size: tuple[int, int, int], idle_s: float,
             duration: float, warmup: float, concurrency: int, passes: int) -> dict[str, Any]:
    n_keys, n_bindings, n_sidecars = size
    db = f"bench_scale_{name}"
    t0 = time.monotonic()
    seed(mongo.uri, db, fake, n_keys, n_bindings)
    seeded_s = time.monotonic() - t0
    settle([mongo.proc.pid], timeout=60)
    baseline = db_cpu(mongo.proc.pid, idle_s)  # the database alone: its own background work
    sync = per_sync(mongo.uri, db, mongo.proc.pid, wd, passes, baseline)
    sidecars = []
    try:
        t0 = time.monotonic()
        for i in range(n_sidecars):
            sidecars.append(AddonMitm(wd / f"{name}-{i}", fake.url, mongo.uri, db, name=f"{name}-{i}").start())
        start_s = time.monotonic() - t0
        pids = [mongo.proc.pid, *(s.pid for s in sidecars)]
        settle(pids, timeout=60)
        idle = db_cpu(mongo.proc.pid, idle_s)
        before = cpu_seconds(mongo.proc.pid)
        t0 = time.monotonic()
        body = json.dumps({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}).encode()
        load = loadgen(sidecars[0].port, concurrency, duration, warmup, body)
        load_db = round((cpu_seconds(mongo.proc.pid) - before) / (time.monotonic() - t0), 4)
        return {"keys": n_keys, "bindings": n_bindings, "sidecars": n_sidecars, "seed_s": round(seeded_s, 1),
                "startup_s": round(start_s, 2), **sync, "db_cpu_baseline": baseline, "db_cpu_idle": idle,
                "db_cpu_idle_per_sidecar": round(max(idle - baseline, 0.0) / n_sidecars, 4), "db_cpu_load": load_db,
                "p50_ms": load["p50_ms"], "p99_ms": load["p99_ms"], "rps": load["rps"],
                "statuses": load["statuses"], "requests": load["requests"],
                "sidecar_rss_mb": [round(rss(s.pid)["VmRSS"] / 2**20, 1) for s in sidecars]}
    finally:
        for s in sidecars:
            s.stop()


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    mode = "tiny" if tiny else "quick" if quick else "full"
    idle_s, duration, warmup = (1.0, 0.5, 0.2) if tiny else (6.0, 4.0, 1.0) if quick else (20.0, 10.0, 2.0)
    passes = 20 if tiny else 150 if quick else 400
    wd = workdir("scale")
    fake = Fake(wd)
    mongo = MongoServer(wd / "secantus").start()
    try:
        out: dict[str, Any] = {}
        for name in ("small", "large"):
            out[name] = pool_run(wd, fake, mongo, name, SIZES[mode][name], idle_s, duration, warmup, 8,
                                 passes)
            print(f"[bench scale] {name}: {json.dumps(out[name])}", file=sys.stderr)
        s, big = out["small"], out["large"]
        out["ratios"] = {"p50": _ratio(big["p50_ms"], s["p50_ms"]),
                         "sync_db_ms": _ratio(big["sync_db_ms"], s["sync_db_ms"]),
                         "sync_db_ops": _ratio(big["sync_db_ops"], s["sync_db_ops"]),
                         "db_cpu_idle_per_sidecar": _ratio(big["db_cpu_idle_per_sidecar"],
                                                           s["db_cpu_idle_per_sidecar"]),
                         "db_cpu_idle": _ratio(big["db_cpu_idle"], s["db_cpu_idle"]),
                         "db_cpu_load": _ratio(big["db_cpu_load"], s["db_cpu_load"])}
        out["idle_s"], out["duration_s"] = idle_s, duration
        return out
    finally:
        mongo.stop()
        fake.stop()


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    print(json.dumps(run(a.quick, a.tiny), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
