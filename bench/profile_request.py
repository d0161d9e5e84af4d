"""Profile of one addon request path, in process (cProfile).

The real addons (`addon.openhands.default_addons`) are loaded into mitmproxy's test master
(`mitmproxy.test.taddons`) on a SecantusDB with 20 keys; each iteration drives one pooled flow through
the hooks mitmproxy would call — `request`, `responseheaders`, then either the SSE tap over a
10-event stream or a buffered JSON body, and `response` — without sockets, so the numbers are the
addon's own cost per request. Reports wall µs per request of the hooks on the event loop and process
CPU µs per request (all threads: the store writer's pymongo work included), both unprofiled, and the
top functions by own time. On Python 3.12 cProfile sees every thread (it is built on sys.monitoring),
so the writer thread's MongoDB calls appear in the profile next to the hooks.
"""
from __future__ import annotations

import cProfile
import inspect
import io
import json
import os
import pstats
import sys
import time
from typing import Any

from bench.bytecode import Footprint
from bench.overhead import agent_body
from bench.procs import MongoServer, addon_snapshot, pool_keys, workdir

UPSTREAM = "http://127.0.0.1:9"  # never contacted: responses are made in process
FLOW_BATCH = 50  # flows alive at once, about what a busy sidecar has in flight


ANSWER_REPLY_BYTES = 20_000  # an agent's answer that edits a file: the reply holds the new code


def agent_reply(size: int = ANSWER_REPLY_BYTES) -> str:
    """A reply of `size` characters that reads like a code edit (mostly ASCII, a few non-ASCII characters)."""
    line = "    total = sum(x * 2 for x in values if x)  # r\u00e9sum\u00e9 \u2713\n"
    return (line * (size // len(line) + 1))[:size]


def _chat_json(reply: str = "Hello.") -> bytes:
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-5-mini-2025-08-07",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": reply}}],
                       "usage": {"prompt_tokens": 31500, "completion_tokens": 300, "total_tokens": 31800,
                                 "prompt_tokens_details": {"cached_tokens": 30000}}},
                      ensure_ascii=False).encode()  # (UTF-8 as sent, not \u escapes: FastAPI's JSON answers)


def _chat_sse_chunks(n: int = 10) -> list[bytes]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-5-mini-2025-08-07"}
    out = [b"data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"content": f"word{i} "}}]}).encode()
           + b"\n\n" for i in range(n)]
    out.append(b"data: "
               + json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode()
               + b"\n\n")
    out.append(b"data: " + json.dumps({**base, "choices": [], "usage": {
        "prompt_tokens": 31500, "completion_tokens": 300, "total_tokens": 31800,
        "prompt_tokens_details": {"cached_tokens": 30000}}}).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    iters = 30 if tiny else 500 if quick else 2000
    wd = workdir("profile")
    snap = addon_snapshot()
    sys.path.insert(0, str(snap))
    os.environ["OPENHANDS_DATA_DIR"] = str(wd / "data")
    from mitmproxy import http
    from mitmproxy.test import taddons, tflow

    from addon.openhands import default_addons
    from addon.services import Services

    commands = _command_counter()
    from pymongo import monitoring
    monitoring.register(commands)  # clients created from here on report every command they send
    mongo = MongoServer(wd / "secantus").start()
    sc = Services()
    addons = default_addons(sc)
    lifecycle = addons[0]
    hooked = {name: [getattr(a, name) for a in addons if hasattr(a, name)]
              for name in ("request", "responseheaders", "response")}
    try:
        with taddons.context(*addons) as tctx:
            tctx.configure(lifecycle, openhands_upstream=UPSTREAM, openhands_mongodb_uri=mongo.uri,
                           openhands_mongodb_db="bench_profile", openhands_spend_checker=False,
                           openhands_data_dir=str(wd / "data"))
            lifecycle.running()
            sc.ready.wait(60)
            if sc.failed:
                raise RuntimeError(sc.failed)
            for key_id, api_key in pool_keys(20):
                sc.pool.add_key(key_id, api_key, 1e6)
            sc.pool.sync()
            loop = tctx.master.event_loop
            json_body, sse = _chat_json(), _chat_sse_chunks()
            req_json = json.dumps({"model": "gpt-5-mini-2025-08-07",
                                   "messages": [{"role": "user", "content": "hi"}]}).encode()
            req_sse = json.dumps({"model": "gpt-5-mini-2025-08-07", "stream": True,
                                  "messages": [{"role": "user", "content": "hi"}]}).encode()

            req_agent = agent_body()  # an agent's turn: its whole conversation in the request (bench.overhead)
            request_body: bytes | None = None  # set: every JSON request of a batch carries this body instead
            answer_agent = _chat_json(agent_reply())  # an agent's answer: a file's new code in the reply
            answer_body: bytes | None = None  # set: every JSON answer of a batch carries this body instead

            def make(i: int, stream: bool):
                f = tflow.tflow()
                f.request = http.Request.make(
                    "POST", UPSTREAM + "/chat/completions",
                    req_sse if stream else request_body if request_body is not None else req_json,
                    {"content-type": "application/json", "authorization": "Bearer sk-client",
                     "x-litellm-session-id": f"profile-{i % 16}"})
                resp = (http.Response.make(200, b"", {"content-type": "text/event-stream"}) if stream else
                        http.Response.make(200, answer_body or json_body, {"content-type": "application/json",
                                                            "x-litellm-response-cost": "0.0017"}))
                return f, resp

            phases: dict[str, float] = {"request": 0.0, "responseheaders": 0.0, "stream": 0.0, "response": 0.0}
            clock = time.thread_time  # per-hook-group split; a no-op clock while cProfile runs

            async def one(f, resp, stream: bool) -> None:
                t = clock()
                for hook in hooked["request"]:  # every addon's hook, in order, as mitmproxy calls them
                    if (result := hook(f)) is not None and inspect.isawaitable(result):  # as mitmproxy does
                        await result
                t1 = clock()
                phases["request"] += t1 - t
                assert f.response is None, f.response and f.response.get_text()
                f.response = resp
                for hook in hooked["responseheaders"]:
                    hook(f)
                t2 = clock()
                phases["responseheaders"] += t2 - t1
                if stream:
                    tap = f.response.stream
                    assert callable(tap), "the addon did not stream a 200 text/event-stream answer"
                    for chunk in sse:
                        tap(chunk)
                    tap(b"")
                t3 = clock()
                phases["stream"] += t3 - t2
                for hook in hooked["response"]:
                    if (result := hook(f)) is not None and inspect.isawaitable(result):  # as mitmproxy does
                        await result
                phases["response"] += clock() - t3
                assert f.metadata.get("openhands", {}).get("metered"), f.metadata

            def phase_split(n: int) -> dict[str, float]:
                """Loop-thread CPU µs per request in each hook group since the last call."""
                out = {k: round(v / n * 1e6, 1) for k, v in phases.items()}
                for k in phases:
                    phases[k] = 0.0
                return out

            async def batch(n: int, stream: bool, prof: cProfile.Profile | None = None) -> tuple[float, float, float]:
                """(wall, process CPU, loop-thread CPU) µs per request. Flows are built FLOW_BATCH at a time and
                dropped when done: a real mitmdump holds only the flows in flight, and 2000 finished flows held
                alive would bill the collector's scans of them to the addon."""
                wall = cpu = hook = 0.0
                done = 0
                c_all = time.process_time()
                while done < n:
                    h_make = time.thread_time()
                    flows = [make(done + i, stream) for i in range(min(FLOW_BATCH, n - done))]
                    cpu -= time.thread_time() - h_make  # test-flow construction is not the addon's cost
                    t0, h0 = time.perf_counter(), time.thread_time()
                    if prof is not None:
                        prof.enable()
                    for f, resp in flows:
                        await one(f, resp, stream)
                    if prof is not None:
                        prof.disable()
                    wall += time.perf_counter() - t0
                    hook += time.thread_time() - h0
                    done += len(flows)
                    del flows
                cpu += time.process_time() - c_all
                return wall / n * 1e6, cpu / n * 1e6, hook / n * 1e6

            loop.run_until_complete(batch(min(iters, 100), False))  # warm up
            loop.run_until_complete(batch(min(iters, 100), True))
            alone_after = _steady(sc.pool)
            phase_split(1)
            sc.writer.flush(30)
            commands.counts.clear()
            commands.on = True
            us_json, cpu_json, hook_json = loop.run_until_complete(batch(iters, False))
            split_json = phase_split(iters)
            sc.writer.flush(30)
            commands.on = False
            db_json = commands.per_1k(iters)
            us_sse, cpu_sse, hook_sse = loop.run_until_complete(batch(iters, True))
            split_sse = phase_split(iters)
            sc.writer.flush(30)
            # The extra cost of a longer stream: the same request with 110 events against 10, in alternating
            # batches (the host's speed drifts between two long runs by more than the difference).
            sse10, sse110 = sse, _chat_sse_chunks(110)
            per_batch, n_pairs = min(FLOW_BATCH, iters), max(1, iters // FLOW_BATCH)
            hook_sse10 = hook_sse110 = 0.0
            for _ in range(n_pairs):
                sse = sse10
                hook_sse10 += loop.run_until_complete(batch(per_batch, True))[2] / n_pairs
                sse = sse110
                hook_sse110 += loop.run_until_complete(batch(per_batch, True))[2] / n_pairs
            sc.writer.flush(30)
            sse = sse10
            # The same JSON request with an agent-sized body (161 KB): what reading the request costs at that size.
            phase_split(1)
            request_body = req_agent
            n_agent = max(1, min(iters, 200))
            hook_agent = loop.run_until_complete(batch(n_agent, False))[2]
            split_agent = phase_split(n_agent)
            request_body = None
            sc.writer.flush(30)
            # The same JSON request answered with an agent-sized reply (20 KB): what reading the answer costs.
            answer_body = answer_agent
            hook_answer = loop.run_until_complete(batch(n_agent, False))[2]
            split_answer = phase_split(n_agent)
            answer_body = None
            sc.writer.flush(30)
            # The addon's bytecode the usual requests run (bench.bytecode): a JSON and a streamed batch.
            with Footprint(("/addon/", "/pricing/")) as fp_json:
                loop.run_until_complete(batch(20, False))
            with Footprint(("/addon/", "/pricing/")) as fp_sse:
                loop.run_until_complete(batch(20, True))
            sc.writer.flush(30)
            clock = float  # float() is 0.0: no timing calls inside the profile
            prof = cProfile.Profile()
            loop.run_until_complete(batch(iters, False, prof))
            loop.run_until_complete(batch(iters, True, prof))
            sc.writer.flush(30)
            lifecycle.done()
    finally:
        mongo.stop()
        if str(snap) in sys.path:
            sys.path.remove(str(snap))

    st = pstats.Stats(prof)
    total_calls = 2 * iters
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": func, "where": f"{_short(filename)}:{line}",
                     "calls_per_request": round(nc / total_calls, 2),
                     "own_us_per_request": round(tt / total_calls * 1e6, 2),
                     "cum_us_per_request": round(ct / total_calls * 1e6, 2)})
    by_own = sorted(rows, key=lambda r: r["own_us_per_request"], reverse=True)[:15]
    addon_cum = sorted((r for r in rows if r["where"].startswith(("addon/", "pricing/"))),
                       key=lambda r: r["cum_us_per_request"], reverse=True)[:15]
    addon_own = sorted((r for r in rows if r["where"].startswith(("addon/", "pricing/"))),
                       key=lambda r: r["own_us_per_request"], reverse=True)[:15]
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    (wd / "profile.txt").write_text(text.getvalue())
    prof.dump_stats(str(wd / "profile.prof"))  # the whole profile, for callers/callees (pstats, snakeviz)
    return {"iterations": iters, "steady_after_s": alone_after,
            "us_per_request_json": round(us_json, 1), "us_per_request_sse": round(us_sse, 1),
            "cpu_us_per_request_json": round(cpu_json, 1), "cpu_us_per_request_sse": round(cpu_sse, 1),
            "hook_cpu_us_json": round(hook_json, 1), "hook_cpu_us_sse": round(hook_sse, 1),
            "hook_cpu_us_sse_110": round(hook_sse110, 1), "hook_cpu_us_sse_10_paired": round(hook_sse10, 1),
            "hook_cpu_split_json": split_json, "hook_cpu_split_sse": split_sse,
            "hook_cpu_us_json_agent_body": round(hook_agent, 1), "hook_cpu_split_json_agent_body": split_agent,
            "agent_body_bytes": len(req_agent),
            "hook_cpu_us_json_agent_answer": round(hook_answer, 1), "hook_cpu_split_json_agent_answer": split_answer,
            "agent_answer_bytes": len(answer_agent),
            "db_commands_per_1k_json": db_json,
            "bytecode_json": fp_json.summary(), "bytecode_sse": fp_sse.summary(),
            "hook_cpu_us_per_extra_event": round((hook_sse110 - hook_sse10) / 100, 2),
            "top_own_time": by_own, "top_addon_cumulative": addon_cum,
            "top_addon_own": addon_own, "pstats_text": str(wd / "profile.txt")}


def _steady(pool: Any, limit_s: float = 60.0) -> float:
    """Seconds until the pool runs as it does after its first seconds: reservations shared and no peer
    seen. For PEER_GRACE_S after its first reservation a sidecar assumes peers it cannot see yet and takes
    the general key choice on every request; measuring then would time a start-up state, not a request."""
    t0 = time.monotonic()
    while pool.reservation_sharer is None or pool.peer_loads:
        if time.monotonic() - t0 > limit_s:
            raise RuntimeError(f"the pool still assumes peers after {limit_s:.0f} s: {sorted(pool.peer_loads)}")
        time.sleep(0.05)
    return round(time.monotonic() - t0, 1)


def _command_counter() -> Any:
    from pymongo import monitoring

    class CommandCounter(_CommandCounter, monitoring.CommandListener):
        pass
    return CommandCounter()


class _CommandCounter:
    """pymongo command listener: database commands (and the statements inside bulk writes) by collection."""

    def __init__(self) -> None:
        self.on = False
        self.counts: dict[str, int] = {}

    def started(self, event: Any) -> None:
        if not self.on or event.command_name in ("hello", "ismaster", "isMaster", "ping", "endSessions"):
            return
        cmd = event.command
        coll = cmd.get(event.command_name)
        name = f"{event.command_name} {coll}" if isinstance(coll, str) else event.command_name
        self.counts[name] = self.counts.get(name, 0) + 1
        for field in ("updates", "documents", "deletes"):
            if isinstance(cmd.get(field), list):
                self.counts[name + " (statements)"] = self.counts.get(name + " (statements)", 0) + len(cmd[field])

    def succeeded(self, event: Any) -> None:
        pass

    def failed(self, event: Any) -> None:
        pass

    def per_1k(self, n: int) -> dict[str, float]:
        return {k: round(v / n * 1000, 1) for k, v in sorted(self.counts.items())}


def _short(filename: str) -> str:
    for marker in ("/addon/", "/pricing/"):
        if marker in filename:
            return marker[1:] + filename.split(marker, 1)[1]
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1]
    if "/lib/python3" in filename:
        return "stdlib/" + filename.rsplit("/", 1)[-1]
    return filename
