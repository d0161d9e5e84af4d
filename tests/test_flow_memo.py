"""The sidecar's per-flow memory keeps mitmproxy's flow objects on CPython's fast attribute path.

A class takes new attribute names into its shared keys only until it has had a handful of instances; a flow
given a name that did not make it there gets a dict of its own, and mitmproxy's reads of that flow's
attributes go the slower way. Measured in a real mitmdump under load before `addon.traffic.flow_memo`:
811 of 831 pooled flows had lost their inline attributes. Each case runs in a fresh interpreter, since the
class's shared keys are per process.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mitmproxy.test import tflow

from addon.traffic.flow_memo import ATTR, FlowMemo, memo_of, peek
from addon.traffic.flow_state import FlowState

ROOT = Path(__file__).resolve().parent.parent

_SCENARIO = """
import _testinternalcapi
from mitmproxy.test import tflow
{before}
served = [tflow.tflow() for _ in range(100)]  # traffic: the class has had many instances
{after}
flow = tflow.tflow()
FlowState(client="c", format="chat").save(flow)  # what every pooled flow gets
memo_of(flow).sent = ()
print(_testinternalcapi.has_inline_values(flow))
"""
_IMPORT = "from addon.traffic.flow_memo import memo_of\nfrom addon.traffic.flow_state import FlowState"


def _inline_after(before: str, after: str) -> bool:
    code = textwrap.dedent(_SCENARIO).format(before=before, after=after)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("before, after, inline", [
    # as mitmdump runs it: the script (and this module) load before any flow exists
    (_IMPORT, "", True),
    # another name took the class's last free slot first: the memo still fits, its name was admitted at import
    (_IMPORT, "x = tflow.tflow(); x.someone_elses = 1", True),
    # the module imported only after traffic, with the last slot taken: the flow gets a dict of its own
    # (what every pooled flow suffered with the names set late; shows the check can fail)
    ("", f"x = tflow.tflow(); x.someone_elses = 1\n{_IMPORT}", False),
])
def test_pooled_flows_keep_inline_attributes(before: str, after: str, inline: bool) -> None:
    pytest.importorskip("_testinternalcapi")
    assert _inline_after(before, after) is inline


def test_one_memo_per_flow_made_on_first_use() -> None:
    flow = tflow.tflow()
    assert peek(flow) is None
    memo = memo_of(flow)
    assert isinstance(memo, FlowMemo) and memo_of(flow) is memo and getattr(flow, ATTR) is memo
    assert (memo.saved, memo.sent, memo.response_headers) == (None, None, None)


def test_the_memo_never_reaches_a_flow_file_or_copy() -> None:
    flow = tflow.tflow()
    FlowState(client="c", format="chat", key_id="k1").save(flow)
    assert peek(flow) is not None
    state = flow.get_state()
    assert ATTR not in state and all(not isinstance(v, FlowMemo) for v in state["metadata"].values())
    copy = flow.copy()
    assert peek(copy) is None
    assert FlowState.of(copy) == FlowState.of(flow)  # read back from the copied dict, the careful way
