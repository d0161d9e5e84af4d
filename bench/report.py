"""The printed table and the target verdicts (DESIGN §9) of a benchmark result."""
from __future__ import annotations

from typing import Any


def _f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.{nd}f}"
    return str(v)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    cells = [head] + [[_f(c) if not isinstance(c, str) else c for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(cells[0]), line(["-" * x for x in w])] + [line(r) for r in cells[1:]])


def verdicts(b: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if "overhead" in b:
        for r in b["overhead"]["rows"]:
            tag = f"{r['payload']} c={r['concurrency']}"
            floor = 0.90 if r["payload"] == "sse" else 0.95
            base = "bare + streaming addon" if r.get("baseline") == "bare_stream" else "bare"
            out.append({"target": f"throughput ≥ {floor:.2f}× {base} ({tag})", "value": r["addon_throughput_ratio"],
                        "met": r["addon_throughput_ratio"] is not None and r["addon_throughput_ratio"] >= floor})
            if r["payload"] == "json" and r["concurrency"] == 1:
                out.append({"target": f"added median ≤ 0.3 ms ({tag})", "value": r["addon_added_p50_ms"],
                            "met": r["addon_added_p50_ms"] <= 0.3})
    if "streaming" in b:
        s = b["streaming"]
        for r in s["rows"]:
            out.append({"target": f"TTFB ≤ 1.05× bare ({r['events']} events)", "value": r["ttfb_ratio"],
                        "met": r["ttfb_ratio"] <= 1.05})
            if r["events"] >= 100000:
                out.append({"target": f"total time ≤ 1.10× bare ({r['events']} events)", "value": r["total_ratio"],
                            "met": r["total_ratio"] <= 1.10})
        p = s["first_event_proof"]
        out.append({"target": "first event reaches the client before the upstream finished (addon)",
                    "value": p["addon"]["first_event_ms"], "met": p["addon"]["first_before_upstream_done"]})
        m = s["memory"]["addon"]
        out.append({"target": f"RSS growth < 10 MB over a {m['stream_mb']} MB stream (addon)",
                    "value": m["rss_growth_mb"], "met": m["rss_growth_mb"] < 10})
    if "profile" in b and "hook_cpu_us_json" in b["profile"]:
        p = b["profile"]
        for what, key, limit in (("JSON request", "hook_cpu_us_json", 40.0),
                                 ("10-event stream", "hook_cpu_us_sse", 60.0),
                                 ("extra event", "hook_cpu_us_per_extra_event", 2.0)):
            out.append({"target": f"in process ≤ {limit:g} µs CPU per {what}", "value": p[key],
                        "met": p[key] <= limit})
        if p.get("top_addon_own"):
            worst = p["top_addon_own"][0]
            out.append({"target": f"no addon function above 10 µs own time ({worst['function']})",
                        "value": worst["own_us_per_request"], "met": worst["own_us_per_request"] <= 10.0})
    if "slowstore" in b:
        for r in b["slowstore"]["rows"]:
            out.append({"target": f"50 ms store leaves median latency unchanged (≤ +1 ms vs fast store, "
                                  f"c={r['concurrency']})", "value": r["slow_vs_fast_added_p50_ms"],
                        "met": r["slow_vs_fast_added_p50_ms"] <= 1.0})
    if "fleet" in b:
        for r in b["fleet"]["runs"]:
            out.append({"target": f"every retired key ≥ 99% used (threshold {r['threshold']:.2f})",
                        "value": r["used_min"], "met": r["used_min"] is not None and r["used_min"] >= 0.99})
            out.append({"target": f"zero budget errors reach a client (threshold {r['threshold']:.2f})",
                        "value": r["budget_errors_to_client"], "met": r["budget_errors_to_client"] == 0})
    return out


def _split(phases: dict[str, float]) -> str:
    return ", ".join(f"{k} {v}" for k, v in phases.items())


def render(result: dict[str, Any]) -> str:
    b = result["benchmarks"]
    m = result.get("machine", {})
    parts = [f"bench {result['mode']} · {result['started']} · {m.get('cpus')} CPUs ({m.get('cpu', '?')}) · "
             f"Python {m.get('python')} · mitmproxy {m.get('mitmproxy', '?')} · code {result.get('code', {})}"]
    if "overhead" in b:
        o = b["overhead"]
        rows = [[f"{r['payload']} c={r['concurrency']}", r["bare"]["rps"], r["addon"]["rps"],
                 r["addon_throughput_ratio"], r["bare"]["p50_ms"], r["addon"]["p50_ms"], r["addon_added_p50_ms"],
                 r["bare"]["p99_ms"], r["addon"]["p99_ms"], r["addon"].get("drain_s")] for r in o["rows"]]
        bases = o.get("baselines") or {}
        parts.append(f"\nOVERHEAD (database: {o['database']}, {o['keys']} keys, {o['duration_s']} s × best of "
                     f"{o['rounds']}; latencies ms"
                     + ("; bare = " + "; ".join(f"{k}: {v}" for k, v in bases.items()) if bases else "") + ")\n"
                     + _table(["load", "bare rps", "addon rps", "ratio", "bare p50", "addon p50", "+p50", "bare p99",
                               "addon p99", "addon drain s"], rows))
        cpu_rows = [[f"{r['payload']} c={r['concurrency']}", r["bare"]["cpu_s_per_1k"].get("mitmdump"),
                     r["addon"]["cpu_s_per_1k"].get("mitmdump"), r["addon"]["cpu_s_per_1k"].get("database"),
                     round(sum(r["addon"]["cpu_s_per_1k"].values()) / r["bare"]["cpu_s_per_1k"]["mitmdump"], 2)
                     if r["bare"]["cpu_s_per_1k"].get("mitmdump") else None]
                    for r in o["rows"] if "cpu_s_per_1k" in r["bare"] and "cpu_s_per_1k" in r["addon"]]
        if cpu_rows:
            parts.append("footprint: CPU seconds per 1,000 requests (load start until drained)\n" + _table(
                ["load", "bare mitmdump", "addon mitmdump", "addon database", "addon total / bare"], cpu_rows))
    if "streaming" in b:
        s = b["streaming"]
        rows = [[str(r["events"]), r["bare"]["ttfb_ms"], r["addon"]["ttfb_ms"], r["ttfb_ratio"],
                 r["bare"]["total_ms"], r["addon"]["total_ms"], r["total_ratio"], r["reps"]] for r in s["rows"]]
        parts.append(f"\nSTREAMING (baseline: {s['baseline']}; medians, ms)\n" + _table(
            ["events", "bare TTFB", "addon TTFB", "ratio", "bare total", "addon total", "ratio", "reps"], rows))
        p = s["first_event_proof"]
        parts.append(f"first event vs upstream ({p['events']} events, {p['event_delay_s']} s apart, upstream sends "
                     f"for {p['upstream_send_s']} s): bare {p['bare']['first_event_ms']} ms / total "
                     f"{p['bare']['total_ms']} ms; addon {p['addon']['first_event_ms']} ms / total "
                     f"{p['addon']['total_ms']} ms → first event before upstream done: "
                     f"{_f(p['addon']['first_before_upstream_done'])}")
        rows = [[k, v["stream_mb"], v["seconds"], v["rss_before_mb"], v["rss_peak_mb"], v["rss_growth_mb"],
                 v["hwm_after_mb"]] for k, v in s["memory"].items()]
        parts.append(_table(["mitmdump RSS", "stream MB", "s", "before MB", "peak MB", "growth MB", "VmHWM MB"],
                            rows))
    if "slowstore" in b:
        s = b["slowstore"]
        rows = [[f"{r['payload']} c={r['concurrency']}", r["bare"]["p50_ms"], r["fast_store"]["p50_ms"],
                 r["slow_store"]["p50_ms"], r["slow_vs_fast_added_p50_ms"], r["fast_store"]["p99_ms"],
                 r["slow_store"]["p99_ms"], r["fast_store"]["rps"], r["slow_store"]["rps"],
                 r["fast_store"].get("drain_s"), r["slow_store"].get("drain_s")] for r in s["rows"]]
        parts.append(f"\nSLOW STORE (every MongoDB message +{s['delay_ms']:.0f} ms; ping direct "
                     f"{s['mongo_ping_ms']['direct']} ms, slowed {s['mongo_ping_ms']['slowed']} ms; latencies ms)\n"
                     + _table(["load", "bare p50", "fast p50", "slow p50", "slow−fast", "fast p99", "slow p99",
                               "fast rps", "slow rps", "fast drain s", "slow drain s"], rows))
    if "fleet" in b:
        f = b["fleet"]
        pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        rows = [[f"{r['threshold']:.2f}", r["retired"], pct(r["used_min"]), pct(r["used_median"]), pct(r["used_max"]),
                 r["retired_at_or_above_99pct"], r["budget_errors_to_client"], r["upstream_budget_errors"],
                 r["client_counts"]["requests"], r["client_counts"]["no_key_429"],
                 r["client_counts"]["other_errors"], r["max_metering_error_usd"], r["seconds"]] for r in f["runs"]]
        sz = f["size"]
        parts.append(f"\nFLEET ({sz['n_keys']} keys × ${sz['budget']:.0f} + {sz['n_backups']} backups, "
                     f"{sz['clients']} clients, ${sz['lo']}–${sz['hi']} per request; used = upstream charge / budget)\n"
                     + _table(["threshold", "retired", "used min", "median", "max", "≥99%", "budget err→client",
                               "upstream budget err", "requests", "429 no key", "other err", "max |meter−charge| $",
                               "s"], rows))
    if "profile" in b:
        p = b["profile"]
        parts.append(f"\nPROFILE (one pooled request through the addon's hooks, in process, {p['iterations']} "
                     f"iterations): JSON {p['us_per_request_json']} µs wall / {p['cpu_us_per_request_json']} µs CPU; "
                     f"SSE (10 events) {p['us_per_request_sse']} µs wall / {p['cpu_us_per_request_sse']} µs CPU "
                     f"(process CPU: every thread)")
        if "hook_cpu_us_json" in p:
            sj, ss = p.get("hook_cpu_split_json", {}), p.get("hook_cpu_split_sse", {})
            parts.append(f"event-loop thread CPU: JSON {p['hook_cpu_us_json']} µs ({_split(sj)}); SSE 10 events "
                         f"{p['hook_cpu_us_sse']} µs ({_split(ss)}); 110 events {p['hook_cpu_us_sse_110']} µs → "
                         f"{p['hook_cpu_us_per_extra_event']} µs per extra event")
        rows = [[r["function"][:40], r["where"][:44], r["calls_per_request"], r["own_us_per_request"],
                 r["cum_us_per_request"]] for r in p["top_own_time"][:10]]
        parts.append(_table(["top own time", "where", "calls/req", "own µs/req", "cum µs/req"], rows))
        rows = [[r["function"][:40], r["where"][:44], r["calls_per_request"], r["own_us_per_request"],
                 r["cum_us_per_request"]] for r in p["top_addon_cumulative"][:10]]
        parts.append(_table(["addon, cumulative", "where", "calls/req", "own µs/req", "cum µs/req"], rows))
    v = result.get("verdicts") or []
    if v:
        parts.append("\nTARGETS (DESIGN §9)\n" + _table(["target", "value", "met"],
                                                        [[x["target"], x["value"], x["met"]] for x in v]))
    if result.get("errors"):
        parts.append("\nERRORS\n" + "\n".join(f"{k}: {e}" for k, e in result["errors"].items()))
    return "\n".join(parts)
