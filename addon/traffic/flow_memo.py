"""What the sidecar remembers on a flow object between hooks, outside `flow.metadata` (no flow file, copy or
mitmweb view carries it): the state it saved last, the header fields it sent, the response headers it read.

One attribute, one name. CPython (3.12+) keeps an object's attributes in the object itself, with no dict of its
own, while their names are among its class's shared keys, and a class takes new names there only until it has
had a handful of instances. A name first set on flows after that gives every flow a dict of its own when it is
set, and every attribute read mitmproxy makes of a flow (hundreds per request) then goes the slower way: measured
in a real mitmdump under load, 811 of 831 pooled flows had lost their inline attributes with the three names the
sidecar used to set. So the sidecar sets one name only, and makes it known to `HTTPFlow` when this module is
imported (the script loads before any flow exists).
"""
from __future__ import annotations

from typing import Any

from mitmproxy import connection, http

ATTR = "_openhands"


class FlowMemo:
    """The sidecar's per-flow memory (see the module docstring); every field None until set."""

    __slots__ = ("saved", "saved_from", "sent", "sent_redacted", "response_fields", "response_headers")

    def __init__(self) -> None:
        self.saved: dict[str, Any] | None = None  # the dict `FlowState.save` wrote into flow.metadata
        self.saved_from: Any = None  # ... and the state it wrote it from
        self.sent: Any = None  # the request header fields the flow went out with
        self.sent_redacted: Any = None  # ... and the same fields with the pool key masked
        self.response_fields: Any = None  # the response header fields last read
        self.response_headers: Any = None  # ... and their reading (`pooled.ResponseHeaders`)


def memo_of(flow: http.HTTPFlow) -> FlowMemo:
    """The flow's memo, made on first use."""
    memo = getattr(flow, ATTR, None)
    if memo is None:
        memo = FlowMemo()
        setattr(flow, ATTR, memo)
    return memo


def peek(flow: http.HTTPFlow) -> FlowMemo | None:
    """The flow's memo if the sidecar made one."""
    return getattr(flow, ATTR, None)


def _admit_name() -> None:
    """Set the name once on a flow made for the purpose, while `HTTPFlow` still takes new names."""
    client = connection.Client(peername=("127.0.0.1", 0), sockname=("127.0.0.1", 0), timestamp_start=0.0)
    setattr(http.HTTPFlow(client, connection.Server(address=None)), ATTR, None)


_admit_name()
