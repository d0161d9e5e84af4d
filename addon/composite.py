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
from typing import Any, Awaitable, Callable, Sequence

import mitmproxy.addonmanager  # noqa: F401 - these imports register every hook name in hooks.all_hooks
import mitmproxy.log  # noqa: F401
import mitmproxy.proxy.layers  # noqa: F401
import mitmproxy.proxy.server_hooks  # noqa: F401
from mitmproxy import ctx, hooks

__all__ = ["compose"]


def _dispatch(name: str, parts: Sequence[object]) -> Callable[..., Any] | None:
    """The event's handler: the parts' hooks called in order, each awaitable awaited before the next part.

    Sync: a hook that returns None (most do, for most flows) costs no coroutine; the first awaitable
    returned is handed to mitmproxy as it is when no part is left to call, else with the rest of the
    parts after it (`_rest`)."""
    funcs = tuple(f for f in (getattr(p, name, None) for p in parts) if callable(f))
    if not funcs:
        return None
    if len(funcs) == 1:
        return funcs[0]  # the part's own bound hook: mitmproxy calls and awaits it as it would the part's
    count = len(funcs)

    def several(*args: Any) -> Any:
        done = 0
        for f in funcs:
            done += 1
            res = f(*args)
            if res is not None and inspect.isawaitable(res):
                return res if done == count else _rest(res, funcs[done:], args)
        return None
    return several


async def _rest(pending: Awaitable[Any], funcs: Sequence[Callable[..., Any]], args: tuple[Any, ...]) -> None:
    """A part's awaitable, then the parts after it, in order (each awaitable awaited)."""
    await pending
    for f in funcs:
        res = f(*args)
        if res is not None and inspect.isawaitable(res):
            await res


def compose(parts: Sequence[object], name: str = "openhands") -> object:
    """A single addon dispatching every mitmproxy event to `parts` in order (no `addons` attribute, so
    mitmproxy never descends into them); their commands are registered when it loads.

    The event handlers are attributes of the node itself, not methods of its class: mitmproxy looks a
    hook up on every addon for every event, and an instance attribute is handed over as it is (no bound
    method made each time)."""
    handlers: dict[str, Any] = {}
    for hook in hooks.all_hooks:
        fn = _dispatch(hook, parts)
        if fn is not None:
            handlers[hook] = fn
    part_load = handlers.pop("load", None)

    def load(self: Any, loader: Any) -> None:
        if part_load is not None:
            part_load(loader)
        for p in parts:  # mitmproxy collects commands from the addons it traverses: ours it does not
            ctx.master.commands.collect_commands(p)
    cls = type("OpenHandsAddons", (), {
        "load": load,
        "parts": tuple(parts),
        "name": name,
        "__repr__": lambda self: f"<{name}: {', '.join(type(p).__name__ for p in parts)}>",
        "__doc__": "The sidecar's addons as one node of mitmproxy's addon tree (addon.composite).",
    })
    node = cls()
    node.__dict__.update(handlers)
    return node
