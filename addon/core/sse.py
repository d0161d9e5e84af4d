"""Server-sent events: an incremental parser, the usage carried by LLM streams, and the mitmproxy tap.

Pure: no I/O. Chunk boundaries are arbitrary (mid-line, mid-UTF-8 character, between `\\r` and `\\n`),
so everything works on bytes and decodes complete lines only. Memory stays constant whatever the stream
length: only the current event is buffered, up to a cap.

mitmproxy 12 stream-callable protocol (`proxy/layers/http/__init__.py`, `state_stream_response_body`):
the callable is called once per received body chunk with non-empty bytes, then once more with `b""`
when the upstream's message ends (before the `response` hook). It may return `bytes` or an iterable of
`bytes`; each returned item is sent as one chunk, and to an HTTP/1 chunked client an empty item is the
terminating `0\\r\\n\\r\\n`, so data is held back by returning `[]`, never `b""`. Whatever the `b""` call
returns is sent before the end of the message. When either side drops mid-stream there is no `b""`
call: the `error` hook fires instead, so `.usage` is always readable without a final call.
"""
from __future__ import annotations

import json
import logging
import re
import zlib
from dataclasses import dataclass
from typing import Any

from addon.core.usage import Usage, WireFormat, usage_from_json

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 1 << 20
"""A pending event larger than this is dropped: no LLM usage event comes near it."""

_EOL = re.compile(rb"\r\n|\r|\n")
_CR = 13
_PLACEHOLDER = b"x"  # stands for a non-empty line whose content is being discarded


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str | None
    data: str


class SSEParser:
    """Incremental SSE parser (WHATWG rules) over raw bytes."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._buf = bytearray()  # the current incomplete line (a trailing \r may await its \n)
        self._data: list[bytes] = []
        self._size = 0
        self._event: str | None = None
        self._discarding = False
        self._pos = 0  # bytes consumed so far, for block boundaries
        self.dropped = 0

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Complete events found in this chunk (plus whatever earlier chunks left pending)."""
        return [ev for _, ev in self.feed_blocks(data) if ev is not None]

    def feed_blocks(self, data: bytes) -> list[tuple[int, SSEEvent | None]]:
        """Every block end (a blank line) completed by `data`: (stream offset just past it, event).

        The event is None for blocks that dispatch nothing (comments, pings, dropped oversize events);
        the offsets let the tap cut the raw bytes at exactly the boundaries the parser saw.
        """
        if not data:
            return []
        out: list[tuple[int, SSEEvent | None]] = []
        base = self._pos
        self._pos += len(data)
        start = 0
        buf = self._buf
        if buf and buf[-1] == _CR:  # a line ended in \r at the end of the previous chunk
            line = bytes(buf[:-1])
            buf.clear()
            if data[0] == 10:
                start = 1
            self._line(line, base + start, out)
        end = len(data)
        for m in _EOL.finditer(data, start):
            if m.end() == end and data[m.start()] == _CR and m.end() - m.start() == 1:
                break  # maybe the first half of \r\n: decide with the next chunk
            if buf:
                buf += data[start:m.start()]
                line = bytes(buf)
                buf.clear()
            else:
                line = data[start:m.start()]
            start = m.end()
            self._line(line, base + start, out)
        if start < end:
            if self._discarding:  # remember only whether the line is empty and ends in \r
                tail = data[start:]
                cr = tail[-1] == _CR
                content = bool(buf) or len(tail) > int(cr)
                self._buf = bytearray((_PLACEHOLDER if content else b"") + (b"\r" if cr else b""))
            else:
                buf += data[start:]
                if len(buf) + self._size > self.max_event_bytes:
                    self._drop()
                    self._buf = bytearray(_PLACEHOLDER + (b"\r" if buf[-1] == _CR else b""))
        return out

    def pending(self) -> SSEEvent | None:
        """The event the end of the stream would complete (lenient: no closing blank line needed)."""
        if self._discarding:
            return None
        data, event = self._data, self._event
        line = bytes(self._buf).rstrip(b"\r")
        if line and line[0] != 58:
            field, _, value = line.partition(b":")
            value = value[1:] if value[:1] == b" " else value
            if field == b"data":
                data = [*data, value]
            elif field == b"event":
                event = value.decode("utf-8", "replace") or None
        if not data:
            return None
        return SSEEvent(event, b"\n".join(data).decode("utf-8", "replace"))

    def finish(self) -> list[SSEEvent]:
        """End of stream: the pending event, if any; the parser is then ready for a new stream."""
        ev = self.pending()
        self._buf = bytearray()
        self._reset_event()
        self._discarding = False
        return [ev] if ev is not None else []

    def _reset_event(self) -> None:
        self._data = []
        self._size = 0
        self._event = None

    def _drop(self) -> None:
        self.dropped += 1
        log.debug("dropping an SSE event larger than %d bytes", self.max_event_bytes)
        self._reset_event()
        self._discarding = True

    def _line(self, line: bytes, pos: int, out: list[tuple[int, SSEEvent | None]]) -> None:
        if not line:
            ev = None
            if self._data and not self._discarding:
                ev = SSEEvent(self._event, b"\n".join(self._data).decode("utf-8", "replace"))
            self._discarding = False
            self._reset_event()
            out.append((pos, ev))
            return
        if self._discarding or line[0] == 58:  # ':' starts a comment
            return
        field, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
            self._size += len(value)
            if self._size > self.max_event_bytes:
                self._drop()
        elif field == b"event":
            self._event = value.decode("utf-8", "replace") or None


def _loads(ev: SSEEvent) -> dict | None:
    try:
        obj = json.loads(ev.data)
    except Exception:  # ValueError, or RecursionError on absurd nesting
        log.debug("skipping malformed SSE event %.200r", ev.data)
        return None
    return obj if isinstance(obj, dict) else None


_MESSAGES_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                    "cache_read_input_tokens", "cache_creation", "cost")
_RESPONSES_FINAL = ("response.completed", "response.incomplete", "response.failed")


class StreamUsage:
    """Running usage of one stream; keeps only the latest figures, never the events."""

    def __init__(self, fmt: WireFormat) -> None:
        self.fmt = fmt
        self.malformed = 0
        self._usage: Usage | None = None
        self._model: str | None = None
        self._fields: dict[str, Any] = {}  # messages: the latest value of each usage field
        self._first_parsed = False

    def copy(self) -> StreamUsage:
        clone = StreamUsage(self.fmt)
        clone.malformed, clone._usage, clone._model = self.malformed, self._usage, self._model
        clone._fields = dict(self._fields)
        clone._first_parsed = self._first_parsed
        return clone

    def feed(self, ev: SSEEvent) -> None:
        """Take one event into account; junk is skipped, never raised."""
        data = ev.data
        if data == "[DONE]":
            return
        try:
            if self.fmt == "chat":
                self._chat(ev, data)
            elif self.fmt == "messages":
                self._messages(ev, data)
            elif self.fmt == "responses":
                self._responses(ev, data)
        except Exception:  # defensive: a surprise shape must not stop metering the rest
            self.malformed += 1
            log.debug("skipping unreadable %s SSE event %.200r", self.fmt, data, exc_info=True)

    def _parse(self, ev: SSEEvent) -> dict | None:
        obj = _loads(ev)
        if obj is None:
            self.malformed += 1
        return obj

    def _chat(self, ev: SSEEvent, data: str) -> None:
        # Parsing every content chunk would cost more than the proxying: only the first (for the
        # model) and those mentioning usage are decoded.
        if self._first_parsed and '"usage"' not in data:
            return
        self._first_parsed = True
        obj = self._parse(ev)
        if obj is None:
            return
        if self._model is None and isinstance(obj.get("model"), str) and obj["model"]:
            self._model = obj["model"]
        if isinstance(obj.get("usage"), dict):
            usage = usage_from_json("chat", obj)
            if usage is not None:
                self._usage = usage

    def _messages(self, ev: SSEEvent, data: str) -> None:
        if ev.event is not None and ev.event not in ("message_start", "message_delta"):
            return
        if ev.event is None and "message_start" not in data and "message_delta" not in data:
            return
        obj = self._parse(ev)
        if obj is None:
            return
        kind = obj.get("type", ev.event)
        if kind == "message_start":
            message = obj.get("message")
            if not isinstance(message, dict):
                return
            if isinstance(message.get("model"), str) and message["model"]:
                self._model = message["model"]
            usage = message.get("usage")
        elif kind == "message_delta":
            usage = obj.get("usage")
        else:
            return
        if isinstance(usage, dict):
            # Counts are cumulative: the latest value of each field wins, nothing is summed.
            for name in _MESSAGES_FIELDS:
                if usage.get(name) is not None:
                    self._fields[name] = usage[name]

    def _responses(self, ev: SSEEvent, data: str) -> None:
        if not any(name in data for name in _RESPONSES_FINAL):
            return
        obj = self._parse(ev)
        if obj is None or obj.get("type") not in _RESPONSES_FINAL:
            return
        response = obj.get("response")
        usage = usage_from_json("responses", response)
        if usage is not None:
            self._usage = usage

    def result(self) -> Usage | None:
        if self.fmt == "messages":
            return usage_from_json("messages", {"model": self._model, "usage": self._fields})
        usage = self._usage
        if usage is not None and usage.model is None and self._model is not None:
            usage = Usage(tokens=usage.tokens, model=self._model, cost=usage.cost)
        return usage


def usage_from_sse_body(fmt: WireFormat, body: bytes) -> Usage | None:
    """Usage of a stream delivered whole (e.g. a retried stream)."""
    try:
        parser = SSEParser()
        stream = StreamUsage(fmt)
        for ev in parser.feed(bytes(body)) + parser.finish():
            stream.feed(ev)
        return stream.result()
    except Exception:
        log.debug("unreadable %s SSE body", fmt, exc_info=True)
        return None


def is_usage_only_chunk(ev: SSEEvent) -> bool:
    """The chat chunk that `include_usage` adds: usage set, and no content, role or finish reason."""
    if '"usage"' not in ev.data:
        return False
    try:
        obj = json.loads(ev.data)
    except Exception:
        return False
    if not isinstance(obj, dict) or not isinstance(obj.get("usage"), dict):
        return False
    choices = obj.get("choices", [])
    if not isinstance(choices, list):
        return False
    return all(isinstance(c, dict) and not c.get("delta") and c.get("finish_reason") is None
               for c in choices)


DEFAULT_KEEP_BYTES = 4 << 20
"""Default bound of the copy a tap keeps of a stream when flows are kept (mitmweb, `-w`)."""
_BLANK_LINES = (b"\r\n\r\n", b"\n\n", b"\r\r")


class StreamCopy:
    """A bounded copy of the bytes a stream forwarded: all of them up to `limit`, else head and tail.

    Memory stays below `limit * 1.5` whatever the stream length: the head is filled first, then the
    tail is a window trimmed (amortized) to its last `limit / 2` bytes.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(2, int(limit))
        self.head_cap = self.limit // 2
        self.tail_cap = self.limit - self.head_cap
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        if not data:
            return
        self.total += len(data)
        room = self.head_cap - len(self._head)
        if room > 0:
            self._head += data[:room]
            if len(data) <= room:
                return
            data = data[room:]
        self._tail += data
        if len(self._tail) > 2 * self.tail_cap:
            del self._tail[:len(self._tail) - self.tail_cap]

    @property
    def truncated(self) -> bool:
        return self.total > self.limit

    def value(self) -> bytes:
        """The copy; when truncated, the head and the tail cut at event boundaries, with an SSE comment
        between them saying how much is missing (SSE parsers, the `SSE-LLM` view included, skip it)."""
        if not self.truncated:
            return bytes(self._head) + bytes(self._tail)
        head, tail = bytes(self._head), bytes(self._tail[-self.tail_cap:])
        cut = max((head.rfind(b) + len(b) for b in _BLANK_LINES if head.rfind(b) >= 0), default=-1)
        if cut > 0:
            head = head[:cut]
        starts = [tail.find(b) + len(b) for b in _BLANK_LINES if 0 <= tail.find(b)]
        if starts and min(starts) < len(tail):
            tail = tail[min(starts):]
        omitted = self.total - len(head) - len(tail)
        marker = (b"" if cut > 0 else b"\n\n") + (
            f": openhands-sidecar: {omitted} bytes of this {self.total}-byte stream omitted here (kept the first "
            f"{len(head)} and the last {len(tail)}; option openhands_stream_copy_bytes)\n\n").encode()
        return head + marker + tail


class SSETap:
    """`flow.response.stream` callable: meters the stream while passing it through.

    Without stripping, each chunk is returned as received at once, so the client's first byte never
    waits. With `strip_usage_chunk` (the sidecar asked for usage the client did not), only complete
    blocks are released so the usage-only chunk can be cut out. It never raises: on an internal error
    it releases what it holds and passes everything through from then on.
    """

    def __init__(self, fmt: WireFormat, strip_usage_chunk: bool = False,
                 max_event_bytes: int = MAX_EVENT_BYTES, keep_bytes: int = 0) -> None:
        self.fmt = fmt
        # When flows are kept (mitmweb, `-w`), a bounded copy of what was forwarded becomes the body.
        self._copy: StreamCopy | None = StreamCopy(keep_bytes) if keep_bytes > 0 else None
        # Only chat streams gain a chunk from `include_usage`; other formats always carry usage
        # in events their clients rely on (message_delta, response.completed).
        self.strip_usage_chunk = strip_usage_chunk and fmt == "chat"
        self._parser = SSEParser(max_event_bytes)
        self._stream = StreamUsage(fmt)
        self._held = bytearray()
        self._held_start = 0  # stream offset of _held[0]
        self._partial: str | None = None  # "emit"/"drop": the current block was already cut into
        self._failed = False
        self._end_usage: Usage | None = None
        self._ended = False
        self._bytes_seen = 0
        self._events_seen = 0
        self._errors = 0
        self.stripped = 0

    @property
    def usage(self) -> Usage | None:
        return self._end_usage if self._ended else self._stream.result()

    @property
    def bytes_seen(self) -> int:
        return self._bytes_seen

    @property
    def events_seen(self) -> int:
        return self._events_seen

    @property
    def errors(self) -> int:
        return self._errors

    def keep(self, limit: int) -> None:
        """Keep a bounded copy of what is forwarded from now on (call before the stream starts)."""
        if limit > 0 and self._copy is None:
            self._copy = StreamCopy(limit)

    @property
    def keeps_copy(self) -> bool:
        return self._copy is not None

    def kept_body(self) -> bytes | None:
        """What the client received (head and tail beyond the bound); None when no copy is kept."""
        return self._copy.value() if self._copy is not None else None

    @property
    def kept_truncated(self) -> bool:
        return self._copy is not None and self._copy.truncated

    def release_copy(self) -> None:
        """Drop the copy (it now lives in the flow's body)."""
        self._copy = None

    def __call__(self, data: bytes) -> bytes | list[bytes]:
        out = self._forward(data)
        if self._copy is not None:
            try:
                if isinstance(out, (bytes, bytearray)):
                    self._copy.add(out)
                else:
                    for piece in out:
                        self._copy.add(piece)
            except Exception:  # the copy is a convenience: never let it touch the stream
                self._copy = None
        return out

    def _forward(self, data: bytes) -> bytes | list[bytes]:
        try:
            if not data:
                return self._end()
            self._ended = False
            self._bytes_seen += len(data)
            if not self.strip_usage_chunk or self._failed:
                self._observe(data)
                return data
            return self._strip(data)
        except Exception:
            self._errors += 1
            log.debug("SSE tap error; passing the stream through", exc_info=True)
            return self._fail_open(data)

    def _observe(self, data: bytes) -> None:
        try:
            for ev in self._parser.feed(data):
                self._events_seen += 1
                self._stream.feed(ev)
        except Exception:
            self._errors += 1
            log.debug("SSE tap parse error", exc_info=True)

    def _strip(self, data: bytes) -> bytes | list[bytes]:
        self._held += data
        blocks = self._parser.feed_blocks(data)
        out: list[bytes] = []
        cut = 0
        for pos, ev in blocks:
            end = pos - self._held_start
            keep = self._partial != "drop"
            if ev is not None:
                self._events_seen += 1
                self._stream.feed(ev)
                if self._partial is None and is_usage_only_chunk(ev):
                    keep = False
                    self.stripped += 1
            if keep:
                out.append(bytes(self._held[cut:end]))
            self._partial = None
            cut = end
        del self._held[:cut]
        self._held_start += cut
        if len(self._held) > self._parser.max_event_bytes:  # the parser dropped it: so do we
            out.append(bytes(self._held))
            self._release_held(emitted=True)
        return self._emit(out)

    def _release_held(self, emitted: bool) -> None:
        self._held_start += len(self._held)
        self._held.clear()
        self._partial = "emit" if emitted else "drop"

    @staticmethod
    def _emit(out: list[bytes]) -> bytes | list[bytes]:
        joined = b"".join(out)
        return joined if joined else []

    def _end(self) -> bytes | list[bytes]:
        """The `b""` call: release what is held, and meter an event the stream did not close.

        The parser state is kept (only peeked at), so an unexpected empty chunk in mid-stream, which an
        empty HTTP/2 DATA frame can cause, costs nothing.
        """
        pending = self._parser.pending()
        stream = self._stream
        if pending is not None:
            stream = stream.copy()
            stream.feed(pending)
        self._end_usage = stream.result()
        self._ended = True
        if not self.strip_usage_chunk or self._failed or not self._held:
            return []
        drop = self._partial == "drop" or (
            self._partial is None and pending is not None and is_usage_only_chunk(pending))
        out = [] if drop else [bytes(self._held)]
        self._release_held(emitted=not drop)
        return self._emit(out)

    def _fail_open(self, data: Any) -> bytes | list[bytes]:
        """Release everything and stop stripping: a client must never lose bytes to a tap bug."""
        self._failed = True
        if self.strip_usage_chunk and self._held:  # `_strip` appends `data` to `_held` first
            out = bytes(self._held)
            self._held_start += len(out)
            self._held.clear()
            return out
        if isinstance(data, (bytes, bytearray)) and data:
            return bytes(data)
        return []


DECODABLE = {"gzip": 31, "x-gzip": 31, "deflate": 47}  # zlib wbits: gzip header / zlib-or-raw auto-detect


class EncodedSSETap(SSETap):
    """An event stream the upstream compressed although the sidecar asked for `identity`.

    The client gets the bytes exactly as sent; metering reads a decompressed copy. Stripping the usage
    chunk would mean re-compressing the stream, so the client then also sees that chunk.
    """

    def __init__(self, fmt: WireFormat, encoding: str, keep_bytes: int = 0) -> None:
        super().__init__(fmt, strip_usage_chunk=False, keep_bytes=keep_bytes)
        self._inflate: Any = zlib.decompressobj(DECODABLE[encoding])

    def __call__(self, data: bytes) -> bytes | list[bytes]:
        try:
            if self._inflate is not None:
                plain = self._inflate.decompress(data) if data else self._inflate.flush()
                if plain:
                    super().__call__(plain)
        except Exception:  # not what it claimed to be: stop metering it, never touch the stream
            self._errors += 1
            self._inflate = None
        if not data:
            return super().__call__(b"")
        return data


def strip_usage_chunk_from_body(body: bytes) -> bytes:
    """A whole chat SSE body without the usage-only chunk (a retried stream delivered whole)."""
    tap = SSETap("chat", strip_usage_chunk=True)
    out: list[bytes] = []
    for piece in (tap(bytes(body)), tap(b"")):
        out.extend([piece] if isinstance(piece, bytes) else piece)
    return b"".join(out)
