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

try:
    from orjson import loads as _orjson_loads
except ImportError:  # pragma: no cover - a declared dependency; the standard parser still works without it
    _orjson_loads = None  # type: ignore[assignment]

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


def _loads(data: str | bytes) -> dict | None:
    """The JSON object in an event's data (bytes: undecoded), or None.

    Bytes go to orjson first, several times faster, with the same result wherever it accepts the input
    (integers past 64 bits become floats: token counts and costs that large are rejected either way);
    what it refuses (invalid UTF-8, NaN, 1e400, lone surrogates, deep nesting) is decoded with
    replacement and read by `json`, as a str always is."""
    try:
        if isinstance(data, bytes):
            if _orjson_loads is not None:
                try:
                    obj = _orjson_loads(data)
                    return obj if isinstance(obj, dict) else None
                except ValueError:
                    pass
            data = data.decode("utf-8", "replace")
        obj = json.loads(data)
    except Exception:  # ValueError, or RecursionError on absurd nesting
        log.debug("skipping malformed SSE event %.200r", data)
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
        self._first: bytes | None = None  # chat: the first event's SSE block, parsed only if its model is needed

    def copy(self) -> StreamUsage:
        clone = StreamUsage(self.fmt)
        clone.malformed, clone._usage, clone._model = self.malformed, self._usage, self._model
        clone._fields = dict(self._fields)
        clone._first_parsed, clone._first = self._first_parsed, self._first
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

    def defer_first(self, block: bytes | bytearray) -> None:
        """The first chat event, as raw SSE bytes that start with it and mention no usage: parsed later,
        and only if its model is needed (the usage chunk usually names the model itself)."""
        self._first_parsed = True
        self._first = bytes(block)

    def model_known(self) -> bool:
        """Whether the stream's model is settled: later events can no longer change it. (A model once
        known stays settled, so the deferred first event is parsed only while none is: its model would
        take the place of a later event's, but it is no later event.)"""
        if self._model is not None:
            return True
        self._resolve_first()
        return self._model is not None

    def feed_chat(self, data: bytes) -> dict | None:
        """`feed` for the (undecoded) data of a chat event, returning its decoded object (None: skipped
        or unreadable)."""
        if data == b"[DONE]" or (self._first_parsed and data.find(b'"usage"') < 0):
            return None
        self._first_parsed = True
        try:
            obj = self._parse_text(data)
            if obj is not None:
                self._chat_obj(obj)
            return obj
        except Exception:  # defensive, as in `feed`
            self.malformed += 1
            log.debug("skipping unreadable chat SSE event %.200r", data, exc_info=True)
            return None

    def _resolve_first(self) -> None:
        block = self._first
        if block is None:
            return
        self._first = None
        parser = SSEParser(len(block) + 1)
        events = parser.feed(block) + parser.finish()
        obj = self._parse(events[0]) if events else None
        model = obj.get("model") if obj is not None else None
        if isinstance(model, str) and model:
            self._model = model  # the first event's model comes before any later one's

    def _parse(self, ev: SSEEvent) -> dict | None:
        return self._parse_text(ev.data)

    def _parse_text(self, data: str | bytes) -> dict | None:
        obj = _loads(data)
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
        if obj is not None:
            self._chat_obj(obj)

    def _chat_obj(self, obj: dict) -> None:
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
        if usage is not None and usage.model is None:
            self._resolve_first()
            if self._model is not None:
                usage = usage.with_model(self._model)
        return usage


def usage_from_sse_body(fmt: WireFormat, body: bytes) -> Usage | None:
    """Usage of a stream delivered whole (e.g. a retried stream)."""
    try:
        tap = SSETap(fmt)
        tap(bytes(body))
        tap(b"")
        return tap.usage
    except Exception:
        log.debug("unreadable %s SSE body", fmt, exc_info=True)
        return None


def _usage_only(obj: Any) -> bool:
    if not isinstance(obj, dict) or not isinstance(obj.get("usage"), dict):
        return False
    choices = obj.get("choices", [])
    if not isinstance(choices, list):
        return False
    for c in choices:
        if not isinstance(c, dict) or c.get("delta") or c.get("finish_reason") is not None:
            return False
    return True


def is_usage_only_chunk(ev: SSEEvent) -> bool:
    """The chat chunk that `include_usage` adds: usage set, and no content, role or finish reason."""
    if '"usage"' not in ev.data:
        return False
    try:
        obj = json.loads(ev.data)
    except Exception:
        return False
    return _usage_only(obj)


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


# --- block boundaries on raw bytes -------------------------------------------------------------------
#
# A block (one event, or a comment, or nothing) ends at a blank line: two line breaks in a row, each
# `\r\n`, `\r` or `\n`. The last byte of the first break and the first byte of the second always form
# one of `\n\n`, `\n\r`, `\r\r` (`\r\n` is one break), and every such pair is a blank line, so blank
# lines are found with `bytes.find` on three two-byte patterns (one when the stream has no `\r`).
# The block ends after the second break, which for `\r` may still be the first half of `\r\n`.

_LF, _CR = 10, 13
_HOLD, _EMIT, _DROP = 0, 1, 2  # what happens to the bytes of the current partial block (stripping)
_USAGE = b'"usage"'
_DONE_HEADS = (b" [DONE]", b"[DONE]\n", b"[DONE]\r", b"[DONE]")  # bytes 5:12 of a block "data: [DONE]"
_MARKERS: dict[str, tuple[bytes, ...]] = {
    # Events that can change a stream's usage contain one of these; every other event is passed on
    # without being decoded. ("message_" also matches message_stop: one decode per stream, no harm.)
    "chat": (_USAGE,),
    "messages": (b"message_",),
    "responses": tuple(name.encode() for name in _RESPONSES_FINAL),
}


def _end_at(buf: bytes | bytearray, i: int, n: int) -> int:
    """End of the blank line whose two breaks meet at buf[i:i+2]; -1 while that is undecided."""
    if buf[i + 1] == _LF:
        return i + 2
    j = i + 2
    if j < n:
        return j + 1 if buf[j] == _LF else j
    return -1


def _last_end(buf: bytes | bytearray, lo: int, n: int, cr: bool) -> int:
    """End of the last decided blank line in buf[lo:n], or -1."""
    i = buf.rfind(b"\n\n", lo)
    best = i + 2 if i >= 0 else -1
    if cr:
        for pat in (b"\n\r", b"\r\r"):
            i = buf.rfind(pat, lo)
            if i < 0:
                continue
            e = _end_at(buf, i, n)
            if e < 0:  # the pair is the last two bytes: its end awaits the next byte
                i = buf.rfind(pat, lo, n - 1)
                e = _end_at(buf, i, n) if i >= 0 else -1
            if e > best:
                best = e
    return best


def _next_end(buf: bytes | bytearray, frm: int, n: int, cr: bool) -> int:
    """End of the first blank line whose pair starts at or after `frm`; -1 if none is decided."""
    i = buf.find(b"\n\n", frm)
    if not cr:
        return i + 2 if i >= 0 else -1
    for pat in (b"\n\r", b"\r\r"):
        j = buf.find(pat, frm, i + 2 if i >= 0 else n)
        if j >= 0 and (i < 0 or j < i):
            i = j
    return _end_at(buf, i, n) if i >= 0 else -1


def _prev_end(buf: bytes | bytearray, lo: int, p: int, cr: bool) -> int:
    """Start of the block holding buf[p] (a byte that is no line break): the end of the last blank line
    before it, at least `lo` (a block start)."""
    frm = lo - 1 if lo > 0 else 0  # an empty line right at `lo` is a blank line of its own
    i = buf.rfind(b"\n\n", frm, p)
    best = i + 2 if i >= 0 else lo
    if cr:
        for pat in (b"\n\r", b"\r\r"):
            i = buf.rfind(pat, frm, p)
            if i >= 0:
                e = i + 3 if buf[i + 2] == _LF else i + 2
                if e > best:
                    best = e
    return best


def _count_ends(buf: bytes | bytearray, lo: int, hi: int, cr: bool) -> int:
    count = buf.count(b"\n\n", lo, hi)
    if cr:
        count += buf.count(b"\n\r", lo, hi) + buf.count(b"\r\r", lo, hi)
    return count


_NO_VALUE = rb'[ \t]*(?::[ \t]*null|[,}\]])'  # what may follow a `"usage"` that carries no figures
_NO_USAGE_VALUE = re.compile(rb'"usage"' + _NO_VALUE)
# searched for: the first `"usage"` of a buffer that `_names_usage` says may carry figures
_USAGE_WITH_VALUE = re.compile(rb'"usage"(?!' + _NO_VALUE + rb')')


def _names_usage(buf: bytes | bytearray, i: int, hi: int) -> bool:
    """Whether the `"usage"` at buf[i] may be a key with a value other than null. OpenAI-style chunks
    say `"usage": null` in every event, and a content token can be the string "usage": neither can
    carry usage. Anything unusual (a line break, the end) counts as "may". (One match in C: every chunk
    of an OpenAI-style stream asks; `hi` is the end of the buffer or of a block, so a `null` never
    straddles it.)"""
    return _NO_USAGE_VALUE.match(buf, i, hi) is None


def _escapes_letters(buf: bytes | bytearray, lo: int, hi: int) -> bool:
    """Whether a JSON key in buf[lo:hi] could spell "usage" with \\u escapes (`"us\\u0061ge"`)."""
    return buf.find(b"\\u00", lo, hi) >= 0 and (buf.find(b"\\u006", lo, hi) >= 0 or buf.find(b"\\u007", lo, hi) >= 0)


def _payload(block: bytes | bytearray, max_event_bytes: int) -> tuple[bytes | None, bytes | None, bool]:
    """The event name and data (undecoded) of one block, as `SSEParser` dispatches it (lenient at the end
    of a stream): data None when the block dispatches nothing; and whether it was dropped for carrying
    more than `max_event_bytes` of data."""
    line = block.rstrip(b"\r\n")
    if line[:5] == b"data:" and line.find(b"\n") < 0 and line.find(b"\r") < 0:
        value = line[6:] if line[5:6] == b" " else line[5:]  # the common block: one data line
        if len(value) > max_event_bytes:
            return None, None, True
        return None, bytes(value), False
    data: list[bytes] | None = None
    size = 0
    event: bytes | None = None
    for line in block.splitlines():  # bytes.splitlines splits on \r\n, \r and \n only
        if not line or line[0] == 58:  # an empty line (the block's end), or a comment
            continue
        field, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            if data is None:
                data = [bytes(value)]
            else:
                data.append(bytes(value))
            size += len(value)
        elif field == b"event":
            event = bytes(value)
    if data is None:
        return event, None, False
    if size > max_event_bytes:
        return event, None, True
    return event, data[0] if len(data) == 1 else b"\n".join(data), False


class SSETap:
    """`flow.response.stream` callable: meters the stream while passing it through.

    Without stripping, each chunk is returned as received at once, so the client's first byte never
    waits. With `strip_usage_chunk` (the sidecar asked for usage the client did not), only complete
    blocks are released so the usage-only chunk can be cut out. It never raises: on an internal error
    it releases what it holds and passes everything through from then on.

    Cost: the bytes are never decoded as a whole. Block ends are found with `bytes.find`, and only a
    block that can change the usage (it contains `"usage"` with a value, `message_`, or a final
    `response.*` name; in chat also the first event) is cut out and parsed. A chunk of whole blocks
    that contains none of them is returned as the same object after a few scans in C. Memory stays
    constant: only the current partial block is kept, and one larger than `max_event_bytes` is
    forwarded and left unmetered.
    """

    __slots__ = ("fmt", "strip_usage_chunk", "max_event_bytes", "stripped", "_copy", "_stream", "_marker",
                 "_markers", "_pend", "_n0", "_mode", "_big", "_cr", "_slow", "_fast", "_fallback", "_failed",
                 "_end_usage", "_ended", "_bytes_seen", "_blocks", "_errors", "_dropped")

    def __init__(self, fmt: WireFormat, strip_usage_chunk: bool = False,
                 max_event_bytes: int = MAX_EVENT_BYTES, keep_bytes: int = 0) -> None:
        self.fmt = fmt
        # When flows are kept (mitmweb, `-w`), a bounded copy of what was forwarded becomes the body.
        self._copy: StreamCopy | None = StreamCopy(keep_bytes) if keep_bytes > 0 else None
        # Only chat streams gain a chunk from `include_usage`; other formats always carry usage
        # in events their clients rely on (message_delta, response.completed).
        self.strip_usage_chunk = strip_usage_chunk and fmt == "chat"
        self.max_event_bytes = max_event_bytes
        self._stream = StreamUsage(fmt)
        self._markers = _MARKERS.get(fmt, (_USAGE,))
        self._marker = self._markers[0] if len(self._markers) == 1 else None
        self._pend = bytearray()  # the current partial block, from its first byte (just its tail if _big)
        self._n0 = 0  # len(_pend) when the current call started
        self._mode = _HOLD  # strip: held, already sent (a `b""` call released it), or being dropped
        self._big = False  # the partial block outgrew max_event_bytes: forwarded, not metered
        self._cr = False  # a \r was seen: blank lines may be \r\n\r\n or \r\r as well as \n\n
        self._slow = fmt == "chat"  # the first chat event must be looked at (its model)
        self._fast = True  # the next chunk may take the fast path (no partial block, no error, ...)
        self._fallback: SSEParser | None = None  # after an internal error: the plain parser
        self._failed = False
        self._end_usage: Usage | None = None
        self._ended = False
        self._bytes_seen = 0
        self._blocks = 0
        self._errors = 0
        self._dropped = 0
        self.stripped = 0

    @property
    def usage(self) -> Usage | None:
        return self._end_usage if self._ended else self._stream.result()

    @property
    def bytes_seen(self) -> int:
        return self._bytes_seen

    @property
    def events_seen(self) -> int:
        """Blocks completed (blank lines seen): the number of events for a stream of events; a
        diagnostic only."""
        return self._blocks

    @property
    def errors(self) -> int:
        return self._errors

    @property
    def dropped(self) -> int:
        """Blocks left unmetered for their size (over `max_event_bytes`)."""
        return self._dropped

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
        # The fast path: whole blocks, none of which can change the usage. Nothing here can raise.
        # (`find`, not `in`: `in` on bytes first tries the argument as an int, several times slower.)
        n = len(data)
        if n > 3 and self._fast and (data.endswith(b"\n\n") or data.endswith(b"\r\n\r\n")) and (
                ((i := data.find(self._marker)) < 0 or (i > 0 and self.fmt == "chat" and self._only_nulls(data, i, n)))
                if self._marker is not None else self._unmarked(data)) and (
                not self._slow or self._first_chunk(data, n)):
            self._bytes_seen += n
            # one line and the blank line (memchr-fast), else count
            self._blocks += 1 if data.find(b"\n") == n - 2 else _count_ends(data, 0, n, data[-2] != _LF)
            if self._copy is not None:
                self._keep(data)
            return data
        out = self._forward(data)
        if self._copy is not None:
            self._keep(out)
        return out

    def _first_chunk(self, data: bytes, n: int) -> bool:
        """Whether a chat stream's first chunk (whole blocks, no usage) can take the fast path: it
        starts with its first event (a data line, not [DONE]), kept undecoded in case its model is
        needed."""
        if (data[:5] == b"data:" and data[5:12] not in _DONE_HEADS and n <= min(self.max_event_bytes, 1 << 16)
                and not _escapes_letters(data, 0, n)):
            self._stream.defer_first(data)
            self._slow = False
            return True
        return False

    def _only_nulls(self, data: bytes, i: int, n: int) -> bool:
        """Whether every `"usage"` in a chunk of whole chat blocks is `"usage": null` (or a string):
        OpenAI-style streams say so in every chunk, and such a chunk cannot change the usage once the
        model is settled (no \\u escape could spell another usage key)."""
        if self._slow or _USAGE_WITH_VALUE.search(data, i, n) is not None:  # (one search for `_names_usage`)
            return False
        return self._stream.model_known() and not _escapes_letters(data, 0, n)

    def _unmarked(self, data: bytes) -> bool:
        for marker in self._markers:
            if data.find(marker) >= 0:
                return False
        return True

    def _keep(self, out: bytes | list[bytes]) -> None:
        try:
            if isinstance(out, (bytes, bytearray)):
                self._copy.add(out)  # type: ignore[union-attr]
            else:
                for piece in out:
                    self._copy.add(piece)  # type: ignore[union-attr]
        except Exception:  # the copy is a convenience: never let it touch the stream
            self._copy = None

    def _forward(self, data: bytes) -> bytes | list[bytes]:
        self._n0 = len(self._pend)
        try:
            if not data:
                return self._end()
            self._ended = False
            self._bytes_seen += len(data)
            if self._failed:
                self._observe(data)
                return data
            return self._scan(data)
        except Exception:
            self._errors += 1
            log.debug("SSE tap error; passing the stream through", exc_info=True)
            return self._fail_open(data)

    def _scan(self, data: bytes) -> bytes | list[bytes]:
        """One chunk the fast path could not take: find the blocks it completes, meter those that can
        change the usage, cut out the usage-only chunk when stripping, keep the partial block."""
        strip = self.strip_usage_chunk
        stream = self._stream
        pend = self._pend
        n0 = len(pend)
        if not n0 and self.fmt == "chat" and stream._first_parsed and not self._big:
            one = self._one_event(data, strip, stream)
            if one is not None:
                return one
        buf: bytes | bytearray
        if n0:
            pend += data
            buf = pend
        else:
            buf = data
        n = len(buf)
        if not self._cr and data.find(b"\r") >= 0:
            self._cr = True
        cr = self._cr
        lo = n0 - 2 if n0 > 2 else 0  # the partial block has no blank line before its last two bytes
        big = self._big
        s0 = 0  # a block that starts with a line break starts with an empty line: a block of its own
        if not big:
            c = buf[0]
            if c == _LF:
                s0 = 1
            elif c == _CR:
                if n == 1:
                    return self._partial(data, n0)
                s0 = 2 if buf[1] == _LF else 1
        if not n0 and n > 1 and data[-1] == _LF and data[-2] == _LF:
            end = n  # the usual chunk: whole blocks
        else:
            end = max(_last_end(buf, lo, n, cr), s0)
        if end <= 0:
            return self._partial(data, n0)
        drops: list[tuple[int, int]] = []
        pos = s0
        # The first block continues one that a `b""` call already released (or dropped), or one too
        # large to meter: never stripped.
        special = n0 > 0 and (big or self._mode != _HOLD)
        e1 = 0
        if special:
            e1 = s0 or _next_end(buf, lo, n, cr)
            if not big:
                self._block(buf[:e1], False, stream)
            pos = e1
        if self.fmt == "chat":
            while pos < end and not stream._first_parsed:  # the first event: its model
                b = _next_end(buf, pos - 1 if pos else 0, n, cr)
                if b < 0 or b > end:
                    break
                if self._block(buf[pos:b], strip, stream):
                    drops.append((pos, b))
                pos = b
            i = buf.find(_USAGE, pos, end)
            escapes: bool | None = None
            while i >= 0:
                if not _names_usage(buf, i, end) and stream.model_known():
                    if escapes is None:
                        escapes = _escapes_letters(buf, pos, end)
                    if not escapes:
                        i = buf.find(_USAGE, i + 7, end)
                        continue
                a = _prev_end(buf, pos, i, cr)
                b = _next_end(buf, i, n, cr)
                if self._block(buf[a:b], strip, stream, hot=True):
                    drops.append((a, b))
                pos = b
                i = buf.find(_USAGE, pos, end)
        else:
            markers = self._markers
            while True:
                i = -1
                for marker in markers:
                    j = buf.find(marker, pos, end)
                    if j >= 0 and (i < 0 or j < i):
                        i = j
                if i < 0:
                    break
                a = _prev_end(buf, pos, i, cr)
                b = _next_end(buf, i, n, cr)
                self._block(buf[a:b], False, stream, hot=True)
                pos = b
        self._blocks += 1 if end == n and buf.find(b"\n", lo) == n - 2 else _count_ends(buf, lo, end, cr)
        out: bytes | list[bytes] = data
        if strip and (n0 or drops or end < n):
            parts = []
            cut = 0
            if special:
                if self._mode == _EMIT and e1 > n0:
                    parts.append(buf[n0:e1])
                cut = e1
            for a, b in drops:
                if a > cut:
                    parts.append(buf[cut:a])
                cut = b
            if end > cut:
                parts.append(buf[cut:end])
            out = b"".join(parts)
        # What follows the last block end is the new partial block.
        if n0:
            del pend[:end]
        elif end < n:
            pend += memoryview(data)[end:]
        self._mode = _HOLD
        self._big = False
        self._slow = self.fmt == "chat" and not stream._first_parsed
        self._fast = not pend
        if len(pend) > self.max_event_bytes:
            out = self._overflow(out)
        return out if out else []

    def _one_event(self, data: bytes, strip: bool, stream: StreamUsage) -> bytes | list[bytes] | None:
        """The usual chunk of a chat stream that names usage: exactly one whole event of one `data:` line
        (`data: {...}\n\n`, no partial block before it). What `_scan` makes of it, without its search for
        block ends: the block is metered, and cut out when it is the usage-only chunk to strip. None: not
        such a chunk (or its first `"usage"` is null), for `_scan` to read."""
        n = len(data)
        if (type(data) is not bytes or n < 8 or data[-2] != _LF or data.find(b"\n") != n - 2 or data[:5] != b"data:"
                or data.find(b"\r") >= 0):
            return None
        i = data.find(_USAGE)
        if i < 0 or not _names_usage(data, i, n):
            return None
        self._blocks += 1
        self._mode = _HOLD
        self._slow = False  # (the first event is parsed or deferred already)
        self._fast = True  # no partial block
        # `_block(data, strip, stream, hot=True)` of this block (`_payload`'s one-line case, inline)
        value = data[6:n - 2] if data[5] == 32 else data[5:n - 2]
        if len(value) > self.max_event_bytes:
            self._dropped += 1
            return data
        obj = stream.feed_chat(value)
        if strip and obj is not None and _usage_only(obj):
            self.stripped += 1
            return []
        return data

    def _partial(self, data: bytes, n0: int) -> bytes | list[bytes]:
        """A chunk that completes no block: all of it belongs to the partial block."""
        pend = self._pend
        if not n0:
            pend += data
        self._fast = False
        out: bytes | list[bytes] = data if not self.strip_usage_chunk or self._mode == _EMIT else []
        if self._big:
            del pend[:-2]  # only the bytes that may start the next blank line
        elif len(pend) > self.max_event_bytes:
            return self._overflow(out) or []
        return out

    def _overflow(self, out: Any) -> bytes:
        """The partial block outgrew max_event_bytes: release it, stop metering it (no LLM usage event
        comes near that size), keep only the bytes that may start the blank line ending it."""
        pend = self._pend
        self._dropped += 1
        log.debug("dropping an SSE event larger than %d bytes", self.max_event_bytes)
        if self.strip_usage_chunk and self._mode == _HOLD:
            held = bytes(pend)
            out = out + held if out else held
            self._mode = _EMIT
        self._big = True
        self._fast = False
        del pend[:-2]
        return out or b""

    def _block(self, raw: bytes | bytearray, strippable: bool, stream: StreamUsage,
               hot: bool | None = None) -> bool:
        """Meter one complete block (the bytes of one event); True when it is the usage-only chunk and
        `strippable`, so the caller cuts it out."""
        if self.fmt != "chat":
            if hot is None:
                hot = not self._unmarked(raw)  # type: ignore[arg-type]
            if hot:
                name, data, dropped = _payload(raw, self.max_event_bytes)
                self._dropped += dropped
                if data is not None:
                    event = name.decode("utf-8", "replace") or None if name is not None else None
                    stream.feed(SSEEvent(event, data.decode("utf-8", "replace")))
            return False
        first = not stream._first_parsed
        if hot is None:
            hot = raw.find(_USAGE) >= 0
        if not hot:
            if not first:
                return False
            if (raw[:5] == b"data:" and raw[5:12] not in _DONE_HEADS and len(raw) <= self.max_event_bytes
                    and not _escapes_letters(raw, 0, len(raw))):
                stream.defer_first(raw)  # an event, not [DONE], not oversized: parsed only if needed
                return False
        _, data, dropped = _payload(raw, self.max_event_bytes)
        self._dropped += dropped
        if data is None or data == b"[DONE]":
            return False
        if not hot and not _escapes_letters(raw, 0, len(raw)):
            stream.defer_first(raw)
            return False
        obj = stream.feed_chat(data)
        if not strippable or obj is None or data.find(_USAGE) < 0 or not _usage_only(obj):
            return False
        self.stripped += 1
        return True

    def _end(self) -> bytes | list[bytes]:
        """The `b""` call: release what is held, and meter an event the stream did not close.

        Nothing is consumed (the partial block is only peeked at), so an unexpected empty chunk in
        mid-stream, which an empty HTTP/2 DATA frame can cause, costs nothing.
        """
        self._fast = False  # whatever comes next resets `_ended` on the way
        stream = self._stream
        if self._failed:
            pending = self._fallback.pending() if self._fallback is not None else None
            if pending is not None:
                stream = stream.copy()
                stream.feed(pending)
            self._end_usage = stream.result()
            self._ended = True
            return []
        pend = self._pend
        drop = False
        holding = self.strip_usage_chunk and bool(pend) and self._mode == _HOLD and not self._big
        if pend and not self._big:
            raw = bytes(pend)
            stripped = self.stripped
            stream = stream.copy()
            drop = self._block(raw, holding, stream)
            self.stripped = stripped  # counted below, once, if it really goes
        self._end_usage = stream.result()
        self._ended = True
        if not holding:
            return []
        if drop:
            self.stripped += 1
            self._mode = _DROP
            return []
        self._mode = _EMIT
        return bytes(pend)

    def _fail_open(self, data: bytes) -> bytes | list[bytes]:
        """Release everything and stop stripping: a client must never lose bytes to a tap bug. Metering
        goes on with the plain parser, from the start of the partial block when it is known."""
        self._failed = True
        self._slow = True
        self._fast = False
        n0 = self._n0
        pend = self._pend
        held = b""
        start = b""
        if n0 and not self._big:
            start = bytes(pend[:n0])
            if self.strip_usage_chunk and self._mode == _HOLD:
                held = start
        self._pend = bytearray()
        self._fallback = SSEParser(self.max_event_bytes)
        self._observe(start + data)
        out = held + data if data else held
        return out if out else []

    def _observe(self, data: bytes) -> None:
        try:
            for ev in self._fallback.feed(data):  # type: ignore[union-attr]
                self._blocks += 1
                self._stream.feed(ev)
        except Exception:
            self._errors += 1
            log.debug("SSE tap parse error", exc_info=True)


DECODABLE = {"gzip": 31, "x-gzip": 31, "deflate": 47}  # zlib wbits: gzip header / zlib-or-raw auto-detect


class EncodedSSETap(SSETap):
    """An event stream the upstream compressed although the sidecar asked for `identity`.

    The client gets the bytes exactly as sent; metering reads a decompressed copy. Stripping the usage
    chunk would mean re-compressing the stream, so the client then also sees that chunk.
    """

    __slots__ = ("_inflate",)

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
