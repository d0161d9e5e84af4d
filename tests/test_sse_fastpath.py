"""The SSE tap's byte-level fast path: it parses only events that can change usage and cuts the usage-only
chunk at blank lines found in raw bytes, so these cases check it against the plain parser (every event
parsed) on the edges that shortcut introduces."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addon.core.sse import SSEParser, SSETap, StreamUsage, is_usage_only_chunk, usage_from_sse_body
from addon.core.usage import Usage
from pricing.tokens import TokenCounts
from tests.test_sse import CHAT_OPENAI_SSE, CHAT_OPENAI_USAGE_CHUNK, GPT, OPENAI_TOKENS, SAMPLES, drive


def _data(obj, eol: bytes = b"\n") -> bytes:
    return b"data: " + json.dumps(obj).encode() + eol + eol


def reference(fmt: str, body: bytes, strip: bool) -> tuple[bytes, Usage | None]:
    """What the client gets and what is metered, parsing every event (the tap's behaviour before the
    fast path): blocks cut at the parser's own boundaries, the usage-only chunk dropped."""
    parser = SSEParser()
    stream = StreamUsage(fmt)
    out, cut = [], 0
    for end, ev in parser.feed_blocks(body):
        if ev is not None:
            stream.feed(ev)
        if not (strip and ev is not None and is_usage_only_chunk(ev)):
            out.append(body[cut:end])
        cut = end
    pending = parser.pending()
    if pending is not None:
        stream.feed(pending)
    if cut < len(body) and not (strip and pending is not None and is_usage_only_chunk(pending)):
        out.append(body[cut:])
    return b"".join(out), stream.result()


def _check(fmt: str, body: bytes, chunks: list[bytes]) -> None:
    for strip in (False, True):
        tap = SSETap(fmt, strip_usage_chunk=strip)
        sent = drive(tap, chunks)
        expected, usage = reference(fmt, body, strip and fmt == "chat")
        assert all(sent) and tap.errors == 0
        assert b"".join(sent) == expected, strip
        assert tap.usage == usage, strip


def _two_way(body: bytes):
    return [[body[:i], body[i:]] if 0 < i < len(body) else [body] for i in range(len(body) + 1)]


USAGE = {"prompt_tokens": 31500, "completion_tokens": 300, "total_tokens": 31800,
         "prompt_tokens_details": {"cached_tokens": 30000}}
HEAD = _data({"model": GPT, "choices": [{"index": 0, "delta": {"content": "Hi"}}]})
USAGE_CHUNK = _data({"model": GPT, "choices": [], "usage": USAGE})
DONE = b"data: [DONE]\n\n"


@pytest.mark.parametrize("body", [
    # the word usage in content, as a string value and quoted inside text: not a usage field
    HEAD + _data({"choices": [{"delta": {"content": "usage"}}]}) + USAGE_CHUNK + DONE,
    HEAD + _data({"choices": [{"delta": {"content": 'say "usage": {"prompt_tokens": 9}'}}]}) + USAGE_CHUNK + DONE,
    # OpenAI style: `"usage": null` in every chunk
    HEAD.replace(b"}]}", b'}], "usage": null}') * 3 + USAGE_CHUNK + DONE,
    # `"usage": null` first, then the same key escaped: json keeps the last, so it is real usage
    HEAD + b'data: {"choices": [], "usage": null, "us\\u0061ge": {"prompt_tokens": 7}}\n\n' + DONE,
    # usage split over two data lines of one event (the key on one line, its value on the next)
    HEAD + b'data: {"choices": [], "usage"\ndata: : {"prompt_tokens": 5}}\n\n' + DONE,
    # a first event without a model: later events with `"usage": null` may name it
    _data({"choices": [{"delta": {"content": "a"}}]}) + _data({"model": "m2", "choices": [], "usage": None})
    + _data({"choices": [], "usage": {"prompt_tokens": 4}}) + DONE,
    # usage mentioned only in a comment or an event name: no data carries it
    HEAD + b': "usage": {"prompt_tokens": 1}\n\n' + b'event: "usage"\ndata: {"choices": []}\n\n' + DONE,
    # leading and repeated blank lines around the usage chunk, CRLF and CR
    b"\n" + USAGE_CHUNK + b"\n\n" + DONE,
    b"\r\n" + HEAD.replace(b"\n", b"\r\n") + b"\r\n" + USAGE_CHUNK.replace(b"\n", b"\r\n") + DONE,
    b"\r" + HEAD.replace(b"\n", b"\r") + USAGE_CHUNK.replace(b"\n", b"\r") + b"\r" + DONE.replace(b"\n", b"\r"),
    # mixed line endings between events
    HEAD + USAGE_CHUNK.replace(b"\n\n", b"\r\n\n") + DONE.replace(b"\n\n", b"\n\r\n"),
    HEAD.replace(b"\n\n", b"\r\r") + USAGE_CHUNK.replace(b"\n\n", b"\n\r") + DONE,
    # [DONE] and a ping before the first event; the first event is the usage chunk itself
    DONE + b": ping\n\n" + USAGE_CHUNK + DONE,
    # a stream ending without its blank line, on the usage chunk
    HEAD + USAGE_CHUNK.rstrip(b"\n"),
    HEAD + USAGE_CHUNK.rstrip(b"\n") + b"\r",
], ids=["content-usage", "quoted-usage", "usage-null", "escaped-key", "multiline-key", "model-later",
        "comment-usage", "leading-lf", "crlf", "cr", "mixed-1", "mixed-2", "done-first", "unterminated",
        "unterminated-cr"])
def test_edges_match_the_plain_parser_at_every_split(body):
    for chunks in _two_way(body):
        _check("chat", body, chunks)
    _check("chat", body, [body[i:i + 1] for i in range(len(body))])  # one byte at a time
    _check("chat", body, _per_event(body))  # one whole event per chunk: the fast path's own case


def _per_event(body: bytes) -> list[bytes]:
    parts = body.split(b"\n\n")
    return [p + b"\n\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


@pytest.mark.parametrize("marker", [b'"usage"', b"\n\n", b"\r\n\r\n"])
def test_markers_and_boundaries_split_across_chunks(marker):
    """`"usage"` or an event's blank line cut between two chunks at every offset: metered and stripped
    exactly as when whole."""
    body = HEAD + USAGE_CHUNK + DONE
    if marker == b"\r\n\r\n":
        body = body.replace(b"\n", b"\r\n")
    at = body.index(marker, len(HEAD) - 2 if marker != b'"usage"' else 0)
    for k in range(1, len(marker)):
        cut = at + k
        _check("chat", body, [body[:cut], body[cut:]])
    tap = SSETap("chat", strip_usage_chunk=True)
    stripped = b"".join(drive(tap, [body[:at + 3], body[at + 3:]]))
    assert b'"usage"' not in stripped
    assert tap.usage == Usage(TokenCounts(input=1500, cache_read=30000, output=300), GPT, None)


def test_a_huge_event_without_usage_is_forwarded_unparsed_and_memory_stays_bounded():
    huge = b"data: " + json.dumps({"choices": [{"delta": {"content": "x" * (3 << 20)}}]}).encode() + b"\n\n"
    body = HEAD + huge + USAGE_CHUNK + DONE
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    for strip in (False, True):
        tap = SSETap("chat", strip_usage_chunk=strip)
        sent = drive(tap, chunks)
        assert b"".join(sent) == (HEAD + huge + DONE if strip else body)
        assert tap.usage == Usage(TokenCounts(input=1500, cache_read=30000, output=300), GPT, None)
        assert len(tap._pend) <= tap.max_event_bytes + 65536  # never the whole event


def test_whole_block_chunks_come_back_as_the_same_object():
    """No copy when nothing is cut: the client gets the very bytes object that arrived."""
    for strip in (False, True):
        tap = SSETap("chat", strip_usage_chunk=strip)
        for chunk in (HEAD, HEAD, HEAD + HEAD):
            assert tap(chunk) is chunk
        assert tap(b"") == []
        assert tap.usage is None and tap.events_seen == 4


@pytest.mark.parametrize("_id, fmt, body, usage, stripped", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_samples_in_many_event_chunks_with_mixed_endings(_id, fmt, body, usage, stripped):
    # CR-only and CRLF copies, and events grouped into 3-event chunks
    for variant in (body, body.replace(b"\n", b"\r"), body.replace(b"\n", b"\r\n")):
        blocks = [b for b in variant.replace(b"\r\n", b"\n").split(b"\n\n") if b]
        assert blocks
        _check(fmt, variant, [variant[i:i + 97] for i in range(0, len(variant), 97)])
        assert usage_from_sse_body(fmt, variant) == usage


def test_usage_null_stream_is_metered_from_the_final_chunk():
    body = CHAT_OPENAI_SSE
    assert body.count(b'"usage": null') == 3
    for chunks in ([body[i:i + 40] for i in range(0, len(body), 40)], _per_event(body)):
        tap = SSETap("chat", strip_usage_chunk=True)
        sent = drive(tap, chunks)
        assert b"".join(sent) == body.replace(CHAT_OPENAI_USAGE_CHUNK, b"")
        assert tap.usage == Usage(OPENAI_TOKENS, GPT, None) and tap.stripped == 1


_PIECES = st.sampled_from([
    HEAD, USAGE_CHUNK, DONE, b": ping\n\n", b"\n", b"\r", b"\r\n", b"data: ", b'"usage"', b'"usage": null',
    b'{"choices": [], "usage": {"prompt_tokens": 3}}', b"event: message_delta\n", b"message_start",
    b'{"type": "response.completed", "response": {"usage": {"input_tokens": 2}}}', b"\\u0061", b"x" * 50,
    _data({"type": "message_delta", "usage": {"output_tokens": 4}}),
    _data({"type": "response.completed", "response": {"model": GPT, "usage": {"input_tokens": 1, "output_tokens": 2}}}),
])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(_PIECES, max_size=25), cuts=st.lists(st.integers(1, 2000), max_size=12),
       fmt=st.sampled_from(["chat", "messages", "responses"]))
def test_random_streams_match_the_plain_parser(pieces, cuts, fmt):
    body = b"".join(pieces)
    points = sorted({c for c in cuts if 0 < c < len(body)})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)] if body else []
    _check(fmt, body, chunks)


def test_usage_in_every_format_from_the_fast_path():
    cases = [
        ("messages", b"event: message_start\n" + _data({"type": "message_start", "message": {
            "model": "claude", "usage": {"input_tokens": 10, "output_tokens": 1}}})
         + b"event: content_block_delta\n" + _data({"type": "content_block_delta", "delta": {"text": "message_delta"}})
         + b"event: message_delta\n" + _data({"type": "message_delta", "usage": {"output_tokens": 20}}),
         TokenCounts(input=10, output=20)),
        ("responses", _data({"type": "response.created", "response": {"usage": None}})
         + _data({"type": "response.output_text.delta", "delta": "response.completed"})
         + _data({"type": "response.completed", "response": {"model": GPT, "usage": {
             "input_tokens": 5, "output_tokens": 6}}}), TokenCounts(input=5, output=6)),
    ]
    for fmt, body, tokens in cases:
        for chunks in _two_way(body):
            _check(fmt, body, chunks)
        assert usage_from_sse_body(fmt, body).tokens == tokens


@pytest.mark.parametrize("event", [
    USAGE_CHUNK,  # the usage-only chunk: cut out when stripping
    _data({"model": GPT, "choices": [{"index": 0, "delta": {"content": "x"}}], "usage": USAGE}),  # kept
    _data({"model": GPT, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": USAGE}),
    b'data:{"choices": [], "usage": {"prompt_tokens": 2}}\n\n',  # no space after the colon
    b'data: {"choices": [], "usage": {"prompt_tokens": 2}\n\n',  # malformed JSON: forwarded, not metered
    b'data: {"choices": [], "usage": {"prompt_tokens": 2}}\r\n\r\n',  # CRLF: read by the general scan
    b'data: ["usage", {"prompt_tokens": 2}]\n\n',  # not an object
], ids=["usage-only", "with-content", "with-finish", "no-space", "malformed", "crlf", "array"])
def test_one_event_chunks_that_name_usage_match_the_plain_parser(event):
    """A chunk that is exactly one event naming usage (the usual usage chunk) is metered and cut as the
    general scan does, whatever precedes it."""
    for body in (HEAD + event + DONE, HEAD + HEAD + event + event + DONE):
        _check("chat", body, _per_event(body))
        _check("chat", body, [HEAD, body[len(HEAD):]])


def test_an_oversized_one_event_usage_chunk_is_forwarded_unmetered_as_when_split():
    """Over `max_event_bytes`, the one-event usage chunk is forwarded whole, unmetered and counted as dropped,
    exactly as the same bytes arriving in two pieces are."""
    results = []
    for split in (False, True):
        tap = SSETap("chat", strip_usage_chunk=True, max_event_bytes=120)  # HEAD fits, USAGE_CHUNK not
        chunks = [HEAD] + ([USAGE_CHUNK[:20], USAGE_CHUNK[20:]] if split else [USAGE_CHUNK]) + [DONE]
        sent = b"".join(drive(tap, chunks))
        results.append((sent, tap.usage, tap.dropped, tap.stripped))
    assert results[0] == results[1]
    assert results[0][0] == HEAD + USAGE_CHUNK + DONE and results[0][1] is None and results[0][2] == 1
