"""The addon's bytecode one request executes: how many functions, bytes and 64-byte lines of it.

Why it is measured: callgrind's cache simulation (`python -m bench --only cache`) shows the sidecar's real cost is
not its instruction count (+5 % of a bare mitmdump's) but its misses of the CPU's L2 (+80 %), and most of what the
hooks miss is their own bytecode: CPython 3.13 keeps each function's bytecode, with its specialization caches, in
the code object, and between two requests mitmproxy's own work evicts it. So the bytecode a request runs is a
figure that predicts the real cost, and it is deterministic: the same code path reads the same number on any host.

`Footprint` records, with `sys.monitoring`'s INSTRUCTION events, every instruction offset the thread that made it
executes in code under the given path markers (other code is disabled at once: one event per location);
`summary` turns the offsets into bytes (each instruction with its inline caches) and distinct 64-byte lines
(offsets from the start of the bytecode: the real alignment moves a line's boundary, not the count by more than
one per function).
"""
from __future__ import annotations

import dis
import sys
import threading
from types import CodeType
from typing import Any

LINE = 64
_TOOL_IDS = (3, 4)  # (0 debugger, 1 coverage, 2 profiler (cProfile), 5 optimizer)


def instruction_sizes(code: CodeType) -> dict[int, int]:
    """{offset: bytes} of every instruction, inline caches included."""
    offsets = [i.offset for i in dis.get_instructions(code)]
    end = len(code._co_code_adaptive) if hasattr(code, "_co_code_adaptive") else len(code.co_code)
    return {off: nxt - off for off, nxt in zip(offsets, [*offsets[1:], end], strict=True)}


def summary(executed: dict[CodeType, set[int]], top: int = 12) -> dict[str, Any]:
    """Functions, bytes and distinct lines of the executed instructions; the functions with the most bytes."""
    rows = []
    for code, offsets in executed.items():
        sizes = instruction_sizes(code)
        nbytes, lines = 0, set()
        for off in offsets:
            size = sizes.get(off, 2)
            nbytes += size
            lines.update(range(off // LINE, (off + size - 1) // LINE + 1))
        rows.append((code, nbytes, len(lines)))
    rows.sort(key=lambda r: -r[1])
    return {"functions": len(rows), "bytes": sum(r[1] for r in rows), "lines": sum(r[2] for r in rows),
            "top": [{"function": c.co_qualname, "where": f"{_short(c.co_filename)}:{c.co_firstlineno}",
                     "bytes": b, "lines": n} for c, b, n in rows[:top]]}


def _short(path: str) -> str:
    for marker in ("/addon/", "/pricing/"):
        if marker in path:
            return marker[1:] + path.split(marker, 1)[1]
    return path


class Footprint:
    """`with Footprint(("/addon/",)) as fp: ...`, then `fp.summary()`. Needs Python >= 3.12 (sys.monitoring)."""

    def __init__(self, markers: tuple[str, ...]) -> None:
        self.markers = markers
        self.thread = threading.get_ident()  # the event loop's: other threads' work (the writer's) is not counted
        self.executed: dict[CodeType, set[int]] = {}
        self.tool: int | None = None

    def __enter__(self) -> "Footprint":
        mon = sys.monitoring
        for tool in _TOOL_IDS:
            if mon.get_tool(tool) is None:
                mon.use_tool_id(tool, "bench-bytecode")
                self.tool = tool
                break
        else:
            raise RuntimeError("no free sys.monitoring tool id")
        mon.register_callback(self.tool, mon.events.INSTRUCTION, self._seen)
        mon.set_events(self.tool, mon.events.INSTRUCTION)
        return self

    def __exit__(self, *exc: object) -> None:
        mon = sys.monitoring
        assert self.tool is not None
        mon.set_events(self.tool, 0)
        mon.register_callback(self.tool, mon.events.INSTRUCTION, None)
        mon.free_tool_id(self.tool)
        mon.restart_events()

    def _seen(self, code: CodeType, offset: int) -> Any:
        if not any(m in code.co_filename for m in self.markers):
            return sys.monitoring.DISABLE
        if threading.get_ident() != self.thread:
            return None  # (not DISABLE: that would stop the event at this instruction for every thread)
        found = self.executed.get(code)
        if found is None:
            found = self.executed[code] = set()
        found.add(offset)
        return None

    def summary(self, top: int = 12) -> dict[str, Any]:
        return summary(self.executed, top)
