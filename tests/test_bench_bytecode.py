"""bench.bytecode: the bytecode a request runs is counted by what actually ran, on the measuring thread only."""
from __future__ import annotations

import threading

from bench import bytecode


SAMPLE = """
def _branchy(x):
    if x > 0:
        return x + 1
    total = 0
    for i in range(x, 0):
        total += i * i - 3
    return total


def _other(x):
    return x * 2
"""
_ns: dict = {}
exec(compile(SAMPLE, "/sample/bytecode_sample.py", "exec"), _ns)  # a file of its own: the marker matches it alone
_branchy, _other = _ns["_branchy"], _ns["_other"]
MARK = ("bytecode_sample",)


def test_only_the_branch_that_ran_is_counted():
    with bytecode.Footprint(MARK) as fp:
        _branchy(5)
    got = fp.summary()
    assert got["functions"] == 1 and got["top"][0]["function"] == "_branchy"
    whole = sum(bytecode.instruction_sizes(_branchy.__code__).values())
    assert 0 < got["bytes"] < whole * 0.6  # the loop never ran
    with bytecode.Footprint(MARK) as fp2:
        _branchy(5)
        _branchy(-3)
    both = fp2.summary()
    assert whole * 0.9 < both["bytes"] <= whole and both["bytes"] > got["bytes"]  # both branches: nearly all of it
    assert both["lines"] > got["lines"]


def test_other_threads_and_other_files_are_not_counted():
    with bytecode.Footprint(MARK) as fp:
        t = threading.Thread(target=_other, args=(3,))
        t.start()
        t.join()
        threading.Event().is_set()  # the standard library's code: another file
    assert _other.__code__ not in fp.executed
    assert all("bytecode_sample" in code.co_filename for code in fp.executed)
    with bytecode.Footprint(MARK) as fp:  # the tool id is free again, and a new run counts
        _other(3)
    assert _other.__code__ in fp.executed


def test_sizes_cover_the_whole_bytecode():
    code = _branchy.__code__
    sizes = bytecode.instruction_sizes(code)
    assert sum(sizes.values()) == len(code._co_code_adaptive) and min(sizes.values()) >= 2
