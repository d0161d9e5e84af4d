"""Overhead: bare `mitmdump --mode reverse:<fake>` vs `mitmdump -s addon/openhands.py` (embedded database,
20 keys), same fake upstream, same run. Requests/s, median and p99 latency, and their ratios.

The load generator (`bench.loadgen`) runs in its own process, closed loop, one keep-alive connection
per worker. Two methods: sequential (targets measured in turn, bare, addon, bare, addon, …, paired per round:
the latencies a client sees) and co-scheduled (bench.cosched: the targets share one pinned core and are loaded at
the same moment, with a second bare mitmdump as an A/A control: the throughput ratios the targets read, since on
this VM the CPU's speed drifts between sequential rounds by more than the difference being measured).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import cosched
from bench.procs import (ROOT, AddonMitm, BareMitm, Fake, MongoServer, cpu_seconds, descendants, pool_keys,
                         settle, workdir)

CLIENT_KEY = "sk-bench-client-0000000000000000"
MODEL = "gpt-5-mini-2025-08-07"
JSON_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
SSE_BODY = {**JSON_BODY, "stream": True}
AGENT_BODY_BYTES = 160_000  # an agent's request some turns in (system prompt, tools, file reads): 100-200 KB


def agent_body(size: int = AGENT_BODY_BYTES) -> bytes:
    """A chat request shaped like a coding agent's some turns in, at least `size` bytes: a system prompt, a
    dozen tool definitions with JSON schemas, then turns of assistant tool calls and tool results holding file
    text (escapes, non-ASCII, numbers), `model` after `messages` as the OpenAI SDK sends it. Deterministic."""
    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": f"Tool {i}: runs a step of the task and reports what it did. " * 3,
        "parameters": {"type": "object", "required": ["command"], "properties": {
            "command": {"type": "string", "description": "The command to run, e.g. \"ls -la\" or `cat file`."},
            "path": {"type": "string", "description": "Absolute path, like /workspace/src/main.py"},
            "timeout": {"type": "number", "minimum": 0, "maximum": 600},
            "model": {"type": "string", "description": "a nested key named like a top-level one"}}}}}
        for i in range(12)]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a careful software engineer working in /workspace. " * 40},
        {"role": "user", "content": "Fix the failing test in tests/test_parser.py and explain the cause. ✓"}]
    turn = 0
    while not turn or len(json.dumps({"messages": messages, "tools": tools})) < size:  # one turn at least
        call_id = f"call_{turn:04d}"
        messages.append({"role": "assistant", "content": None, "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": f"tool_{turn % 12}",
                         "arguments": json.dumps({"command": f"cat src/module_{turn}.py", "timeout": 30.5})}}]})
        lines = [f"def handler_{turn}_{j}(value: int) -> str:  # \"quoted\" — naïve\n    return f'{{value * {j}}}'"
                 for j in range(40)]
        messages.append({"role": "tool", "tool_call_id": call_id, "content": "\n".join(lines)})
        turn += 1
    return json.dumps({"messages": messages, "model": MODEL, "tools": tools, "max_tokens": 4096,
                       "temperature": 0.0}).encode()


def payloads() -> dict[str, bytes]:
    return {"json": json.dumps(JSON_BODY).encode(), "sse": json.dumps(SSE_BODY).encode()}


def loadgen_command(port: int, concurrency: int, duration: float, warmup: float, body: bytes,
                     path: str = "/chat/completions") -> list[str]:
    """The `bench.loadgen` command line every overhead measurement runs (sequential and co-scheduled alike)."""
    return [sys.executable, "-m", "bench.loadgen", "--url", f"http://127.0.0.1:{port}{path}",
            "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(warmup),
            "--body", body.decode(), "--header", f"authorization: Bearer {CLIENT_KEY}",
            "--header", "content-type: application/json", "--session-per-worker"]


def loadgen(port: int, concurrency: int, duration: float, warmup: float, body: bytes,
            path: str = "/chat/completions") -> dict[str, Any]:
    return _run_loadgen(loadgen_command(port, concurrency, duration, warmup, body, path), duration + warmup + 120)


def _run_loadgen(cmd: list[str], timeout: float) -> dict[str, Any]:
    """One `bench.loadgen` process to its end: its JSON answer, or its stderr in the error."""
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
    return cosched.parse_loadgen(out.stdout)


def paired_client(first: int, second: int, pairs: int, warm: int, body_file: Path | None = None) -> dict[str, Any]:
    """One client's JSON latency on two proxies (ports), `pairs` requests to each, back to back in pairs
    (`bench.loadgen --pair-url`): what the second adds to a client's median, free of the drift between runs.
    `body_file`: the request body from that file (an agent-sized body), else the small JSON body."""
    cmd = loadgen_command(first, 1, 0.0, 0.0, b"" if body_file else payloads()["json"])
    if body_file is not None:
        cmd += ["--body-file", str(body_file)]
    cmd += ["--pair-url", f"http://127.0.0.1:{second}/chat/completions", "--pairs", str(pairs), "--warm-pairs",
            str(warm)]
    return _run_loadgen(cmd, pairs * 0.1 + 120)


def paired_with_control(bare: int, addon: int, bare_2: int, sizes: tuple[int, int], quiet: list[int],
                        body_file: Path | None = None) -> dict[str, Any]:
    """`paired_client` of the addon against bare, then of bare's second copy against bare (the A/A control: what the
    method reads when nothing differs), each once the processes `quiet` have settled."""
    settle(quiet)
    out = {"addon": paired_client(bare, addon, *sizes, body_file=body_file)}
    settle(quiet)
    out["control"] = paired_client(bare, bare_2, *sizes, body_file=body_file)
    return out


PAIRED_C1 = {"full": (3000, 100), "quick": (1000, 50), "tiny": (20, 5)}  # (measured pairs, warm-up pairs)
PAIRED_AGENT = {"full": (1000, 50), "quick": (300, 30), "tiny": (5, 2)}  # the same with `agent_body`


def warm_together(ports: dict[str, int]) -> None:
    """STARTUP_S of JSON load (4 clients each) on every target at once, so each has served as long as the others
    before anything is measured (label -> port)."""
    body = payloads()["json"]
    warm = {label: loadgen_command(port, 4, STARTUP_S, 0.0, body) for label, port in ports.items()}
    cosched.run_round(warm, list(warm), None, STARTUP_S + 120)


def compare(targets: dict[str, int], baseline: str | dict[str, str], cases: list[tuple[str, int]], duration: float,
            warmup: float, rounds: int = 1, pids: list[int] | None = None,
            footprint: dict[str, dict[str, list[int]]] | None = None) -> list[dict[str, Any]]:
    """For each (payload, concurrency): the baseline and every other target measured `rounds` times,
    interleaved; best round kept per target (the least disturbed by the other processes on the box);
    ratios against the baseline (`baseline` maps a payload kind to its baseline label when they differ).
    Each round also gives a paired ratio (target and baseline measured back to back, so slow drift of the
    machine hits both); their median is the steadier figure when there are several rounds.

    With `pids` (every process of the run), each measurement waits until they are idle again and
    records that wait as `drain_s`: for the addon, the time its write-behind queue needs to reach
    the database after the load stops. With `footprint` (label → {"mitmdump": pids, "database": pids}),
    the CPU seconds those processes used from the start of the load until drained, per 1,000 requests."""
    bodies = payloads()
    base_of = (lambda kind: baseline) if isinstance(baseline, str) else baseline.__getitem__
    rows = []
    for kind, conc in cases:
        base_label = base_of(kind)
        measured = {base_label: targets[base_label],
                    **{k: v for k, v in targets.items() if k not in (base_label, *_baselines(baseline))}}
        best: dict[str, dict] = {}
        per_round: list[dict[str, float]] = []  # rps of every target in each round (a pair measured back to back)
        for _ in range(rounds):
            per_round.append({})
            for label, port in measured.items():
                if pids:
                    settle(pids)
                cpu0 = _cpu(footprint.get(label, {})) if footprint else {}
                r = loadgen(port, conc, duration, warmup, bodies[kind])
                if pids:
                    r["drain_s"] = settle(pids)
                if footprint and r.get("requests_total"):
                    used = _cpu(footprint.get(label, {}))
                    r["cpu_s_per_1k"] = {k: round((used[k] - cpu0[k]) / r["requests_total"] * 1000, 3)
                                         for k in used}
                per_round[-1][label] = r["rps"]
                if label not in best or r["rps"] > best[label]["rps"]:
                    best[label] = r
        base = best[base_label]
        row: dict[str, Any] = {"payload": kind, "concurrency": conc, "baseline": base_label, "bare": base}
        for label, r in best.items():
            if label == base_label:
                continue
            row[label] = r
            row[f"{label}_throughput_ratio"] = round(r["rps"] / base["rps"], 3) if base["rps"] else None
            paired = [rnd[label] / rnd[base_label] for rnd in per_round if rnd.get(base_label) and label in rnd]
            row[f"{label}_paired_ratios"] = [round(x, 3) for x in paired]
            row[f"{label}_paired_ratio_median"] = round(statistics.median(paired), 3) if paired else None
            row[f"{label}_added_p50_ms"] = round(r["p50_ms"] - base["p50_ms"], 3)
            row[f"{label}_added_p99_ms"] = round(r["p99_ms"] - base["p99_ms"], 3)
        rows.append(row)
    return rows


def _baselines(baseline: str | dict[str, str]) -> set[str]:
    return {baseline} if isinstance(baseline, str) else set(baseline.values())


def _cpu(groups: dict[str, list[int]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, pids in groups.items():
        total = 0.0
        for pid in pids:
            try:
                total += cpu_seconds(pid)
            except (OSError, IndexError, ValueError):
                pass
        out[name] = total
    return out


# A sidecar assumes unseen peers for PEER_GRACE_S (5 s) after its first reservation, taking the general key
# choice on every request meanwhile: each mitmdump serves this long before anything is measured.
STARTUP_S = 6.0


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
    duration, warmup, rounds = (0.3, 0.1, 1) if tiny else (1.5, 0.5, 3) if quick else (3.0, 0.5, 5)
    co_duration, co_warmup, co_rounds = cosched.round_sizes(quick, tiny)
    concs = [1] if tiny else [1, 16, 64]
    cases = [("json", c) for c in concs] + [("sse", 16 if not tiny else 2)]
    fake, keys = setup_fake_and_keys(wd, 3 if tiny else 20)
    bare = bare_stream = addon = mongo = bare_2 = bare_stream_2 = None
    try:
        bare = BareMitm(wd / "bare", fake.url)
        # SSE baseline: mitmdump plus a three-line addon that streams event streams (the least any
        # streaming-aware addon does); a default mitmdump buffers a stream whole.
        bare_stream = BareMitm(wd / "bare-stream", fake.url, name="bare-stream", stream_sse=True)
        if database == "embedded":
            addon = AddonMitm(wd / "addon", fake.url)
        else:  # a SecantusDB we start: the same server the embedded mode runs as a child process
            mongo = MongoServer(wd / "secantus").start()
            addon = AddonMitm(wd / "addon", fake.url, mongo.uri, "bench_overhead")
        addon.start()
        add_keys(addon, keys)
        if not tiny:  # steady state first: the addon's first seconds take the general key choice (PEER_GRACE_S)
            body = payloads()["json"]
            for port in (bare.port, bare_stream.port, addon.port):
                loadgen(port, 4, STARTUP_S, 0.0, body)
        db_pids = [mongo.proc.pid] if mongo and mongo.proc else descendants(addon.pid)
        pids = [fake.proc.pid, bare.pid, bare_stream.pid, addon.pid, *db_pids]
        footprint = {"bare": {"mitmdump": [bare.pid]}, "bare_stream": {"mitmdump": [bare_stream.pid]},
                     "addon": {"mitmdump": [addon.pid], "database": db_pids}}
        rows = compare({"bare": bare.port, "bare_stream": bare_stream.port, "addon": addon.port},
                       {"json": "bare", "sse": "bare_stream"}, cases, duration, warmup, rounds, pids, footprint)

        # Co-scheduled: the A/A controls are second copies of the baselines, warmed as long as the others were.
        bare_2 = BareMitm(wd / "bare-2", fake.url, name="bare-2")
        bare_stream_2 = BareMitm(wd / "bare-stream-2", fake.url, name="bare-stream-2", stream_sse=True)
        if not tiny:
            warm_together({"bare_2": bare_2.port, "bare_stream_2": bare_stream_2.port})
        # One client's added median, from requests paired back to back (the sequential rows above carry the drift
        # between their runs, which at one client is larger than the 0.3 ms being measured), with bare against its
        # second copy as the A/A control.
        mode = "tiny" if tiny else "quick" if quick else "full"
        quiet = [*pids, bare_2.pid]
        paired = paired_with_control(bare.port, addon.port, bare_2.port, PAIRED_C1[mode], quiet)
        # The same with an agent-sized body: what a real agent's turn pays (the body's parse is the sidecar's
        # largest cost that grows with the request; the small body above hides it).
        body_file = wd / "agent-body.json"
        body_file.write_bytes(agent_body())
        paired_agent = {**paired_with_control(bare.port, addon.port, bare_2.port, PAIRED_AGENT[mode], quiet, body_file),
                        "body_bytes": body_file.stat().st_size}
        co = co_scheduled(cases, {"bare": (bare.pid, bare.port), "bare_2": (bare_2.pid, bare_2.port),
                                  "bare_stream": (bare_stream.pid, bare_stream.port),
                                  "bare_stream_2": (bare_stream_2.pid, bare_stream_2.port),
                                  "addon": (addon.pid, addon.port)},
                          [fake.proc.pid, *db_pids], co_rounds, co_duration, co_warmup)
        return {"duration_s": duration, "warmup_s": warmup, "rounds": rounds, "keys": len(keys),
                "database": database, "rows": rows, "paired_c1": paired,
                "paired_agent": paired_agent, "co_scheduled": co,
                "baselines": {"json": "mitmdump --mode reverse", "sse": "mitmdump + 3-line addon streaming "
                              "text/event-stream (flow.response.stream = True)"}}
    finally:
        for p in (addon, bare, bare_stream, bare_2, bare_stream_2, mongo):
            if p is not None:
                p.stop()
        fake.stop()


def co_scheduled(cases: list[tuple[str, int]], targets: dict[str, tuple[int, int | None]], load_pids: list[int],
                 rounds: int, duration: float, warmup: float) -> dict[str, Any]:
    """bench.cosched over the overhead cases (`targets`: label → (pid, port)): per case its baseline, the
    baseline's second copy (the A/A control: its ratio is the method's own noise) and the addon, loaded at the
    same moment on one shared core."""
    bodies = payloads()
    port: dict[str, int] = {}
    for label, (_, p) in targets.items():
        assert p is not None, f"{label} not started"
        port[label] = p
    co_cases = []
    for kind, conc in cases:
        base = "bare" if kind == "json" else "bare_stream"
        labels = (base, f"{base}_2", "addon")
        co_cases.append({"payload": kind, "concurrency": conc, "baseline": base, "control": f"{base}_2",
                         "commands": {lb: loadgen_command(port[lb], conc, duration, warmup, bodies[kind])
                                      for lb in labels}})
    target_pids = [pid for pid, _ in targets.values()]
    return cosched.measure(co_cases, target_pids, load_pids, [*target_pids, *load_pids], rounds, duration, warmup)
