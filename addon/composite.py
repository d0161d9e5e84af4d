"""One node in mitmproxy's addon tree for the sidecar's small addons.

mitmproxy walks its whole addon tree on every event (about sixteen per proxied request, `update` included),
looking each hook name up on every addon, one generator per level. Seven addons listed in the script cost
~3.7 µs per event that way, one node ~1.2 µs (`bench`-style comparison in the closing note of issue 13).
The small addons stay exactly as they are — each one still is an ordinary mitmproxy addon, and tests load
them one by one. `handlers` makes the hooks of a single node: only the hooks some part implements, each
calling those parts in order, as mitmproxy's own traversal would. The script module itself is that node
(`addon/openhands.py` takes them as module attributes: the walk ScriptLoader -> Script -> module ends
there, one level less than a node below the module); `compose` wraps them in an object, for tests and for
anyone embedding the sidecar in their own addon list.
"""
from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable, Sequence

import mitmproxy.addonmanager  # noqa: F401 - these imports register every hook name in hooks.all_hooks
import mitmproxy.log  # noqa: F401
import mitmproxy.proxy.layers  # noqa: F401
import mitmproxy.proxy.server_hooks  # noqa: F401
from mitmproxy import ctx, hooks

__all__ = ["compose", "handlers"]


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
    if count == 2 and len(inspect.signature(hooks.all_hooks[name]).parameters) == 1:  # the event's fields
        return _pair(*funcs)

    def several(*args: Any) -> Any:
        done = 0
        for f in funcs:
            done += 1
            res = f(*args)
            if res is not None and inspect.isawaitable(res):
                return res if done == count else _rest(res, funcs[done:], args)
        return None
    return several


def _pair(first: Callable[[Any], Any], second: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`several` for two parts of a one-argument event (every flow event is one): the same calls, without
    the loop and the argument tuple — a third of its instructions, on every request, response and error."""
    def pair(arg: Any) -> Any:
        res = first(arg)
        if res is not None and inspect.isawaitable(res):
            return _rest(res, (second,), (arg,))
        res = second(arg)
        return res if res is not None and inspect.isawaitable(res) else None
    return pair


async def _rest(pending: Awaitable[Any], funcs: Sequence[Callable[..., Any]], args: tuple[Any, ...]) -> None:
    """A part's awaitable, then the parts after it, in order (each awaitable awaited)."""
    await pending
    for f in funcs:
        res = f(*args)
        if res is not None and inspect.isawaitable(res):
            await res


def handlers(parts: Sequence[object]) -> dict[str, Callable[..., Any]]:
    """The hooks of one node standing for `parts`: {hook name: handler} for every hook some part implements,
    and `load`, which also registers the parts' commands (mitmproxy collects commands only from the addons
    it traverses, and it never descends into the parts). The script module takes them as its own
    attributes (`addon/openhands.py`), so mitmproxy's per-event walk ends at the module."""
    found: dict[str, Callable[..., Any]] = {}
    for hook in hooks.all_hooks:
        fn = _dispatch(hook, parts)
        if fn is not None:
            found[hook] = fn
    part_load = found.get("load")

    def load(loader: Any) -> None:
        if part_load is not None:
            part_load(loader)
        for p in parts:
            ctx.master.commands.collect_commands(p)
    found["load"] = load
    return found


def compose(parts: Sequence[object], name: str = "openhands") -> object:
    """A single addon dispatching every mitmproxy event to `parts` in order (no `addons` attribute, so
    mitmproxy never descends into them); their commands are registered when it loads.

    The event handlers are attributes of the node itself, not methods of its class: mitmproxy looks a
    hook up on every addon for every event, and an instance attribute is handed over as it is (no bound
    method made each time)."""
    cls = type("OpenHandsAddons", (), {
        "parts": tuple(parts),
        "name": name,
        "__repr__": lambda self: f"<{name}: {', '.join(type(p).__name__ for p in parts)}>",
        "__doc__": "The sidecar's addons as one node of mitmproxy's addon tree (addon.composite).",
    })
    node = cls()
    node.__dict__.update(handlers(parts))
    return node
