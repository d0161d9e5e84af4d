"""`SSE-LLM`: a mitmproxy contentview for LLM server-sent-event bodies (chat, messages, responses).

Shows, in this order: each event on one line, the reassembled text (per choice / content block /
output item, tool-call arguments included), then the usage and cost. Cost comes from what the sidecar
metered for the flow (`flow.metadata["openhands"]`, which knows the upstream's cost header and the
usage chunk that was stripped from the client's copy); otherwise it is computed from the body with the
bundled price table.

With mitmproxy's default `store_streamed_bodies=false` a streamed body is not kept: the view then shows
the sidecar's metered figures and says how to keep bodies. The view never raises (mitmproxy would fall
back to raw, but a traceback in mitmweb helps nobody): anything unexpected becomes a line of text.
The name is letters and dashes only: mitmweb fetches views by name in a URL.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from addon.core.metering import parse_money
from addon.core.sse import SSEEvent, SSEParser, StreamUsage
from addon.core.usage import Usage, WireFormat, wire_format_for_path
from addon.traffic.flow_state import META

log = logging.getLogger(__name__)

NAME = "SSE-LLM"
MAX_EVENT_CHARS = 160  # one event per line; the full event is in the raw view
MAX_EVENTS_LISTED = 2000

try:  # mitmproxy >= 12
    from mitmproxy.contentviews import Contentview, Metadata
except ImportError:  # mitmproxy 11: no new-style contentviews; the addon works without this view
    Contentview = object  # type: ignore[assignment,misc]
    Metadata = Any  # type: ignore[assignment,misc]


# -- pure helpers ---------------------------------------------------------------------------------
def sniff_format(events: list[SSEEvent]) -> WireFormat:
    """Which of the three formats a body is, when neither the flow nor its path says."""
    for ev in events[:20]:
        name = ev.event or ""
        if name.startswith(("message_", "content_block_")) or '"message_start"' in ev.data:
            return "messages"
        if name.startswith("response.") or '"type":"response.' in ev.data.replace(" ", ""):
            return "responses"
    return "chat"


def _short(text: str, limit: int = MAX_EVENT_CHARS) -> str:
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json(data: str) -> dict | None:
    try:
        obj = json.loads(data)
    except Exception:
        return None
    return obj if isinstance(obj, dict) else None


@dataclass
class Part:
    """One reassembled piece of output: a choice, a content block, an output item."""

    label: str
    text: list[str] = field(default_factory=list)

    def add(self, s: Any) -> None:
        if isinstance(s, str) and s:
            self.text.append(s)


class Assembler:
    """Concatenates deltas per output part, in first-seen order."""

    def __init__(self) -> None:
        self.parts: dict[str, Part] = {}

    def part(self, key: str, label: str) -> Part:
        p = self.parts.get(key)
        if p is None:
            p = self.parts[key] = Part(label)
        return p

    def feed(self, fmt: WireFormat, ev: SSEEvent) -> None:
        if ev.data == "[DONE]":
            return
        obj = _json(ev.data)
        if obj is None:
            return
        if fmt == "chat":
            self._chat(obj)
        elif fmt == "messages":
            self._messages(obj, ev.event)
        else:
            self._responses(obj, ev.event)

    def _chat(self, obj: dict) -> None:
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            i = choice.get("index", 0)
            delta = d if isinstance(d := choice.get("delta"), dict) else {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                self.part(f"c{i}r", f"choice {i} · reasoning").add(reasoning)
            if delta.get("content"):
                self.part(f"c{i}", f"choice {i} · text").add(delta["content"])
            for call in delta.get("tool_calls") or []:
                if not isinstance(call, dict):
                    continue
                fn = f if isinstance(f := call.get("function"), dict) else {}
                base = f"choice {i} · tool call"
                p = self.part(f"c{i}t{call.get('index', 0)}", base)
                if fn.get("name") and p.label == base:  # the name arrives in the first delta only
                    p.label = f"{base} {fn['name']}"
                p.add(fn.get("arguments"))

    def _messages(self, obj: dict, event: str | None) -> None:
        kind = obj.get("type", event)
        i = obj.get("index", 0)
        if kind == "content_block_start":
            block = b if isinstance(b := obj.get("content_block"), dict) else {}
            btype = block.get("type", "block")
            label = f"block {i} · {btype}" + (f" {block['name']}" if block.get("name") else "")
            p = self.part(f"b{i}", label)
            p.add(block.get("text"))
            p.add(block.get("thinking"))
        elif kind == "content_block_delta":
            delta = d if isinstance(d := obj.get("delta"), dict) else {}
            p = self.part(f"b{i}", f"block {i}")
            for name in ("text", "thinking", "partial_json"):
                p.add(delta.get(name))
        elif kind == "error":
            err = e if isinstance(e := obj.get("error"), dict) else {}
            self.part("err", "error").add(str(err.get("message") or obj))

    def _responses(self, obj: dict, event: str | None) -> None:
        kind = str(obj.get("type", event) or "")
        i = obj.get("output_index", 0)
        if kind == "response.output_item.added":
            item = it if isinstance(it := obj.get("item"), dict) else {}
            label = f"output {i} · {item.get('type', 'item')}" + (f" {item['name']}" if item.get("name") else "")
            self.part(f"o{i}", label)
        elif kind in ("response.output_text.delta", "response.function_call_arguments.delta",
                      "response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            self.part(f"o{i}", f"output {i}").add(obj.get("delta"))
        elif kind in ("response.failed", "error"):
            self.part("err", "error").add(json.dumps(obj.get("response", obj).get("error") if isinstance(
                obj.get("response", obj), dict) else obj)[:500])

    def text(self) -> list[tuple[str, str]]:
        return [(p.label, "".join(p.text)) for p in self.parts.values()]


@lru_cache(maxsize=1)
def _price_table():
    from pricing.table import PriceTable

    return PriceTable.load_bundled()


def body_cost(usage: Usage | None, header_cost: str | None) -> tuple[float | None, str]:
    """Cost of a body by DESIGN §6's rule, without the sidecar's live table (header, usage.cost, bundled)."""
    h = parse_money(header_cost)
    if h is not None:
        return h, "x-litellm-response-cost header"
    if usage is None:
        return None, "no usage in the body"
    if usage.cost is not None:
        return usage.cost, "usage.cost in the body"
    if not usage.model:
        return None, "no model in the body"
    from pricing.cost import cost_usd

    price = _price_table().lookup(usage.model)
    if price is None:
        return None, f"no bundled price for {usage.model}"
    return cost_usd(price, usage.tokens), "bundled price table"


def tokens_text(t: Any) -> str:
    """`in/out/cache` for a TokenCounts or the tokens dict of the flow's metadata."""
    get = (lambda k: t.get(k, 0)) if isinstance(t, dict) else (lambda k: getattr(t, k, 0))
    cw = get("cache_write") + (0 if isinstance(t, dict) else get("cache_write_1h"))
    return f"input {get('input')} · output {get('output')} · cache read {get('cache_read')} · cache write {cw}"


def render(data: bytes, fmt: WireFormat | None, meta: dict | None = None, header_cost: str | None = None,
           stored: bool = True) -> str:
    """The whole view as text. Pure, so the tests need no flow."""
    meta = meta if isinstance(meta, dict) else {}
    out: list[str] = []
    parser = SSEParser()
    events = parser.feed(bytes(data)) + parser.finish() if data else []
    fmt = fmt or (sniff_format(events) if events else "chat")
    if not data:
        out.append("(no body stored: the sidecar streamed it straight to the client; start mitmproxy with "
                   "`--set store_streamed_bodies=true` to keep streamed bodies)" if not stored else "(empty body)")
    out.append(f"── events ({len(events)}, {fmt} format) ──")
    for n, ev in enumerate(events[:MAX_EVENTS_LISTED]):
        out.append(f"{n:>4} {(ev.event or 'data'):<28} {_short(ev.data)}")
    if len(events) > MAX_EVENTS_LISTED:
        out.append(f"     … {len(events) - MAX_EVENTS_LISTED} more events")
    asm = Assembler()
    usage_stream = StreamUsage(fmt)
    for ev in events:
        try:
            asm.feed(fmt, ev)
        except Exception:
            log.debug("SSE-LLM: unreadable event", exc_info=True)
        usage_stream.feed(ev)
    out.append("")
    out.append("── text ──")
    parts = asm.text()
    if not parts:
        out.append("(no text in the body)")
    for label, text in parts:
        out.append(f"[{label}]")
        out.append(text if text else "(empty)")
        out.append("")
    out.append("── usage and cost ──")
    usage = usage_stream.result() if events else None
    if usage is not None:
        out.append(f"body usage: model {usage.model or '?'} · {tokens_text(usage.tokens)}")
        cost, source = body_cost(usage, header_cost)
        out.append(f"body cost: ${cost:.6f} ({source})" if cost is not None else f"body cost: unknown ({source})")
    elif events:
        out.append("body usage: none in the body (a stripped include_usage chunk is metered by the sidecar)")
    if meta.get("metered"):
        line = f"metered by the sidecar: ${float(meta.get('cost') or 0):.6f} ({meta.get('cost_source', '?')})"
        line += f" · key {meta.get('key_id', '?')} ({meta.get('key', '***')}) · model {meta.get('model') or '?'}"
        out.append(line)
        if isinstance(meta.get("tokens"), dict):
            out.append(f"metered tokens: {tokens_text(meta['tokens'])}")
    elif meta.get("key_id"):
        out.append(f"sent on key {meta['key_id']} ({meta.get('key', '***')}); not metered (yet)")
    return "\n".join(out)


def _flow_meta(metadata: Any) -> tuple[dict, WireFormat | None, str | None, bool]:
    flow = getattr(metadata, "flow", None)
    meta = getattr(flow, "metadata", {}).get(META) if flow is not None else None
    meta = meta if isinstance(meta, dict) else {}
    fmt = meta.get("format") if meta.get("format") in ("chat", "messages", "responses") else None
    request = getattr(flow, "request", None)
    if fmt is None and request is not None:
        fmt = wire_format_for_path(request.path)
    message = getattr(metadata, "http_message", None)
    header = message.headers.get("x-litellm-response-cost") if message is not None else None
    stored = True
    try:
        from mitmproxy import ctx

        stored = bool(ctx.options.store_streamed_bodies)
    except Exception:
        pass
    return meta, fmt, header, stored


class SSELLMContentview(Contentview):  # type: ignore[misc,valid-type]
    """mitmproxy 12 contentview; registered by the addon (`register`/`unregister`)."""

    @property
    def name(self) -> str:
        return NAME

    @property
    def syntax_highlight(self) -> Literal["none"]:
        return "none"

    def render_priority(self, data: bytes, metadata: Any) -> float:
        try:
            ctype = (getattr(metadata, "content_type", None) or "").lower()
            if ctype == "text/event-stream":
                _, fmt, _, _ = _flow_meta(metadata)
                return 2.0 if fmt is not None else 1.0
            head = bytes(data[:64]).lstrip()
            if head.startswith((b"event:", b"data: {", b"data:{")):
                _, fmt, _, _ = _flow_meta(metadata)
                return 1.5 if fmt is not None else -1
        except Exception:
            log.debug("SSE-LLM render_priority failed", exc_info=True)
        return -1

    def prettify(self, data: bytes, metadata: Any) -> str:
        try:
            meta, fmt, header, stored = _flow_meta(metadata)
            return render(data, fmt, meta, header, stored)
        except Exception as e:  # never a traceback in the UI: the raw bytes are one click away
            log.debug("SSE-LLM prettify failed", exc_info=True)
            return f"SSE-LLM could not render this body ({e.__class__.__name__}: {e}); see the Raw view."


VIEW = SSELLMContentview() if Contentview is not object else None


def register() -> bool:
    """Add the view to mitmproxy's registry (replacing an older copy after a script reload)."""
    if VIEW is None:
        return False
    try:
        from mitmproxy import contentviews

        contentviews.add(VIEW)
        return True
    except Exception:
        log.warning("could not register the %s contentview", NAME, exc_info=True)
        return False


def unregister() -> None:
    """mitmproxy 12 has no public `remove`; drop our entry so an unloaded script leaves no view behind."""
    try:
        from mitmproxy import contentviews

        registry = contentviews.registry
        by_name = getattr(registry, "_by_name", None)
        if isinstance(by_name, dict) and by_name.get(NAME.lower()) is VIEW:
            del by_name[NAME.lower()]
    except Exception:
        log.debug("could not unregister the %s contentview", NAME, exc_info=True)


class ContentViewAddon:
    """Registers the `SSE-LLM` view for as long as the script is loaded."""

    def load(self, loader: object) -> None:
        register()

    def done(self) -> None:
        unregister()
