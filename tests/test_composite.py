"""The script's addons as one node of mitmproxy's addon tree (addon.composite): every event still reaches
every part that handles it, in order, awaited; options and commands of the parts are registered."""
from __future__ import annotations

import asyncio

import pytest
from mitmproxy import addonmanager, command
from mitmproxy.test import taddons, tflow

from addon.composite import compose


class SyncPart:
    def __init__(self, calls: list[str], tag: str) -> None:
        self.calls, self.tag = calls, tag

    def load(self, loader) -> None:
        loader.add_option(f"composite_{self.tag}", int, 1, "a test option")
        self.calls.append(f"{self.tag}.load")

    def configure(self, updated) -> None:
        self.calls.append(f"{self.tag}.configure")

    def responseheaders(self, flow) -> None:
        self.calls.append(f"{self.tag}.responseheaders")

    @command.command("composite.echo")
    def echo(self, text: str) -> str:
        return f"{self.tag}:{text}"


class AsyncPart:
    def __init__(self, calls: list[str], tag: str) -> None:
        self.calls, self.tag = calls, tag

    async def request(self, flow) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"{self.tag}.request")

    def responseheaders(self, flow) -> None:
        self.calls.append(f"{self.tag}.responseheaders")

    async def response(self, flow) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"{self.tag}.response")


def test_the_script_module_is_the_one_node_mitmproxy_walks() -> None:
    """mitmproxy walks ScriptLoader -> Script -> the script's module on every event: the module carries the
    composed hooks itself and has no `addons`, so the walk ends there (was: the module, then one node)."""
    import addon.openhands as oh

    assert not hasattr(oh, "addons")
    assert list(addonmanager.traverse([oh])) == [oh]
    assert [type(p).__name__ for p in oh.parts] == [type(p).__name__ for p in oh.default_addons()]
    hook_names = {n for n in dir(oh) if n in addonmanager.hooks.all_hooks}
    assert hook_names == set(compose(oh.parts).__dict__)  # no imported name mistaken for a hook
    assert {"load", "configure", "running", "done", "request", "responseheaders", "response", "error"} \
        <= hook_names


def test_the_script_module_loads_on_mitmproxy_with_the_sidecars_commands_and_options() -> None:
    import addon.openhands as oh

    with taddons.context(oh) as tctx:
        assert tctx.master.addons.get("openhands") is oh
        assert {"openhands.keys", "openhands.add", "openhands.rotate", "openhands.budget"} \
            <= set(tctx.master.commands.commands)
        assert tctx.options.openhands_spend_threshold == "9.95"


@pytest.mark.parametrize("hook, expected", [
    ("request", ["b.request", "c.request"]),                      # async parts, each awaited, in order
    ("responseheaders", ["a.responseheaders", "b.responseheaders"]),  # a sync and an async part's sync hook
    ("response", ["b.response"]),                                 # a single async part
])
def test_each_event_reaches_the_parts_that_handle_it_in_order(hook, expected) -> None:
    calls: list[str] = []
    node = compose([SyncPart(calls, "a"), AsyncPart(calls, "b"), AsyncPart(calls, "c") if hook == "request"
                    else object()])

    async def run() -> None:
        with taddons.context(node) as tctx:
            calls.clear()
            event = addonmanager.hooks.all_hooks[hook](tflow.tflow(resp=True))
            await tctx.master.addons.trigger_event(event)

    asyncio.run(run())
    assert calls == expected


def test_options_and_commands_of_the_parts_are_registered() -> None:
    calls: list[str] = []
    node = compose([SyncPart(calls, "a")])
    with taddons.context(node) as tctx:
        assert calls == ["a.load"] and tctx.options.composite_a == 1
        tctx.configure(node, composite_a=2)                           # an option set reaches the part
        assert calls[-1] == "a.configure" and tctx.options.composite_a == 2
        assert tctx.master.commands.call_strings("composite.echo", ["hi"]) == "a:hi"
        assert not hasattr(node, "request")                           # only the hooks some part implements


def test_the_sidecars_commands_and_options_reach_mitmproxy_through_the_node() -> None:
    import addon.openhands as oh

    with taddons.context(compose(oh.default_addons())) as tctx:
        assert {"openhands.keys", "openhands.add", "openhands.rotate", "openhands.budget"} \
            <= set(tctx.master.commands.commands)
        assert tctx.options.openhands_spend_threshold == "9.95" and tctx.options.openhands_drain_past_point is True


class DeferringPart:
    """A sync hook that returns the rest of its work (what the sidecar's /metrics and admin hooks do)."""

    def __init__(self, calls: list[str], tag: str, defer: bool) -> None:
        self.calls, self.tag, self.defer = calls, tag, defer

    def request(self, flow):
        self.calls.append(f"{self.tag}.sync")
        return self._rest() if self.defer else None

    async def _rest(self) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"{self.tag}.rest")


@pytest.mark.parametrize("defer, expected", [
    ((False, False, True), ["a.sync", "b.sync", "c.sync", "c.rest"]),
    ((True, False, False), ["a.sync", "a.rest", "b.sync", "c.sync"]),  # b waits for a's rest
    ((False, True, True), ["a.sync", "b.sync", "b.rest", "c.sync", "c.rest"]),
    ((False, False, False), ["a.sync", "b.sync", "c.sync"]),
    ((True, True), ["a.sync", "a.rest", "b.sync", "b.rest"]),  # two parts (the script's flow events)
    ((True, False), ["a.sync", "a.rest", "b.sync"]),
    ((False, True), ["a.sync", "b.sync", "b.rest"]),
    ((False, False), ["a.sync", "b.sync"]),
])
def test_what_a_part_returns_is_awaited_before_the_next_part_runs(defer, expected) -> None:
    calls: list[str] = []
    node = compose([DeferringPart(calls, tag, d) for tag, d in zip("abc"[:len(defer)], defer, strict=True)])

    async def run() -> None:
        with taddons.context(node) as tctx:
            await tctx.master.addons.trigger_event(addonmanager.hooks.all_hooks["request"](tflow.tflow()))

    asyncio.run(run())
    assert calls == expected
