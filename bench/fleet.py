"""Budget use in a simulated fleet (DESIGN §9, §7).

A fake upstream enforces each key's budget at request start the way LiteLLM does (admits while
spend < budget, so the last admitted request overshoots), lags its activity endpoint by 15 s and
answers budget errors as 400, 422 and 429 in turn. The addon (SecantusDB, spend checker on) holds
20 keys of $10 plus backups; 16 client threads (one conversation each, keep-alive) send a mix of
wire formats, models, sizes, streamed and buffered answers, with and without cache hits, each
request costing $0.02–$0.20. The run stops once 20 keys are retired. Reported per threshold: for each
retired key the fraction of its budget the upstream actually charged, and how many budget errors
reached a client (the target is zero: the addon must rotate and retry instead).

Scenarios (issue 17): one sidecar and three sidecars sharing the pool (each client talks to one of
them), against a fake answering as LiteLLM 1.80 or as 1.110 (spend after the request in
`x-litellm-key-spend` on JSON answers, 422 budget errors, budget reservation that refuses concurrent
requests on a nearly spent key as "busy"). Per 1,000 requests: upstream budget errors (busy refusals
included), retries (extra upstream requests) and retried streams (a stream retried reaches the client
whole). Run one with `python -m bench.fleet --sidecars 1,3 --versions 1.80.0,1.110.2`.
"""
from __future__ import annotations

import http.client
import json
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench.procs import AddonMitm, Fake, MongoServer, pool_keys, workdir
from tests.fake_upstream import DEFAULT_PRICES, is_anthropic_model

BUDGET_MARKERS = (b"budget_exceeded", b"ExceededBudget", b"Budget has been exceeded")

# (path, model, wire format)
MIX = [
    ("/chat/completions", "claude-sonnet-4-5-20250929", "chat"),
    ("/chat/completions", "gpt-5-2025-08-07", "chat"),
    ("/v1/chat/completions", "claude-haiku-4-5-20251001", "chat"),
    ("/v1/messages", "claude-sonnet-4-5-20250929", "messages"),
    ("/v1/messages", "claude-haiku-4-5-20251001", "messages"),
    ("/responses", "gpt-5-codex", "responses"),
    ("/v1/responses", "gpt-5-2025-08-07", "responses"),
]


def cost_of(model: str, u: dict[str, int]) -> float:
    """The fake upstream's own rule (tests.fake_upstream.FakeUpstream.cost_for)."""
    p_in, p_out, p_cw, p_cr = DEFAULT_PRICES[model]
    if is_anthropic_model(model):
        return (u["input"] * p_in + u["cache_write"] * p_cw + u["cache_read"] * p_cr + u["output"] * p_out) / 1e6
    return ((u["input"] + u["cache_write"]) * p_in + u["cache_read"] * p_cr + u["output"] * p_out) / 1e6


def sample_usage(rng: random.Random, model: str, lo: float, hi: float) -> dict[str, int]:
    """Token counts of a plausible agent turn scaled to cost U(lo, hi) dollars (prompt kept < 180k)."""
    target = rng.uniform(lo, hi)
    cache_hit = rng.random() < 0.6
    u = {"input": rng.randint(500, 8000),
         "cache_read": rng.randint(20_000, 120_000) if cache_hit else 0,
         "cache_write": rng.randint(1_000, 20_000) if rng.random() < 0.3 else 0,
         "output": rng.randint(100, 4000), "reasoning": 0}
    s = target / cost_of(model, u)
    u = {k: int(v * s) for k, v in u.items()}
    prompt = u["input"] + u["cache_read"] + u["cache_write"]
    if prompt > 180_000:
        f = 180_000 / prompt
        for k in ("input", "cache_read", "cache_write"):
            u[k] = int(u[k] * f)
        rest = target - cost_of(model, {**u, "output": 0})
        u["output"] = max(1, int(rest * 1e6 / DEFAULT_PRICES[model][1]))
    return u


class Client(threading.Thread):
    def __init__(self, i: int, port: int, stop: threading.Event, lo: float, hi: float, seed: int,
                 delay: float = 0.0) -> None:
        super().__init__(name=f"fleet-client-{i}", daemon=True)
        self.i, self.port, self.stop, self.lo, self.hi, self.delay = i, port, stop, lo, hi, delay
        self.rng = random.Random(seed * 1000 + i)
        self.counts = {"requests": 0, "ok": 0, "streamed": 0, "budget_errors_to_client": 0, "no_key_429": 0,
                       "other_errors": 0, "transport_errors": 0}
        self.client_cost = 0.0
        self.samples: list[str] = []
        self.latencies_ms: list[float] = []  # answered requests, wall time at the client

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.stop.is_set():
            path, model, fmt = self.rng.choice(MIX)
            stream = self.rng.random() < 0.5
            body: dict[str, Any] = {"model": model, "stream": stream, "max_tokens": 1024}
            if fmt == "responses":
                body["input"] = "Fix the failing test."
            else:
                body["messages"] = [{"role": "user", "content": "Fix the failing test. " * self.rng.randint(1, 50)}]
            if fmt == "chat" and stream and self.rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
            u = sample_usage(self.rng, model, self.lo, self.hi)
            headers = {"content-type": "application/json", "authorization": "Bearer sk-fleet-client",
                       "x-litellm-session-id": f"fleet-conversation-{self.i}", "x-fake-usage": json.dumps(u),
                       "x-fake-stream-events": str(self.rng.randint(3, 40))}
            if self.delay:  # a turn takes time upstream: requests overlap on a key as they do in real use
                headers["x-fake-event-delay"] = f"{self.delay * self.rng.uniform(0.5, 1.5):.4f}"
            self.counts["requests"] += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, json.dumps(body), headers)
                resp = conn.getresponse()
                data = resp.read()
                self.latencies_ms.append(1000 * (time.perf_counter() - t0))
            except (OSError, http.client.HTTPException):
                self.counts["transport_errors"] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                continue
            if resp.status == 200:
                self.counts["ok"] += 1
                self.counts["streamed"] += stream
                self.client_cost += cost_of(model, u)
            elif any(m in data for m in BUDGET_MARKERS):
                self.counts["budget_errors_to_client"] += 1
                self.samples.append(f"{resp.status} {data[:200]!r}")
            elif resp.status == 429:
                self.counts["no_key_429"] += 1
                time.sleep(0.2)
            else:
                self.counts["other_errors"] += 1
                if len(self.samples) < 5:
                    self.samples.append(f"{resp.status} {data[:200]!r}")
        conn.close()


def _stored_spend(uri: str, db: str) -> dict[str, float]:
    """Every key's spend as stored in MongoDB (the metered total every sidecar sees after a sync)."""
    import pymongo

    client: Any = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
    try:
        return {str(d["_id"]): float(d.get("spendEstimate") or 0.0)
                for d in client[db]["openhands_keys"].find({}, {"spendEstimate": 1})}
    finally:
        client.close()


def one_run(wd: Path, mongo: MongoServer, threshold: float, *, n_keys: int, n_backups: int, budget: float,
            clients: int, lo: float, hi: float, max_seconds: float, seed: int, sidecars: int = 1,
            version: str = "1.80.0", event_delay: float = 0.0) -> dict[str, Any]:
    tag = f"t{int(round(threshold * 100))}s{sidecars}v{version.split('.')[1]}"
    (wd / tag).mkdir(parents=True, exist_ok=True)
    fake = Fake(wd / tag, "--budget-status", "cycle", "--activity-lag", "15", "--budget-message", "cycle",
                "--send-key-spend-header")
    if version.startswith("1.110"):  # LiteLLM 1.110: spend-after header on JSON, 422 B2, budget reservation on
        fake.config(litellm_version=version, reservations=True)
    fleet: list[AddonMitm] = []
    sc = None
    try:
        keys = pool_keys(n_keys, f"{tag}k")
        backups = pool_keys(n_backups, f"{tag}b")
        for _, api_key in keys + backups:
            fake.add_key(api_key, budget)
        for n in range(sidecars):
            fleet.append(AddonMitm(wd / tag / f"addon{n}", fake.url, mongo.uri, f"fleet_{tag}", threshold=threshold,
                                   spend_checker=True, name=f"addon{n}").start())
        sc = fleet[0]
        checker_on = any(x.out.count(r"spend checker: on") > 0 for x in fleet)
        for key_id, api_key in keys:
            sc.add_key(key_id, api_key, budget=budget)
        for key_id, api_key in backups:
            sc.add_backup(key_id, api_key)
        time.sleep(2.5 if sidecars > 1 else 0)  # peers pick the keys up at their next sync
        stop = threading.Event()
        threads = [Client(i, fleet[i % sidecars].port, stop, lo, hi, seed, event_delay) for i in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        retired: list[str] = []
        timed_out = False
        while True:
            # Often: once the pool is nearly spent its last keys go fast, and what happens after the last
            # one (requests sent on spent keys as a last resort) is the end of the run, not its result.
            time.sleep(0.1)
            retired = [k for k, v in sc.keys().items() if v["status"] == "exhausted"]
            if len(retired) >= n_keys:
                break
            if time.monotonic() - t0 > max_seconds:
                timed_out = True
                break
        at_stop = fake.state()  # what happens after the last key is spent is the end of the run, not its result
        stop.set()
        for t in threads:
            t.join(90)
        elapsed = time.monotonic() - t0
        time.sleep(0.5)
        for x in fleet[1:]:  # every sidecar's write-behind lands before the meter is compared
            x.keys()
        time.sleep(1.0)
        state = fake.state()
        retry_lines = sum(x.out.count(r"\[OpenHands/Retry\]") for x in fleet)
        # budget errors the sidecars recovered from (a key was left to retry on); the rest came when the
        # pool had run dry, the run's end, and reached their client as a retryable 429
        budget_retries = sum(x.out.count(r"\[OpenHands/Retry\].* after (budget error|key busy)") for x in fleet)
        side = sc.keys()
        stored = _stored_spend(mongo.uri, f"fleet_{tag}")  # what the sidecars wrote (memory may hold a floor)
        by_api = {api: kid for kid, api in keys + backups}
        per_key = []
        for api_key, st in state["keys"].items():
            kid = by_api.get(api_key)
            if kid is None:
                continue
            sk = side.get(kid)
            per_key.append({"id": kid, "status": sk["status"] if sk else "unused backup",
                            "charged": round(st["spend"], 4), "budget": st["budget"],
                            "used_fraction": round(st["spend"] / st["budget"], 4),
                            "metered": round(sk["spendEstimate"], 4) if sk else None,
                            "stored": round(stored[kid], 4) if kid in stored else None,
                            "upstream_budget_errors": st["budget_errors"], "admitted": st["admitted"]})
        per_key.sort(key=lambda r: r["id"])
        retired_rows = [r for r in per_key if r["status"] == "exhausted"]
        fr = [r["used_fraction"] for r in retired_rows]
        counts: dict[str, int] = {}
        for t in threads:
            for k, v in t.counts.items():
                counts[k] = counts.get(k, 0) + v
        samples = [s for t in threads for s in t.samples][:5]
        lat = sorted(x for t in threads for x in t.latencies_ms)
        quantile = lambda q: round(lat[min(int(q * len(lat)), len(lat) - 1)], 1) if lat else None  # noqa: E731
        metering_err = [abs(r["metered"] - r["charged"]) for r in retired_rows if r["metered"] is not None]
        stored_err = [abs(r["stored"] - r["charged"]) for r in retired_rows if r["stored"] is not None]
        n_req = max(counts["requests"], 1)
        upstream_requests = sum(st["requests"] for st in state["keys"].values())
        per_1000 = lambda n: round(1000.0 * n / n_req, 2)  # noqa: E731
        return {
            "sidecars": sidecars, "litellm_version": version, "event_delay_s": event_delay,
            "upstream_budget_errors_per_1000": per_1000(at_stop["budget_errors_total"]),
            "upstream_budget_errors_at_stop": at_stop["budget_errors_total"],
            "recovered_budget_errors_per_1000": per_1000(budget_retries),
            "busy_refusals": state.get("busy_refusals", 0),
            "retries_per_1000": per_1000(retry_lines),  # the sidecars' own "↩️ [OpenHands/Retry]" lines
            "retry_log_lines": retry_lines, "upstream_requests": upstream_requests,
            "retried_streams_per_1000": per_1000(at_stop.get("refused_streams", 0)),
            "client_p50_ms": quantile(0.50), "client_p95_ms": quantile(0.95),
            "threshold": threshold, "keys": n_keys, "backups": n_backups, "budget": budget, "clients": clients,
            "spend_checker": checker_on, "seconds": round(elapsed, 1), "timed_out": timed_out,
            "retired": len(retired_rows),
            "used_min": round(min(fr), 4) if fr else None,
            "used_median": round(statistics.median(fr), 4) if fr else None,
            "used_max": round(max(fr), 4) if fr else None,
            "retired_at_or_above_99pct": sum(1 for f in fr if f >= 0.99),
            "budget_errors_to_client": counts["budget_errors_to_client"],
            "upstream_budget_errors": state["budget_errors_total"],
            "max_metering_error_usd": round(max(metering_err), 4) if metering_err else None,
            "max_stored_metering_error_usd": round(max(stored_err), 4) if stored_err else None,
            "client_counts": counts, "error_samples": samples, "per_key": per_key,
        }
    finally:
        for x in fleet:
            x.stop()
        fake.stop()


def run(quick: bool = False, tiny: bool = False, thresholds: tuple[float, ...] = (9.60, 9.80, 9.95),
        scenarios: tuple[tuple[int, str], ...] = ((3, "1.80.0"), (1, "1.110.2"), (3, "1.110.2")),
        event_delay: float = 0.0) -> dict[str, Any]:
    """Every threshold with one sidecar on 1.80, then the issue-17 scenarios at the default threshold."""
    wd = workdir("fleet")
    if tiny:
        size = dict(n_keys=2, n_backups=1, budget=1.0, clients=4, lo=0.02, hi=0.10, max_seconds=25)
        thresholds = thresholds[-1:]
    elif quick:
        size = dict(n_keys=5, n_backups=2, budget=10.0, clients=16, lo=0.02, hi=0.20, max_seconds=120)
    else:
        size = dict(n_keys=20, n_backups=4, budget=10.0, clients=16, lo=0.02, hi=0.20, max_seconds=420)
    mongo = MongoServer(wd / "secantus").start()
    try:
        runs = [one_run(wd, mongo, th, seed=7, event_delay=event_delay, **size) for th in thresholds]
        if not tiny:
            runs += [one_run(wd, mongo, thresholds[-1], seed=7, sidecars=n, version=v, event_delay=event_delay, **size)
                     for n, v in scenarios]
    finally:
        mongo.stop()
    return {"size": size, "runs": runs}


SUMMARY = ("sidecars", "litellm_version", "threshold", "seconds", "retired", "used_min", "used_median", "used_max",
           "budget_errors_to_client", "upstream_budget_errors", "busy_refusals", "upstream_budget_errors_per_1000",
           "recovered_budget_errors_per_1000",
           "retries_per_1000", "retried_streams_per_1000", "max_metering_error_usd", "max_stored_metering_error_usd",
           "client_p50_ms", "client_p95_ms",
           "timed_out")


def committed_snapshot(commit: str) -> Path:
    """The sidecars load addon/ and pricing/ as of `commit` (`git archive`), whatever the working tree holds."""
    import io
    import subprocess
    import tarfile
    import tempfile

    from bench import procs

    snap = Path(tempfile.mkdtemp(prefix="bench-addon-"))
    tar = subprocess.run(["git", "archive", "--format=tar", commit, "addon", "pricing"], cwd=procs.ROOT,
                         capture_output=True, check=True, timeout=60).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(snap, filter="data")
    procs._SNAPSHOT = snap
    return snap


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.fleet [--sidecars 1,3] [--versions 1.80.0,1.110.2] [--threshold 9.95] [--quick]`"""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description="fleet budget-use benchmark (issue 17)")
    ap.add_argument("--sidecars", default="1,3", help="comma-separated sidecar counts")
    ap.add_argument("--versions", default="1.80.0,1.110.2", help="comma-separated LiteLLM versions to fake")
    ap.add_argument("--threshold", type=float, default=9.95)
    ap.add_argument("--quick", action="store_true", help="5 keys instead of 20")
    ap.add_argument("--event-delay", type=float, default=0.0, help="seconds between SSE events upstream")
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--commit", default=None,
                    help="measure the addon as committed (e.g. HEAD), not the working tree others may be editing")
    a = ap.parse_args(argv)
    if a.commit:
        committed_snapshot(a.commit)
    size = dict(n_keys=5 if a.quick else 20, n_backups=2 if a.quick else 4, budget=10.0, clients=16, lo=0.02,
                hi=0.20, max_seconds=120 if a.quick else 420)
    wd = workdir("fleet")
    mongo = MongoServer(wd / "secantus").start()
    runs = []
    try:
        for v in [x.strip() for x in a.versions.split(",") if x.strip()]:
            for n in [int(x) for x in a.sidecars.split(",") if x.strip()]:
                r = one_run(wd, mongo, a.threshold, seed=7, sidecars=n, version=v, event_delay=a.event_delay, **size)
                runs.append(r)
                print(json.dumps({k: r.get(k) for k in SUMMARY}), flush=True)
    finally:
        mongo.stop()
    if a.out:
        Path(a.out).write_text(json.dumps({"size": size, "runs": runs}, indent=2) + "\n")
    from bench.report import _table, fleet_section, fleet_verdicts

    result = {"size": size, "runs": runs}
    verdicts = fleet_verdicts(result)
    print(fleet_section(result) + "\n\nTARGETS\n"
          + _table(["target", "value", "met"], [[v["target"], v["value"], v["met"]] for v in verdicts]))
    for r in runs:
        bad = [row for row in r["per_key"] if row["status"] == "exhausted" and row["used_fraction"] < 0.995]
        if bad:
            print(f"# {r['sidecars']} sidecar(s), {r['litellm_version']}: keys under 99.5 %: "
                  + ", ".join(f"{b['id']} {100 * b['used_fraction']:.2f}%" for b in bad), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
