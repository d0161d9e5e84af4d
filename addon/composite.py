"""One node in mitmproxy's addon tree for the sidecar's small addons.

mitmproxy walks its whole addon tree on every event (about twenty per proxied request, `update` included),
looking each hook name up on every addon. Seven addons listed in the script cost ~3.7 µs per event that
way, one node ~1.2 µs (`bench`-style comparison in the closing note of issue 13). `compose` keeps the
small addons exactly as they are — each one still is an ordinary mitmproxy addon, and tests load them
one by one — and hands mitmproxy a single object whose class has only the hooks some part implements,
each calling those parts in order, as mitmproxy's own traversal would.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import mitmproxy.addonmanager  # noqa: F401 - these imports register every hook name in hooks.all_hooks
import mitmproxy.log  # noqa: F401
import mitmproxy.proxy.layers  # noqa: F401
import mitmproxy.proxy.server_hooks  # noqa: F401
from mitmproxy import ctx, hooks

__all__ = ["compose"]


def _dispatch(name: str, parts: Sequence[object]) -> Callable[..., Any] | None:
    funcs = [f for f in (getattr(p, name, None) for p in parts) if callable(f)]
    if not funcs:
        return None
    if len(funcs) == 1:
        only = funcs[0]
        if inspect.iscoroutinefunction(only):
            async def one_async(self: Any, *args: Any) -> None:
                await only(*args)
            return one_async

        def one(self: Any, *args: Any) -> Any:
            return only(*args)
        return one
    if any(inspect.iscoroutinefunction(f) for f in funcs):
        async def several_async(self: Any, *args: Any) -> None:
            for f in funcs:
                res = f(*args)
                if res is not None and inspect.isawaitable(res):
                    await res
        return several_async

    def several(self: Any, *args: Any) -> None:
        for f in funcs:
            f(*args)
    return several


def compose(parts: Sequence[object], name: str = "openhands") -> object:
    """A single addon dispatching every mitmproxy event to `parts` in order (no `addons` attribute, so
    mitmproxy never descends into them); their commands are registered when it loads."""
    methods: dict[str, Any] = {}
    for hook in hooks.all_hooks:
        fn = _dispatch(hook, parts)
        if fn is not None:
            fn.__name__ = hook
            methods[hook] = fn
    part_load = methods.pop("load", None)

    def load(self: Any, loader: Any) -> None:
        if part_load is not None:
            part_load(self, loader)
        for p in parts:  # mitmproxy collects commands from the addons it traverses: ours it does not
            ctx.master.commands.collect_commands(p)
    methods["load"] = load
    methods["parts"] = tuple(parts)
    methods["name"] = name
    methods["__repr__"] = lambda self: f"<{name}: {', '.join(type(p).__name__ for p in parts)}>"
    methods["__doc__"] = "The sidecar's addons as one node of mitmproxy's addon tree (addon.composite)."
    return type("OpenHandsAddons", (), methods)()
