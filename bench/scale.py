"""Scale benchmark (issue 14): does the sidecar's cost follow activity rather than history?

Two pools on one SecantusDB, in one run: small = 20 keys / 100 bindings / 1 sidecar; large = 1,000 keys /
100,000 bindings / 3 sidecars (seeded straight into the database, bindings spread over the keys).

"The sync's database work" is compared per sync pass, which is fair across sidecar counts (three
sidecars sync three times as often as one, whatever the pool's size):
- `sync_db_ms`: database CPU per pass of the periodic sync (`lifecycle.sync_once`), measured on a
  quiet database with one Pool in this process per pool, in alternating rounds, the database's own
  idle CPU (TTL sweeps) taken out; the rarer steps (a full key read every 10 min, a heal of every
  retired key every 10 min) are amortized over the passes between them (`sync_db_ms_quiet_pass` is the
  pass alone). `sync_db_ops`: database requests per pass.
- `db_cpu_idle_per_sidecar`: with the real sidecars up and idle, what they add to the database's CPU,
  per sidecar (share of one core; 10 ms clock ticks make it coarse); `db_cpu_idle` is the pool's total
  (it grows with the number of sidecars by design).
Then closed-loop load on each pool's first sidecar, alternating between the pools for `rounds` rounds
(request median and p99, database CPU under load), and the sidecars' RSS. Ratios large/small; the
target is ≤ 1.1 for `p50` and `sync_db_ms`.

    .venv/bin/python -m bench.scale [--quick|--tiny]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
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


class SyncProbe:
    """One Pool in this process on a seeded database, started as a sidecar starts (one full read and
    the loop's first pass), for measuring the periodic sync's database work per pass."""

    def __init__(self, uri: str, db: str, mongo_pid: int, wd: Any) -> None:
        self.mongo_pid = mongo_pid
        self.store = PoolStore(uri, db, timeout_ms=60_000)
        self.writer = StoreWriter(self.store, wd / f"journal-probe-{db}")
        self.probe = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10_000)
        self.pool = Pool(self.store, self.writer, threshold=lambda: 9.95, default_budget=lambda: 10.0)
        self.pool.sync()
        sync_once(self.pool, heal_all=True)

    def measure(self, passes: int, baseline: float, step: Any) -> tuple[float, float, float | None]:
        """(database CPU ms, wall ms, database requests) per call of `step`, the database's own baseline
        CPU taken out."""
        ops0, cpu0, t0 = _requests(self.probe), cpu_seconds(self.mongo_pid), time.monotonic()
        for _ in range(passes):
            step()
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(self.mongo_pid) - cpu0 - baseline * elapsed
        ops1 = _requests(self.probe)
        ops = (ops1 - ops0 - 1) / passes if ops0 >= 0 and ops1 >= 0 else None
        return max(cpu, 0.0) / passes * 1000, elapsed / passes * 1000, ops

    def close(self) -> None:
        self.writer.stop(flush_timeout=0.5)
        self.probe.close()
        self.store.close()


def sync_work(probes: dict[str, SyncProbe], passes: int, rounds: int, baseline: float) -> dict[str, dict[str, Any]]:
    """Per pool, in alternating rounds (same minutes for both pools): the quiet pass, and the rarer
    steps amortized over the passes between them (a full key read every FULL_KEY_READ_EVERY_S, a heal
    of every retired key every HEAL_ALL_EVERY_S)."""
    from addon.lifecycle import HEAL_ALL_EVERY_S, SYNC_INTERVAL_S
    from addon.pool.pool import FULL_KEY_READ_EVERY_S

    raw: dict[str, dict[str, list[float]]] = {n: {"pass": [], "wall": [], "ops": [], "full": [], "heal": []}
                                              for n in probes}
    for _ in range(rounds):
        for name, p in probes.items():
            cpu, wall, ops = p.measure(passes, baseline, lambda p=p: sync_once(p.pool))
            raw[name]["pass"].append(cpu)
            raw[name]["wall"].append(wall)
            raw[name]["ops"].append(ops if ops is not None else -1.0)
            raw[name]["full"].append(p.measure(3, baseline, lambda p=p: p.pool.sync(full=True))[0])
            raw[name]["heal"].append(p.measure(3, baseline, lambda p=p: p.store.heal_bindings(None))[0])
    out: dict[str, dict[str, Any]] = {}
    for name, r in raw.items():
        quiet, full, heal = statistics.median(r["pass"]), statistics.median(r["full"]), statistics.median(r["heal"])
        amortized = (quiet + full / (FULL_KEY_READ_EVERY_S / SYNC_INTERVAL_S)
                     + heal / (HEAL_ALL_EVERY_S / SYNC_INTERVAL_S))
        ops = statistics.median(r["ops"])
        out[name] = {"sync_db_ms": round(amortized, 3), "sync_db_ms_quiet_pass": round(quiet, 3),
                     "sync_db_ms_rounds": [round(x, 3) for x in r["pass"]], "full_key_read_db_ms": round(full, 2),
                     "heal_all_db_ms": round(heal, 2), "sync_wall_ms": round(statistics.median(r["wall"]), 3),
                     "sync_db_ops": round(ops, 2) if ops >= 0 else None, "passes": passes * rounds,
                     "keys_in_memory": len(probes[name].pool.keys),
                     "bindings_in_memory": len(probes[name].pool.bindings)}
    return out


def start_sidecars(wd: Any, fake: Fake, mongo: MongoServer, name: str, n: int) -> tuple[list[AddonMitm], float]:
    t0 = time.monotonic()
    sidecars = [AddonMitm(wd / f"{name}-{i}", fake.url, mongo.uri, f"bench_scale_{name}", name=f"{name}-{i}").start()
                for i in range(n)]
    return sidecars, round(time.monotonic() - t0, 2)


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    mode = "tiny" if tiny else "quick" if quick else "full"
    idle_s, duration, warmup = (1.0, 0.5, 0.2) if tiny else (10.0, 3.0, 1.0) if quick else (30.0, 8.0, 2.0)
    passes, rounds = (10, 2) if tiny else (60, 3) if quick else (150, 5)
    wd = workdir("scale")
    fake = Fake(wd)
    mongo = MongoServer(wd / "secantus").start()
    sidecars: dict[str, list[AddonMitm]] = {}
    try:
        out: dict[str, Any] = {name: {} for name in ("small", "large")}
        for name, (n_keys, n_bindings, n_sidecars) in SIZES[mode].items():
            t0 = time.monotonic()
            seed(mongo.uri, f"bench_scale_{name}", fake, n_keys, n_bindings)
            out[name].update(keys=n_keys, bindings=n_bindings, sidecars=n_sidecars,
                             seed_s=round(time.monotonic() - t0, 1))
        settle([mongo.proc.pid], timeout=60)
        baseline = db_cpu(mongo.proc.pid, idle_s)  # the database alone: its own background work (TTL sweeps)
        probes = {name: SyncProbe(mongo.uri, f"bench_scale_{name}", mongo.proc.pid, wd) for name in out}
        try:
            work = sync_work(probes, passes, rounds, baseline)
        finally:
            for p in probes.values():
                p.close()
        below = baseline  # the small pool's sidecars keep running while the large one's start
        for name in out:
            sidecars[name], out[name]["startup_s"] = start_sidecars(wd, fake, mongo, name, out[name]["sidecars"])
            settle([mongo.proc.pid, *(s.pid for group in sidecars.values() for s in group)], timeout=120)
            idle = db_cpu(mongo.proc.pid, idle_s)
            mine = max(idle - below, 0.0)  # what this pool's idle sidecars add to the database
            out[name].update(work[name], db_cpu_baseline=baseline, db_cpu_idle=round(mine + baseline, 4),
                             db_cpu_idle_per_sidecar=round(mine / out[name]["sidecars"], 4))
            below = idle
        body = json.dumps({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}).encode()
        loads: dict[str, list[dict[str, Any]]] = {name: [] for name in out}
        for _ in range(rounds):  # alternating, so both pools see the same machine
            for name in out:
                sc = sidecars[name][0]
                before, own, t0 = cpu_seconds(mongo.proc.pid), cpu_seconds(sc.pid), time.monotonic()
                load = loadgen(sc.port, 8, duration, warmup, body)
                load["db_cpu"] = (cpu_seconds(mongo.proc.pid) - before) / (time.monotonic() - t0)
                # the sidecar's CPU per request (warm-up included): steadier than wall time on a busy machine
                load["cpu_ms"] = (cpu_seconds(sc.pid) - own) * 1000 / max(load["requests"], 1)
                loads[name].append(load)
        for name, runs in loads.items():
            statuses: dict[str, int] = {}
            for r in runs:
                for code, n in r["statuses"].items():
                    statuses[code] = statuses.get(code, 0) + n
            out[name].update(p50_ms=round(statistics.median(r["p50_ms"] for r in runs), 3),
                             p50_ms_rounds=[r["p50_ms"] for r in runs],
                             p50_ms_best=min(r["p50_ms"] for r in runs),  # the least disturbed round
                             p99_ms=round(statistics.median(r["p99_ms"] for r in runs), 3),
                             rps=round(statistics.median(r["rps"] for r in runs), 1),
                             db_cpu_load=round(statistics.median(r["db_cpu"] for r in runs), 4),
                             sidecar_cpu_ms_per_request=round(statistics.median(r["cpu_ms"] for r in runs), 3),
                             statuses=statuses, requests=sum(r["requests"] for r in runs),
                             sidecar_rss_mb=[round(rss(s.pid)["VmRSS"] / 2**20, 1) for s in sidecars[name]])
            print(f"[bench scale] {name}: {json.dumps(out[name])}", file=sys.stderr)
        s, big = out["small"], out["large"]
        out["ratios"] = {"p50": _ratio(big["p50_ms"], s["p50_ms"]),
                         "p50_best": _ratio(big["p50_ms_best"], s["p50_ms_best"]),
                         "sidecar_cpu_per_request": _ratio(big["sidecar_cpu_ms_per_request"],
                                                           s["sidecar_cpu_ms_per_request"]),
                         "sync_db_ms": _ratio(big["sync_db_ms"], s["sync_db_ms"]),
                         "sync_db_ms_quiet_pass": _ratio(big["sync_db_ms_quiet_pass"], s["sync_db_ms_quiet_pass"]),
                         "sync_db_ops": _ratio(big["sync_db_ops"], s["sync_db_ops"]),
                         "db_cpu_idle_per_sidecar": _ratio(big["db_cpu_idle_per_sidecar"],
                                                           s["db_cpu_idle_per_sidecar"]),
                         "db_cpu_idle": _ratio(big["db_cpu_idle"], s["db_cpu_idle"]),
                         "db_cpu_load": _ratio(big["db_cpu_load"], s["db_cpu_load"])}
        out["idle_s"], out["duration_s"], out["rounds"] = idle_s, duration, rounds
        return out
    finally:
        for group in sidecars.values():
            for sc in group:
                sc.stop()
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
