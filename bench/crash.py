"""Crash benchmark (issue 14): kill -9 the sidecar at a random point under load, with and without a
MongoDB outage, restart it on the same data directory and database, and count the dollars of
*answered* spend that never reached `spendEstimate`.

answered = sum of `x-litellm-response-cost` of every 200 a client received (the upstream charged exactly
that); stored = sum of `spendEstimate` over the keys after the restart has replayed its journal; lost =
answered − stored (in-flight requests at the kill were charged upstream but never answered: they are
reported apart, as `upstream_only`). Then it is stopped and started again with the spend checker on (tick
1 s): the run also reports how long after that start every key's effective spend (max of `spendEstimate` and the polled
`totalSpend`) covers what the upstream charged, in-flight requests included (`in_flight_recovered_s`),
and what was still missing then. `before` runs the same scenario on the code before the write-ahead
journal (a git tree, `--before`), so one run shows both.

    .venv/bin/python -m bench.crash [--tiny] [--before 7a5d64d]
"""
from __future__ import annotations

import argparse
import io
import json
import random
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pymongo
import requests

from bench.procs import AddonMitm, Fake, MongoServer, ROOT, pool_keys, workdir
from tests.harness import stop_process

CHAT = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}
BEFORE_JOURNAL = "7a5d64d"  # the last commit before the write-ahead journal
CHECKER = {"OPENHANDS_SPEND_CHECK_TICK_SECONDS": "1"}  # the restarted sidecar polls the upstream


def tree_of(commit: str) -> Path:
    """`addon/` and `pricing/` of an older commit, for the `before` column (the working tree is untouched)."""
    out = Path(tempfile.mkdtemp(prefix=f"bench-tree-{commit}-"))
    data = subprocess.run(["git", "archive", commit, "addon", "pricing"], cwd=ROOT, capture_output=True,
                          check=True, timeout=60).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(out, filter="data")
    return out


class TreeSidecar(AddonMitm):
    """The addon loaded from a given tree (the current snapshot, or an older commit's)."""

    def __init__(self, tree: Path | None, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.tree = tree

    def command(self) -> list[str]:
        cmd = super().command()
        if self.tree is not None:
            i = next(i for i, c in enumerate(cmd) if c.endswith("openhands.py"))
            cmd[i] = str(self.tree / "addon" / "openhands.py")
        return cmd


class Load:
    """Client threads sending chat requests until stopped; records the cost of every answered request."""

    def __init__(self, url: str, workers: int) -> None:
        self.url = url
        self.answered: list[float] = []
        self.failed = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(workers)]

    def start(self) -> "Load":
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def _worker(self, i: int) -> None:
        s = requests.Session()
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                r = s.post(self.url + "/chat/completions", json=CHAT, timeout=10,
                           headers={"x-litellm-session-id": f"crash-{i}-{n % 3}"})
            except requests.RequestException:
                with self.lock:
                    self.failed += 1
                time.sleep(0.05)
                continue
            if r.status_code == 200 and "x-litellm-response-cost" in r.headers:
                with self.lock:
                    self.answered.append(float(r.headers["x-litellm-response-cost"]))

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)


def stored_spend(uri: str, db: str) -> float:
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
    try:
        return sum(float(d.get("spendEstimate", 0.0)) for d in client[db].openhands_keys.find({}, {"spendEstimate": 1}))
    finally:
        client.close()


def effective_spend(uri: str, db: str) -> float:
    """Sum over the keys of max(spendEstimate, totalSpend): what the pool believes was spent."""
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
    try:
        return sum(max(float(d.get("spendEstimate") or 0.0), float(d.get("totalSpend") or 0.0))
                   for d in client[db].openhands_keys.find({}, {"spendEstimate": 1, "totalSpend": 1}))
    finally:
        client.close()


def wait_effective(uri: str, db: str, target: float, timeout: float) -> tuple[float, float | None]:
    """(effective spend, seconds until it reached `target` or None)."""
    t0, deadline = time.monotonic(), time.monotonic() + timeout
    got = effective_spend(uri, db)
    while got + 1e-9 < target and time.monotonic() < deadline:
        time.sleep(0.2)
        got = effective_spend(uri, db)
    return got, (round(time.monotonic() - t0, 2) if got + 1e-9 >= target else None)


def wait_stored(uri: str, db: str, target: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    got = stored_spend(uri, db)
    while got + 1e-9 < target and time.monotonic() < deadline:
        time.sleep(0.2)
        got = stored_spend(uri, db)
    return got


def scenario(tree: Path | None, label: str, outage: bool, seconds: float, workers: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    wd = workdir(f"crash-{label}-{'outage' if outage else 'up'}")
    fake = Fake(wd)
    mongo = MongoServer(wd / "secantus").start()
    db = "bench_crash"
    env = {"OPENHANDS_DATA_DIR": str(wd / "data")}
    sidecars: list[TreeSidecar] = []
    try:
        keys = pool_keys(4, "crash")
        for _, api_key in keys:
            fake.add_key(api_key, 1000.0)
        sc = TreeSidecar(tree, wd / "sc1", fake.url, mongo.uri, db, env=env, name="sc1").start()
        sidecars.append(sc)
        for key_id, api_key in keys:
            sc.add_key(key_id, api_key, budget=1000.0)
        load = Load(sc.url, workers).start()
        kill_at = seconds * rng.uniform(0.5, 1.0)
        if outage:  # the database goes away first; the kill lands in the middle of the outage
            time.sleep(seconds * rng.uniform(0.2, 0.4))
            mongo.stop()
        time.sleep(max(0.0, kill_at - (time.monotonic() - load.t0)))
        assert sc.proc is not None
        stop_process(sc.proc, signal.SIGKILL)
        sc.proc = None
        load.join()
        answered = round(sum(load.answered), 6)
        charged = round(sum(k["spend"] for k in fake.state()["keys"].values()), 6)
        if outage:
            mongo.restart()
        sc2 = TreeSidecar(tree, wd / "sc1", fake.url, mongo.uri, db, env=env, name="sc2").start()
        sidecars.append(sc2)
        stored = round(wait_stored(mongo.uri, db, answered, timeout=15.0), 6)  # replayed, nothing polled
        sc2.stop()
        sc3 = TreeSidecar(tree, wd / "sc1", fake.url, mongo.uri, db, env={**env, **CHECKER}, spend_checker=True,
                          name="sc3").start()
        sidecars.append(sc3)
        effective, recovered_s = wait_effective(mongo.uri, db, charged, timeout=15.0)
        return {"outage": outage, "answered_requests": len(load.answered), "answered_usd": answered,
                "upstream_charged_usd": charged, "stored_usd": stored,
                "lost_answered_usd": round(max(0.0, answered - stored), 6),
                "upstream_only_usd": round(max(0.0, charged - answered), 6),
                "in_flight_recovered_s": recovered_s,
                "in_flight_unrecovered_usd": round(max(0.0, charged - effective), 6),
                "kill_after_s": round(kill_at, 2)}
    finally:
        for s in sidecars:
            s.stop()
        mongo.stop()
        fake.stop()


def run(quick: bool = False, tiny: bool = False, before: str | None = BEFORE_JOURNAL, seed: int | None = None
        ) -> dict[str, Any]:
    seconds, workers = (1.5, 2) if tiny else (3.0, 6) if quick else (6.0, 8)
    seed = seed if seed is not None else random.randrange(1 << 30)
    sides: list[tuple[str, Path | None]] = [("after", None)]
    if before and not tiny:
        sides.insert(0, ("before", tree_of(before)))
    rows = []
    for label, tree in sides:
        for outage in (False, True):
            row = scenario(tree, label, outage, seconds, workers, seed)
            row["code"] = label if label == "after" else f"before ({before})"
            rows.append(row)
            print(f"[bench crash] {label:6} outage={outage!s:5} answered ${row['answered_usd']:.4f} "
                  f"stored ${row['stored_usd']:.4f} lost ${row['lost_answered_usd']:.4f} in flight "
                  f"${row['upstream_only_usd']:.4f} recovered in {row['in_flight_recovered_s']}s", file=sys.stderr)
    return {"seed": seed, "seconds": seconds, "workers": workers, "rows": rows,
            "lost_answered_usd_max_after": max(r["lost_answered_usd"] for r in rows if r["code"] == "after")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.crash")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--before", default=BEFORE_JOURNAL, help="commit for the 'before' column ('' for none)")
    ap.add_argument("--seed", type=int)
    a = ap.parse_args(argv)
    print(json.dumps(run(a.quick, a.tiny, a.before or None, a.seed), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
