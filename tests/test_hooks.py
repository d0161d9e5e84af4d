"""The one guard of every hook (addon.hooks.guarded): nothing escapes, a failed `request` is answered with a
500 and never forwarded — also when a sync hook hands back the rest of its work as an awaitable."""
from __future__ import annotations

import asyncio
import logging

import pytest
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import taddons, tflow

from addon.hooks import guarded
from addon.traffic.flow_state import FlowState


class Part:
    def __init__(self, fail: str) -> None:
        self.fail, self.calls = fail, []

    @guarded
    def request(self, flow):
        """Sync when nothing is left to do; else returns a coroutine (like /metrics and the admin API)."""
        self.calls.append("sync")
        if self.fail == "sync":
            raise RuntimeError("boom")
        if self.fail == "none":
            return None
        return self._rest(flow)

    async def _rest(self, flow):
        await asyncio.sleep(0)
        self.calls.append("rest")
        if self.fail == "rest":
            raise RuntimeError("boom")


@pytest.mark.parametrize("fail, calls, answered", [
    ("none", ["sync"], False),                  # nothing to do: nothing returned, nothing to await
    ("no", ["sync", "rest"], False),            # the rest runs when mitmproxy awaits what the hook returned
    ("sync", ["sync"], True),                   # a failure before any await: answered 500 at once
    ("rest", ["sync", "rest"], True),           # a failure in the returned part: contained, answered 500
])
def test_a_sync_hook_and_the_rest_it_returns_run_under_the_guard(fail, calls, answered, caplog):
    caplog.set_level(logging.ERROR)
    part, f = Part(fail), tflow.tflow()
    returned = []

    async def run():
        with taddons.context(part) as tctx:
            await tctx.master.addons.invoke_addon(part, HttpRequestHook(f))  # what mitmproxy does per event
            pending = part.request(tflow.tflow())
            returned.append(pending is not None)
            if pending is not None:
                await pending

    asyncio.run(run())
    assert part.calls == calls * 2
    assert returned == [fail in ("no", "rest")]  # no coroutine made when the hook had nothing left to do
    assert (f.response is not None and f.response.status_code == 500) is answered
    if answered:
        assert FlowState.of(f).local and "request hook failed" in caplog.text
