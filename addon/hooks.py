"""The one guard every mitmproxy hook of the sidecar runs under.

No exception may escape a hook: mitmproxy would log a traceback and, for `request`, forward the flow
as it is, with the client's own credential. A failed `request` is answered locally with a 500 instead.

A sync hook may return an awaitable, the rest of its work (mitmproxy awaits what a hook returns): a hook
that has nothing to do for most flows then creates no coroutine for them, and what it returns is guarded
like an async hook.
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Awaitable, Callable, TypeVar

from mitmproxy import http

from addon.traffic.flow_state import FlowState
from addon.traffic.local_answers import openai_error

log = logging.getLogger("addon.openhands")

Hook = TypeVar("Hook", bound=Callable[..., Any])


def _contain(name: str, flow: Any) -> None:
    log.exception("❌ [OpenHands] %s hook failed", name)
    if name == "request" and isinstance(flow, http.HTTPFlow) and flow.response is None:
        flow.response = openai_error(500, "OpenHands key-pool sidecar internal error", "internal_error")
        FlowState(local=True).save(flow)


def guarded(hook: Hook) -> Hook:
    """Wrap a sync or async hook `(self, flow)`: log a failure once, answer a failed request locally."""
    name = hook.__name__
    if inspect.iscoroutinefunction(hook):
        async_hook: Callable[..., Awaitable[Any]] = hook

        @functools.wraps(hook)
        async def run_async(self: Any, flow: Any) -> None:
            try:
                await async_hook(self, flow)
            except Exception:
                _contain(name, flow)

        return run_async  # type: ignore[return-value]

    @functools.wraps(hook)
    def run(self: Any, flow: Any) -> Awaitable[None] | None:
        try:
            rest = hook(self, flow)
        except Exception:
            _contain(name, flow)
            return None
        return None if rest is None else _finish(name, flow, rest)

    return run  # type: ignore[return-value]


async def _finish(name: str, flow: Any, rest: Awaitable[Any]) -> None:
    """The awaitable a sync hook returned, under the same guard."""
    try:
        await rest
    except Exception:
        _contain(name, flow)
