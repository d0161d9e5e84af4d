"""Everything the sidecar knows about one flow, typed, behind a single `flow.metadata` key.

mitmproxy's `flow.metadata` must hold JSON-like values (objects there break `-w`, `flow.copy()` and
mitmweb), so the state is stored as a plain dict and read back into the dataclass in each hook. Every
hook reads it once, changes the object, and saves it once: nothing written in one step is lost in the next.

Reading it back is cheap on the request path: `save` remembers (in the flow's `FlowMemo`, outside
`metadata`, so no flow file or copy carries it) the dict it wrote and the state it wrote it from;
while `metadata["openhands"]` is still that dict and both still say the same, `of` returns that
state itself. A dict someone replaced or edited, or a state changed and not saved (a hook that
failed half-way), is read back from the dict the careful way.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, get_args

from mitmproxy import http

from addon.core.usage import WireFormat
from addon.traffic.flow_memo import memo_of, peek

META = "openhands"


@dataclass
class FlowState:
    local: bool = False            # answered by the sidecar itself: never metered or recovered
    admin: bool = False
    rejected: str | None = None    # why the sidecar refused the flow ("client_key", "no_key", ...)
    client: str = ""               # the client identity, whole (bindings are keyed by it)
    key_id: str | None = None
    key: str = ""                  # the pool key, masked
    format: WireFormat | None = None  # wire format of an LLM route ("chat", "messages", "responses")
    strip_usage: bool = False      # the sidecar asked for stream usage the client did not
    model: str | None = None
    tried: list[str] = field(default_factory=list)
    retries: int = 0
    rotated_from: str | None = None
    metered: bool = False
    cost: float | None = None
    cost_source: str | None = None
    tokens: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        d = self.__dict__  # the fields, in their order (a dataclass instance holds nothing else)
        out = d.copy()
        out["tried"] = d["tried"][:]  # (copies: a later change to the state is not a change to the dict)
        if d["tokens"] is not None:
            out["tokens"] = d["tokens"].copy()
        return out

    @classmethod
    def from_json(cls, data: Any) -> "FlowState":
        """Lenient: a flow file written by another version loads with what it has."""
        if not isinstance(data, dict):
            return cls()
        state = cls()
        for name, kind in _TYPES.items():
            if name in data and isinstance(data[name], kind):
                setattr(state, name, data[name])
        state.tried = [str(k) for k in state.tried]
        if state.format not in _FORMATS:
            state.format = None
        return state

    @classmethod
    def fresh(cls, client: str, format: WireFormat | None) -> "FlowState":
        """`FlowState(client=client, format=format)` for the request path: the defaults copied at once
        rather than passed through a 16-argument `__init__`."""
        state = _new(cls)
        d = _TEMPLATE.copy()
        d["client"], d["format"], d["tried"] = client, format, []
        state.__dict__ = d
        return state

    @classmethod
    def of(cls, flow: http.HTTPFlow) -> "FlowState | None":
        """The flow's state, or None for a flow the sidecar never touched."""
        data = flow.metadata.get(META)
        if not isinstance(data, dict):
            return None
        memo = peek(flow)
        if memo is not None and memo.saved is data:
            state = memo.saved_from
            if state.__dict__ == data:
                return state  # the typed state that wrote this dict, neither changed since: no re-validation
        return cls.from_json(data)

    def save(self, flow: http.HTTPFlow) -> None:
        data = self.to_json()
        flow.metadata[META] = data
        memo = memo_of(flow)
        memo.saved, memo.saved_from = data, self


_FORMATS = get_args(WireFormat)
_new = object.__new__
_TEMPLATE = dict(FlowState().__dict__)  # every field's default, in field order (`tried` replaced per state)
_NAMES = tuple(f.name for f in fields(FlowState))
_TYPES: dict[str, Any] = {
    "local": bool, "admin": bool, "rejected": str, "client": str, "key_id": str, "key": str, "format": str,
    "strip_usage": bool, "model": str, "tried": list, "retries": int, "rotated_from": str, "metered": bool,
    "cost": (int, float), "cost_source": str, "tokens": dict,
}
