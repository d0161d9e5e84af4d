"""Compare addon trees (and bare mitmdump) co-scheduled: did this change make the request path cheaper?

    python -m bench.trees [--sse] [--concurrency 16] [--rounds 8] [--duration 4] TARGET TARGET [TARGET]

A TARGET is `bare` (mitmdump --mode reverse; with --sse the three-line streaming addon), `floor`
(bench/minimal_addon.py) or a directory holding an `addon/` tree (a clone, a worktree, a copy: its `addon/`
and `pricing/` are copied first, so editing it during the run changes nothing). Each sidecar runs on its
embedded database with 20 keys. All targets share one pinned core and are loaded at the same moment
(bench.cosched), so the ratios to the first target cancel the machine's drift. Keep it to three targets:
each one adds a load generator on the load side, and a saturated load side reads every ratio as 1.

A feature's share of the cost can be found the same way: a copy of the tree with that feature cut out,
against the tree itself (stop 25 measured, at JSON c=16: the whole pooled path 13-15 %, the write-behind
~2 %, the flow observer ~1 %, every other part within the ±3 % a round moves).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from bench import cosched
from bench.overhead import STARTUP_S, add_keys, loadgen, loadgen_command, payloads, setup_fake_and_keys
from bench.procs import AddonMitm, BareMitm, descendants, workdir
from tests.harness import ADDON, Sidecar

FLOOR = Path(__file__).with_name("minimal_addon.py")
MAX_TARGETS = 3


def target_kind(spec: str) -> str:
    """`bare`, `floor` or `tree` (a directory with addon/openhands.py); ValueError for anything else."""
    if spec in ("bare", "floor"):
        return spec
    if spec and (Path(spec) / "addon" / "openhands.py").is_file():
        return "tree"
    raise ValueError(f"{spec!r} is neither bare, floor nor a directory holding addon/openhands.py")


def labels_for(specs: list[str]) -> list[str]:
    """One label per target, unique and short: `1:bare`, `2:main`, `3:main` (the position keeps repeats apart)."""
    return [f"{i}:{Path(s.rstrip('/')).name or s}" for i, s in enumerate(specs, 1)]


class TreeSidecar(AddonMitm):
    """A sidecar running the addon of another tree (a copy of it, see the module docstring)."""

    def __init__(self, wd: Path, upstream: str, tree: Path, name: str) -> None:
        self.tree = tree
        super().__init__(wd, upstream, "embedded", name=name)

    def command(self) -> list[str]:
        cmd = Sidecar.command(self)
        cmd[cmd.index(str(ADDON))] = str(self.tree / "addon" / "openhands.py")
        return cmd


def _copy_tree(src: Path, dst: Path) -> Path:
    for d in ("addon", "pricing"):
        if (src / d).is_dir():
            shutil.copytree(src / d, dst / d, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def run(specs: list[str], sse: bool = False, concurrency: int = 16, rounds: int = 8, duration: float = 4.0,
        warmup: float = 0.5) -> dict[str, Any]:
    kinds = [target_kind(s) for s in specs]
    if not 2 <= len(specs) <= MAX_TARGETS:
        raise ValueError(f"compare 2 to {MAX_TARGETS} targets, not {len(specs)}")
    wd = workdir("trees")
    fake, keys = setup_fake_and_keys(wd, 20)
    body = payloads()["sse" if sse else "json"]
    started: list[Any] = []
    try:
        ports: dict[str, int] = {}
        pids: dict[str, int] = {}
        for label, spec, kind in zip(labels_for(specs), specs, kinds, strict=True):
            d = wd / label.replace(":", "-")
            if kind == "bare":
                m: Any = BareMitm(d, fake.url, name="bare", stream_sse=sse)
            elif kind == "floor":
                d.mkdir(parents=True)
                shutil.copyfile(FLOOR, d / "floor.py")  # a copy: mitmdump reloads a script whose file changes
                m = BareMitm(d, fake.url, extra=["-s", str(d / "floor.py")], name="floor")
            else:
                m = TreeSidecar(d, fake.url, _copy_tree(Path(spec), d / "tree"), name="sidecar")
                m.start()
                add_keys(m, keys)
            started.append(m)
            ports[label] = m.port
            pids[label] = m.pid
        for port in ports.values():  # steady state first (a sidecar's first seconds take the general key choice)
            loadgen(port, 16, STARTUP_S, 0.0, body)
        children = [c for p in pids.values() for c in descendants(p)]
        labels = list(ports)
        case = {"payload": "sse" if sse else "json", "concurrency": concurrency, "baseline": labels[0],
                "commands": {lb: loadgen_command(ports[lb], concurrency, duration, warmup, body) for lb in labels}}
        result = cosched.measure([case], list(pids.values()), [fake.proc.pid, *children],
                                 [fake.proc.pid, *pids.values(), *children], rounds, duration, warmup)
        return {"targets": dict(zip(labels, specs, strict=True)), **result}
    finally:
        for m in reversed(started):
            m.stop()
        fake.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.trees", description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="+", help="bare | floor | a directory holding addon/ (2 or 3 of them)")
    ap.add_argument("--sse", action="store_true", help="10-event streams instead of JSON answers")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = ap.parse_args(argv)
    try:
        for s in args.targets:
            target_kind(s)
        if not 2 <= len(args.targets) <= MAX_TARGETS:
            raise ValueError(f"compare 2 to {MAX_TARGETS} targets, not {len(args.targets)}")
    except ValueError as e:
        ap.error(str(e))
    res = run(args.targets, args.sse, args.concurrency, args.rounds, args.duration)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    row = res["rows"][0]
    print(f"co-scheduled ({'pinned' if res['pinned'] else 'NOT pinned: ' + res.get('why', '')}), "
          f"{row['payload']} c={row['concurrency']}, {res['rounds']} rounds x {res['duration_s']} s; "
          f"requests/s from mean latency; ratios to {row['baseline']}")
    for label, ratio in row["ratios"].items():
        print(f"  {label:24s} median {ratio['median']:.3f}  range {ratio['min']:.3f}-{ratio['max']:.3f}  "
              f"per round {' '.join(f'{x:.3f}' for x in ratio['per_round'])}")
    print(f"  busy share: targets' core {row['busy']['targets']}, load side {row['busy']['load']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
