"""`python -m bench [--quick] [--only overhead,streaming,slowstore,fleet,profile] [--out bench/results/latest.json]`

Runs the benchmarks of DESIGN §9 (see bench/README.md), prints a table and writes everything as JSON.
`instructions` (callgrind, ~10 minutes), `cache` (callgrind's cache simulation, ~6 minutes) and `realprofile` (perf, a
few minutes) run only when named in `--only`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from bench import procs
from bench.report import render, verdicts

DEFAULT = ("overhead", "streaming", "slowstore", "fleet", "profile", "crash", "scale")
ALL = (*DEFAULT, "instructions", "cache", "realprofile")


def runners() -> dict[str, Callable[..., dict[str, Any]]]:
    from bench import (crash, fleet, instructions, overhead, profile_request, real_profile, scale, slow_store,
                       streaming)
    return {"overhead": overhead.run, "streaming": streaming.run, "slowstore": slow_store.run,
            "fleet": fleet.run, "profile": profile_request.run, "crash": crash.run,
            "scale": scale.run, "instructions": instructions.run, "cache": instructions.run_cache,
            "realprofile": real_profile.run}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[2])
    ap.add_argument("--quick", action="store_true", help="short runs (about 3 minutes in all)")
    ap.add_argument("--tiny", action="store_true", help="smallest sizes: checks the machinery, numbers mean little")
    ap.add_argument("--only", default=",".join(DEFAULT), help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--out", default="bench/results/latest.json")
    a = ap.parse_args(argv)
    only = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown = [x for x in only if x not in ALL]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)} (choose from {', '.join(ALL)})")
    mode = "tiny" if a.tiny else "quick" if a.quick else "full"
    result: dict[str, Any] = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mode": mode,
                              "machine": procs.machine(), "code": procs.code_version(),
                              "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                              "benchmarks": {}, "errors": {}}
    run = runners()
    t_all = time.monotonic()
    for name in only:
        print(f"[bench] {name} ({mode}) …", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            res = run[name](quick=a.quick, tiny=a.tiny)
            res["elapsed_s"] = round(time.monotonic() - t0, 1)
            result["benchmarks"][name] = res
        except Exception as e:  # one failing benchmark must not hide the others' numbers
            result["errors"][name] = f"{e.__class__.__name__}: {e}"
            traceback.print_exc()
    result["elapsed_s"] = round(time.monotonic() - t_all, 1)
    result["verdicts"] = verdicts(result["benchmarks"])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    print(f"\nJSON: {out}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
