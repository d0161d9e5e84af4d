"""The printed table and the target verdicts (DESIGN §9) of a benchmark result."""
from __future__ import annotations

import statistics
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


def throughput_ratio(row: dict[str, Any]) -> float | None:
    """The overhead row's addon/bare throughput: the median of the rounds' paired ratios when there were three
    or more rounds (steadier than one best round against another), else the best rounds' ratio."""
    paired = row.get("addon_paired_ratios") or []
    if len(paired) >= 3 and row.get("addon_paired_ratio_median") is not None:
        return float(row["addon_paired_ratio_median"])
    return row.get("addon_throughput_ratio")


def co_scheduled_ratio(overhead: dict[str, Any], payload: str, concurrency: int) -> float | None:
    """The addon/baseline throughput of the co-scheduled part (bench/cosched.py): the median of its per-round
    ratios; None when the result has no co-scheduled row for that load (a result from before it existed)."""
    for r in (overhead.get("co_scheduled") or {}).get("rows", []):
        if r["payload"] == payload and r["concurrency"] == concurrency:
            return r["ratios"].get("addon", {}).get("median")
    return None


def verdicts(b: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if "overhead" in b:
        o = b["overhead"]
        for r in o["rows"]:
            tag = f"{r['payload']} c={r['concurrency']}"
            floor = 0.90 if r["payload"] == "sse" else 0.95
            base = "bare + streaming addon" if r.get("baseline") == "bare_stream" else "bare"
            # Throughput reads the co-scheduled median (the sequential rounds carry the VM's drift); older results
            # without it fall back to the sequential paired median.
            ratio = co_scheduled_ratio(o, r["payload"], r["concurrency"])
            how = "co-scheduled" if ratio is not None else "sequential"
            if ratio is None:
                ratio = throughput_ratio(r)
            out.append({"target": f"throughput ≥ {floor:.2f}× {base} ({tag}, {how})", "value": ratio,
                        "met": ratio is not None and ratio >= floor})
            if r["payload"] == "json" and r["concurrency"] == 1:
                # One client's added median reads the paired requests; older results fall back to the sequential +p50.
                paired = (o.get("paired_c1") or {}).get("addon")
                added = paired["added_p50_ms"] if paired else r["addon_added_p50_ms"]
                out.append({"target": f"added median ≤ 0.3 ms ({tag}, {'paired' if paired else 'sequential'})",
                            "value": added, "met": added <= 0.3})
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
        out += slowstore_verdicts(b["slowstore"])
    if "fleet" in b:
        out += fleet_verdicts(b["fleet"])
    return out


def paired_c1_section(paired: dict[str, Any], body: str = "") -> str:
    """One client's JSON latency, requests paired back to back: the addon against bare, and bare against its own
    second copy (the A/A control: what the method reads when nothing differs). `body`: what the requests carried,
    when not the small JSON body (then no target reads the table)."""
    rows = []
    for label, what in (("addon", "addon vs bare"), ("control", "bare copy vs bare (A/A)")):
        r = paired.get(label)
        if r:
            d = r["paired_diff_ms"]
            rows.append([what, r["pairs"], r["first"]["p50_ms"], r["second"]["p50_ms"], r["added_p50_ms"],
                         d["median"], f"{d['p25']} .. {d['p75']}"])
    what = (f"{body}; no target reads it: it shows what a real agent's turn pays" if body
            else "added = difference of the medians, the figure the ≤ 0.3 ms target reads")
    return (f"\nONE CLIENT, paired (JSON, one keep-alive connection to each proxy, a request to each back to back, the "
            f"side going first alternating; latencies ms; {what})\n"
            + _table(["pairs of", "pairs", "first p50", "second p50", "added", "per-pair median",
                      "per-pair p25 .. p75"], rows))


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
                 r["addon_throughput_ratio"], r.get("addon_paired_ratio_median"),
                 " ".join(f"{x:.2f}" for x in r.get("addon_paired_ratios", [])) or "–",
                 r["bare"]["p50_ms"], r["addon"]["p50_ms"], r["addon_added_p50_ms"],
                 r["bare"]["p99_ms"], r["addon"]["p99_ms"], r["addon"].get("drain_s")] for r in o["rows"]]
        bases = o.get("baselines") or {}
        co = o.get("co_scheduled")
        parts.append(f"\nOVERHEAD, sequential (database: {o['database']}, {o['keys']} keys, {o['duration_s']} s × "
                     f"{o['rounds']} rounds, addon and baseline back to back in each; rps and latencies of each side's "
                     "best round; paired = per-round ratios, which carry the VM's drift between rounds"
                     + ("" if co else "; the throughput target reads the paired median from 3 rounds on")
                     + ("; the ≤ 0.3 ms target reads the paired requests below" if o.get("paired_c1")
                        else "; the ≤ 0.3 ms target reads +p50") + "; latencies ms"
                     + ("; bare = " + "; ".join(f"{k}: {v}" for k, v in bases.items()) if bases else "") + ")\n"
                     + _table(["load", "bare rps", "addon rps", "best/best", "paired median", "paired per round",
                               "bare p50", "addon p50", "+p50", "bare p99", "addon p99", "addon drain s"], rows))
        cpu_rows = [[f"{r['payload']} c={r['concurrency']}", r["bare"]["cpu_s_per_1k"].get("mitmdump"),
                     r["addon"]["cpu_s_per_1k"].get("mitmdump"), r["addon"]["cpu_s_per_1k"].get("database"),
                     round(sum(r["addon"]["cpu_s_per_1k"].values()) / r["bare"]["cpu_s_per_1k"]["mitmdump"], 2)
                     if r["bare"]["cpu_s_per_1k"].get("mitmdump") else None]
                    for r in o["rows"] if "cpu_s_per_1k" in r["bare"] and "cpu_s_per_1k" in r["addon"]]
        if cpu_rows:
            parts.append("footprint: CPU seconds per 1,000 requests (load start until drained)\n" + _table(
                ["load", "bare mitmdump", "addon mitmdump", "addon database", "addon total / bare"], cpu_rows))
        if o.get("paired_c1"):
            parts.append(paired_c1_section(o["paired_c1"]))
        if o.get("paired_agent"):
            pa = o["paired_agent"]
            parts.append(paired_c1_section(pa, f"an agent-sized body: {pa.get('body_bytes', 0) / 1000:.0f} KB of "
                                               "system prompt, tools and tool results (bench.overhead.agent_body)"))
        if co:
            parts.append(co_scheduled_section(co))
    if "streaming" in b:
        s = b["streaming"]
        rows = [[str(r["events"]), r["bare"]["ttfb_ms"], r["addon"]["ttfb_ms"], r["ttfb_ratio"],
                 r["bare"]["total_ms"], r["addon"]["total_ms"], r["total_ratio"], r["reps"]] for r in s["rows"]]
        gap = s.get("first_event_gap_s")
        how = (f"ratios: medians of per-round ratios, bare and addon back to back; TTFB on streams whose first event "
               f"comes {gap * 1000:.0f} ms before the rest, totals on streams sent at once; times: medians, ms"
               if gap else "medians, ms")
        parts.append(f"\nSTREAMING (baseline: {s['baseline']}; {how})\n" + _table(
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
        co = s.get("co_scheduled")
        parts.append(f"\nSLOW STORE (every MongoDB message +{s['delay_ms']:.0f} ms; ping direct "
                     f"{s['mongo_ping_ms']['direct']} ms, slowed {s['mongo_ping_ms']['slowed']} ms; latencies ms"
                     + ("; sequential: the targets one after the other, best round each, so the VM's drift between "
                        "rounds is in slow−fast; the verdict reads the co-scheduled table below)" if co else ")")
                     + "\n" + _table(["load", "bare p50", "fast p50", "slow p50", "slow−fast", "fast p99",
                                      "slow p99", "fast rps", "slow rps", "fast drain s", "slow drain s"], rows))
        if co:
            parts.append(slowstore_co_section(co))
    if "fleet" in b:
        parts.append(fleet_section(b["fleet"]))
    if "profile" in b:
        p = b["profile"]
        parts.append(f"\nPROFILE (one pooled request through the addon's hooks, in process, {p['iterations']} "
                     f"iterations): JSON {p['us_per_request_json']} µs wall / {p['cpu_us_per_request_json']} µs CPU; "
                     f"SSE (10 events) {p['us_per_request_sse']} µs wall / {p['cpu_us_per_request_sse']} µs CPU "
                     f"(process CPU: every thread)"
                     + (f"; measured from {p['steady_after_s']} s after the first request, once the pool ran alone "
                        f"(no peer assumed)" if "steady_after_s" in p else ""))
        if "hook_cpu_us_json" in p:
            sj, ss = p.get("hook_cpu_split_json", {}), p.get("hook_cpu_split_sse", {})
            parts.append(f"event-loop thread CPU: JSON {p['hook_cpu_us_json']} µs ({_split(sj)}); SSE 10 events "
                         f"{p['hook_cpu_us_sse']} µs ({_split(ss)}); 110 events {p['hook_cpu_us_sse_110']} µs"
                         + (f" against {p['hook_cpu_us_sse_10_paired']} for 10 in alternating batches"
                            if "hook_cpu_us_sse_10_paired" in p else "")
                         + f" → {p['hook_cpu_us_per_extra_event']} µs per extra event")
            if "hook_cpu_us_json_agent_body" in p:
                parts.append(f"JSON with an agent-sized request body ({p['agent_body_bytes'] // 1000} KB): "
                             f"{p['hook_cpu_us_json_agent_body']} µs ({_split(p['hook_cpu_split_json_agent_body'])})")
            if "hook_cpu_us_json_agent_answer" in p:
                split = _split(p["hook_cpu_split_json_agent_answer"])
                parts.append(f"JSON answered with an agent-sized reply ({p['agent_answer_bytes'] // 1000} KB): "
                             f"{p['hook_cpu_us_json_agent_answer']} µs ({split})")
        if "bytecode_json" in p:
            bj, bs = p["bytecode_json"], p["bytecode_sse"]
            parts.append(f"addon bytecode run per request (deterministic; what the hooks bring back into the L2 on "
                         f"every request, see CACHE): JSON {bj['functions']} functions, {bj['bytes']:,} bytes, "
                         f"{bj['lines']} lines of 64 B; SSE 10 events {bs['functions']} functions, {bs['bytes']:,} "
                         f"bytes, {bs['lines']} lines; most in JSON: "
                         + ", ".join(f"{t['function']} {t['bytes']}" for t in bj["top"][:6]))
        if p.get("db_commands_per_1k_json"):
            parts.append("database commands per 1,000 JSON requests: "
                         + ", ".join(f"{k} {v}" for k, v in p["db_commands_per_1k_json"].items()))
        rows = [[r["function"][:40], r["where"][:44], r["calls_per_request"], r["own_us_per_request"],
                 r["cum_us_per_request"]] for r in p["top_own_time"][:10]]
        parts.append(_table(["top own time", "where", "calls/req", "own µs/req", "cum µs/req"], rows))
        rows = [[r["function"][:40], r["where"][:44], r["calls_per_request"], r["own_us_per_request"],
                 r["cum_us_per_request"]] for r in p["top_addon_cumulative"][:10]]
        parts.append(_table(["addon, cumulative", "where", "calls/req", "own µs/req", "cum µs/req"], rows))
    if "instructions" in b:
        parts.append(instructions_section(b["instructions"]))
    if "cache" in b:
        parts.append(cache_section(b["cache"]))
    if "realprofile" in b:
        parts.append(realprofile_section(b["realprofile"]))
    v = result.get("verdicts") or []
    if v:
        parts.append("\nTARGETS (DESIGN §9)\n" + _table(["target", "value", "met"],
                                                        [[x["target"], x["value"], x["met"]] for x in v]))
    if result.get("errors"):
        parts.append("\nERRORS\n" + "\n".join(f"{k}: {e}" for k, e in result["errors"].items()))
    return "\n".join(parts)


def co_scheduled_section(co: dict[str, Any]) -> str:
    """The co-scheduled overhead table (bench/cosched.py): per load the baseline's, the A/A control's and the
    addon's requests/s (medians over rounds) and their ratios to the baseline, median and range over rounds."""
    pin = _pin_note(co, "load generators, fake upstream and database")
    rows = []
    for r in co["rows"]:
        for lb in (r["control"], "addon"):
            x = r["ratios"].get(lb, {})
            rows.append([f"{r['payload']} c={r['concurrency']}", lb + (" (A/A)" if lb == r["control"] else ""),
                         r["rps_median"][r["baseline"]], r["rps_median"].get(lb), x.get("median"), x.get("min"),
                         x.get("max"), " ".join(f"{v:.2f}" for v in x.get("per_round", [])) or "–",
                         (r.get("count_ratios") or {}).get(lb, {}).get("median"),
                         _median(r["busy"]["targets"]), _median(r["busy"]["load"])])
    return (f"\nOVERHEAD, co-scheduled ({co['rounds']} rounds × {co['duration_s']} s; co-scheduled = the baseline, a "
            "second copy of it and the addon share one core and are loaded at the same moment, so each ratio is one of "
            "CPU cost per request with the VM's drift cancelled; the throughput targets read the addon's median; "
            "the A/A row is the method's own noise; rps = clients / mean latency (a closed loop's throughput; the "
            "count inside the window moves in whole batches at 64 clients), counted = the count's ratio; "
            f"{pin})\n"
            + _table(["load", "target", "baseline rps", "target rps", "ratio median", "min", "max", "per round",
                      "counted median", "targets' CPU busy", "load CPU busy"], rows)
            + "\n(CPU busy: median share of the core busy during a round, anyone's processes; the targets' core near 1 "
              "and the load side's below it means the targets are the bottleneck, as the method needs)")


def slowstore_verdicts(s: dict[str, Any]) -> list[dict[str, Any]]:
    """The slow-store target per load. With the co-scheduled part: the median over rounds of slow p50 − fast p50
    within max(1 ms, 2 % of the fast p50), the A/A control's median beside it (the method's own noise); an older
    result without it: the sequential best-round difference within 1 ms."""
    co = s.get("co_scheduled")
    if not co:
        return [{"target": f"50 ms store leaves median latency unchanged (≤ +1 ms vs fast store, "
                           f"c={r['concurrency']})", "value": r["slow_vs_fast_added_p50_ms"],
                 "met": r["slow_vs_fast_added_p50_ms"] <= 1.0} for r in s["rows"]]
    out = []
    for r in co["rows"]:
        added = r["slow_vs_fast_p50_ms"]["median"]
        control = r["control_vs_fast_p50_ms"]["median"]
        out.append({"target": f"50 ms store leaves median latency unchanged (slow − fast p50 ≤ max(1 ms, 2 % of "
                              f"fast) = {r['limit_ms']:g} ms, c={r['concurrency']}, co-scheduled; A/A control "
                              f"{_signed(control)} ms)", "value": added,
                    "met": added is not None and added <= r["limit_ms"]})
    return out


def _signed(v: float | None) -> str:
    return "–" if v is None else f"{v:+.2f}"


def slowstore_co_section(co: dict[str, Any]) -> str:
    """The co-scheduled slow-store table: per load the fast store's, the control's and the slow store's median p50
    over rounds, slow − fast per round (median and range, what the target reads) and control − fast (the method's
    own noise), and each one's requests/s (clients / mean latency, medians)."""
    pin = _pin_note(co, "load generators, fake upstream, SecantusDB and the slow proxy")
    rows = []
    for r in co["rows"]:
        med, d, c = r["p50_median_ms"], r["slow_vs_fast_p50_ms"], r["control_vs_fast_p50_ms"]
        rps = r["rps_median"]
        rows.append([f"{r['payload']} c={r['concurrency']}", med.get("fast_store"), med.get("fast_store_2"),
                     med.get("slow_store"), d["median"], d["min"], d["max"], c["median"], c["min"], c["max"],
                     r["limit_ms"], rps.get("fast_store"), rps.get("fast_store_2"), rps.get("slow_store"),
                     _median(r["busy"]["targets"]), _median(r["busy"]["load"])])
    return (f"\nSLOW STORE, co-scheduled ({co['rounds']} rounds × {co['duration_s']} s; the fast-store addon, its "
            "twin on the same server directly (control, own database) and the slow-store addon share one core and are "
            "loaded at the same moment, so the VM's drift hits all three; p50s: medians over rounds; slow−fast and "
            "control−fast: per-round differences, median [min, max]; the target reads slow−fast's median against the "
            "limit, the control is the method's own noise; latencies of three targets sharing one core, not a "
            f"client's; rps = clients / mean latency; {pin}; ms)\n"
            + _table(["load", "fast p50", "control p50", "slow p50", "slow−fast", "min", "max", "control−fast",
                      "min", "max", "limit", "fast rps", "control rps", "slow rps", "targets' CPU busy",
                      "load CPU busy"], rows))


def _pin_note(co: dict[str, Any], load_side: str) -> str:
    """Where a co-scheduled part ran: the targets' CPU and `load_side`'s, or why nothing was pinned."""
    if not co.get("pinned"):
        return f"NOT pinned: {co.get('why', '?')}"
    return (f"targets pinned to CPU {','.join(map(str, co['target_cpus']))}, {load_side} on CPU "
            f"{','.join(map(str, co['load_cpus']))}")


def _median(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return round(statistics.median(v), 3) if v else None


def instructions_section(ins: dict[str, Any]) -> str:
    """Callgrind's count per request of a real mitmdump, bare vs addon (bench/instructions.py)."""
    if "skipped" in ins:
        return f"\nINSTRUCTIONS: skipped ({ins['skipped']})"
    rows = [[f"json c={r['concurrency']}", r["requests"], r["bare_main"], r["addon_main"], r["addon_main_added"],
             r["main_ratio"], r["addon_other_threads"]] for r in ins["cases"]]
    text = ("\nINSTRUCTIONS (callgrind, per request; event-loop thread; other threads' periodic work is spread over "
            "few requests under valgrind, so it reads high)\n"
            + _table(["load", "requests", "bare main", "addon main", "added", "ratio", "addon other threads"], rows))
    top = ins.get("top_addon_inclusive") or []
    if top:
        text += "\n" + _table(["addon function (inclusive)", "instructions/req", "calls/req"],
                               [[t["function"][:70], t["instructions_per_request"], t["calls_per_request"]]
                                for t in top[:15]])
    return text


def cache_section(cs: dict[str, Any]) -> str:
    """Callgrind's simulated cache misses per request of a real mitmdump, bare vs addon, and where the addon's
    added misses fall (bench/instructions.py, `run_cache`)."""
    if "skipped" in cs:
        return f"\nCACHE: skipped ({cs['skipped']})"
    l2 = cs.get("l2", {})
    rows = []
    for r in cs["cases"]:
        for label in ("instructions", "l1_misses", "l2_misses", "branch_misses"):
            v = r[label]
            floor = (r.get("floor") or {}).get(label)
            rows.append([f"json c={r['concurrency']}", label.replace("_", " "), v["bare"], floor,
                         round(floor / v["bare"], 3) if floor is not None and v["bare"] else None, v["addon"],
                         v["ratio"], v["added"], v["in_hooks"], v["around_hooks"]])
    text = (f"\nCACHE (callgrind's simulation, per request, event-loop thread; last level simulated as this CPU's L2: "
            f"{l2.get('size', 0) >> 10} KB, {l2.get('ways')}-way; in hooks = inside the hooks (under `hooks.guarded`), "
            "around = the rest of the added count: mitmproxy's own code missing what the hooks evicted; floor = "
            "bench/minimal_addon.py)\n"
            + _table(["load", "event", "bare", "floor", "floor ratio", "addon", "ratio", "added", "in hooks",
                      "around hooks"], rows))
    top = (cs["cases"][-1].get("top_addon_l2") or []) if cs["cases"] else []
    if top:
        text += "\n" + _table(["addon function (inclusive), last case", "L2 misses/req", "of them data",
                               "L1 data misses", "instructions/req"],
                              [[t["function"][:70], t["l2_misses_per_request"], t["data_l2_misses"],
                                t["l1_data_misses"], t["instructions_per_request"]] for t in top])
    return text


def realprofile_section(rp: dict[str, Any]) -> str:
    """CPU per request of each part of real mitmdumps (bare, floor, sidecar) and, with perf, the addon's functions
    by real inclusive µs per request (bench/real_profile.py)."""
    text = (f"\nREAL PROFILE (real mitmdumps, JSON, {rp['rounds']} rounds × {rp['duration_s']} s, targets back to "
            "back in each; CPU µs per request from /proc per thread, load start until idle; medians over rounds; "
            "ratios paired per round; wall-clock on a shared machine, ±20 %)\n" + rp["floor"])
    rows = []
    for c in rp["cases"]:
        for label, t in c["targets"].items():
            p = c["paired"].get(label, {})
            rows.append([f"json c={c['concurrency']}", label, t["rps"], t["main"], t["other_threads"], t["database"],
                         t["total"], p.get("rps_ratio_median"), " ".join(f"{x:.2f}" for x in p.get("rps_ratios", []))
                         or "–", p.get("main_ratio_median"), p.get("main_added_us_median")])
    text += "\n" + _table(["load", "target", "rps", "main µs", "other threads µs", "database µs", "total µs",
                            "rps / bare", "per round", "main / bare", "main added µs"], rows)
    perf = rp.get("perf") or {}
    if "skipped" in perf:
        return text + f"\nper-function part skipped ({perf['skipped']})"
    b, s = perf["bare"], perf["sidecar"]
    rows = [[label, r["requests"], r["rps"], r["main_us"], r["proc_main_us"], r["gc_us"], r["dispatch_own_us"],
             r.get("addon_us", 0.0), r.get("addon_self_us"), r.get("addon_outside_dispatch_us")]
            for label, r in (("bare", b), ("sidecar", s))]
    rows.append(["sidecar − bare", "", "", *(perf["added"][k] for k in ("main_us", "proc_main_us", "gc_us",
                                                                        "dispatch_own_us")), s["addon_us"],
                 s.get("addon_self_us"), s.get("addon_outside_dispatch_us")])
    text += (f"\nperf of the main thread (cpu-clock {perf['freq_hz']} Hz, dwarf stacks, json c={perf['concurrency']}, "
             f"{perf.get('rounds', 1)} × {perf['seconds']} s, bare and sidecar alternated; fresh mitmdumps with the "
             "perf trampolines on; µs per request; dispatch = mitmproxy's invoke_addon without addon frames below "
             "it; addon frames = samples with an addon function on the stack, of which its own code = innermost "
             "Python frame is the addon's, the rest in Python it calls)\n"
             + _table(["main thread", "requests", "rps", "perf µs", "/proc µs", "GC µs", "dispatch µs",
                       "addon frames µs", "in addon's own code", "outside dispatch"], rows))
    if b.get("per_round_main_us"):
        text += ("\nperf µs per round (noise; the addon's figures are read inside the sidecar's own samples, so "
                 "they are steadier than sidecar − bare): " + "; ".join(
            f"{label} " + " ".join(f"{x:.0f}" for x in r["per_round_main_us"]) for label, r in (("bare", b),
                                                                                              ("sidecar", s))))
    if s.get("top_addon"):
        text += "\n" + _table(["addon function (real, main thread)", "inclusive µs/req", "self µs/req"],
                               [[t["function"][:80], t["inclusive_us"], t["self_us"]] for t in s["top_addon"][:15]])
    return text


# -- FLEET (DESIGN §9, issue 17) -----------------------------------------------------------------------
DEFAULT_THRESHOLD = 9.95  # issue 17's targets are for the default threshold
def _run_tag(r: dict[str, Any]) -> str:
    n = r.get("sidecars", 1)
    version = r.get("litellm_version", "1.80.0")
    return f"{n} sidecar{'s' if n != 1 else ''}, LiteLLM {version}, threshold {r['threshold']:.2f}"


def fleet_verdicts(f: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 17's targets per run at the default threshold: upstream budget errors per 1,000 (≤ 1 with
    one sidecar, ≤ 2 with more), none reaching a client, every retired key ≥ 99.5 % used with the
    median ≥ 100 %, metering equal to the upstream's charge (within a cent)."""
    out: list[dict[str, Any]] = []
    for r in f["runs"]:
        tag = _run_tag(r)
        if abs(r["threshold"] - DEFAULT_THRESHOLD) > 1e-9:  # the threshold sweep: the older targets
            out.append({"target": f"every retired key ≥ 99% used ({tag})", "value": r["used_min"],
                        "met": r["used_min"] is not None and r["used_min"] >= 0.99})
            out.append({"target": f"zero budget errors reach a client ({tag})",
                        "value": r["budget_errors_to_client"], "met": r["budget_errors_to_client"] == 0})
            continue
        limit = 1.0 if r.get("sidecars", 1) == 1 else 2.0
        per_1000 = r.get("upstream_budget_errors_per_1000")
        if per_1000 is not None:
            out.append({"target": f"upstream budget errors ≤ {limit:g} per 1,000 ({tag})", "value": per_1000,
                        "met": per_1000 <= limit})
        out.append({"target": f"zero budget errors reach a client ({tag})", "value": r["budget_errors_to_client"],
                    "met": r["budget_errors_to_client"] == 0})
        out.append({"target": f"every retired key ≥ 99.5% used ({tag})", "value": r["used_min"],
                    "met": r["used_min"] is not None and r["used_min"] >= 0.995})
        out.append({"target": f"median retired key ≥ 100% used ({tag})", "value": r["used_median"],
                    "met": r["used_median"] is not None and r["used_median"] >= 1.0})
        for what, field in (("stored", "max_stored_metering_error_usd"), ("first sidecar's memory",
                                                                           "max_metering_error_usd")):
            err = r.get(field)
            if err is not None or field == "max_metering_error_usd":
                out.append({"target": f"metering equals the upstream's charge, ±$0.01, {what} ({tag})",
                            "value": err, "met": err is not None and err <= 0.01})
    return out


def fleet_section(f: dict[str, Any]) -> str:
    """The FLEET table: one row per run (sidecars × LiteLLM version × threshold), then the budget used
    by every retired key."""
    pct = lambda x: "–" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    rows = [[str(r.get("sidecars", 1)), r.get("litellm_version", "1.80.0"), f"{r['threshold']:.2f}", r["retired"],
             pct(r["used_min"]), pct(r["used_median"]), pct(r["used_max"]), r["budget_errors_to_client"],
             r.get("upstream_budget_errors_per_1000"), r.get("retries_per_1000"), r.get("retried_streams_per_1000"),
             r.get("busy_refusals"), r["client_counts"]["requests"], r["client_counts"]["no_key_429"],
             r["max_metering_error_usd"], r.get("max_stored_metering_error_usd"), r.get("client_p50_ms"),
             r.get("client_p95_ms"), r["seconds"]]
            for r in f["runs"]]
    sz = f["size"]
    text = (f"\nFLEET (meter = the first sidecar's figure in memory, stored = MongoDB's; "
            f"{sz['n_keys']} keys × ${sz['budget']:.0f} + {sz['n_backups']} backups, {sz['clients']} "
            f"clients, ${sz['lo']}–${sz['hi']} per request; used = upstream charge / budget; per 1,000 client "
            "requests until the last key is spent)\n"
            + _table(["sidecars", "LiteLLM", "threshold", "retired", "used min", "median", "max", "budget err→client",
                      "upstream budget err /1k", "retries /1k", "retried streams /1k", "busy", "requests",
                      "429 no key", "max |meter−charge| $", "stored", "p50 ms", "p95 ms", "s"], rows))
    lines = []
    for r in f["runs"]:
        used = sorted(row["used_fraction"] for row in r.get("per_key", []) if row.get("status") == "exhausted")
        if used:
            lines.append(f"{_run_tag(r)}: " + " ".join(f"{100 * u:.1f}" for u in used))
    if lines:
        text += "\nbudget used per retired key, % (sorted)\n" + "\n".join(lines)
    return text
