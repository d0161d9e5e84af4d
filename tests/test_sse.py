"""SSE parsing, stream usage and the mitmproxy tap, with the streams observed from LiteLLM 1.80."""
from __future__ import annotations

import inspect
import json
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addon.core.sse import (
    SSEEvent, SSEParser, SSETap, StreamUsage, strip_usage_chunk_from_body, usage_from_sse_body,
)
from addon.core.usage import Usage
from pricing.tokens import TokenCounts
from tests.test_usage import ANTHROPIC_TOKENS, GPT, OPENAI_TOKENS, SONNET


def _data(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _event(name: str, obj) -> bytes:
    return b"event: " + name.encode() + b"\n" + _data(obj)


_CHUNK = {"id": "chatcmpl-1", "created": 1760000000, "object": "chat.completion.chunk"}
CHAT_ANTHROPIC_USAGE_CHUNK = _data({
    **_CHUNK, "model": SONNET, "choices": [{"index": 0, "delta": {}}],
    "usage": {"completion_tokens": 25, "prompt_tokens": 31512, "total_tokens": 31537,
              "completion_tokens_details": {"reasoning_tokens": 0},
              "prompt_tokens_details": {"cached_tokens": 30000, "cache_creation_tokens": 1500},
              "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 30000}})
CHAT_ANTHROPIC_SSE = (
    _data({**_CHUNK, "model": SONNET,
           "choices": [{"index": 0, "delta": {"content": "Hello! ✓ ü", "role": "assistant"}}]})
    + _data({**_CHUNK, "model": SONNET, "choices": [{"finish_reason": "stop", "index": 0, "delta": {}}]})
    + CHAT_ANTHROPIC_USAGE_CHUNK
    + b"data: [DONE]\n\n")

CHAT_OPENAI_USAGE_CHUNK = _data({
    **_CHUNK, "model": GPT, "choices": [{"index": 0, "delta": {}}],
    "usage": {"completion_tokens": 300, "prompt_tokens": 31500, "total_tokens": 31800,
              "completion_tokens_details": {"accepted_prediction_tokens": 0, "audio_tokens": 0,
                                            "reasoning_tokens": 256, "rejected_prediction_tokens": 0},
              "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 30000}}})
CHAT_OPENAI_SSE = (
    _data({**_CHUNK, "model": GPT, "choices": [{"index": 0, "delta": {"role": "assistant"}}],
           "usage": None})
    + _data({**_CHUNK, "model": GPT, "choices": [{"index": 0, "delta": {"content": "Hi"}}], "usage": None})
    + _data({**_CHUNK, "model": GPT, "choices": [{"finish_reason": "stop", "index": 0, "delta": {}}],
             "usage": None})
    + CHAT_OPENAI_USAGE_CHUNK
    + b"data: [DONE]\n\n")

_MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "stop_reason": None,
            "stop_sequence": None}
_BLOCKS = (
    _event("content_block_start", {"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}})
    + _event("ping", {"type": "ping"})
    + _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "Hello! ✓"}})
    + _event("content_block_stop", {"type": "content_block_stop", "index": 0}))
MESSAGES_SSE = (
    _event("message_start", {"type": "message_start", "message": {**_MESSAGE, "model": SONNET, "usage": {
        "input_tokens": 12, "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 30000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 1, "service_tier": "standard"}}})
    + _BLOCKS
    + _event("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"input_tokens": 12, "cache_creation_input_tokens": 1500,
                                         "cache_read_input_tokens": 30000, "output_tokens": 25}})
    + _event("message_stop", {"type": "message_stop"}))
# Older API versions: message_delta carries output_tokens only; several deltas (server tools).
MESSAGES_OLD_API_SSE = (
    MESSAGES_SSE.split(b"event: message_delta")[0]
    + _event("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 10}})
    + _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": {"output_tokens": 25}})
    + _event("message_stop", {"type": "message_stop"}))
MESSAGES_BRIDGED_SSE = (
    _event("message_start", {"type": "message_start", "message": {
        **_MESSAGE, "model": GPT, "usage": {"input_tokens": 0, "output_tokens": 0}}})
    + _BLOCKS
    + _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": {"input_tokens": 31500, "output_tokens": 300}})
    + _event("message_stop", {"type": "message_stop"}))

_RESP = {"id": "resp_bGl0ZWxsbTptb2RlbF9pZA==", "object": "response", "created_at": 1760000000,
         "model": GPT}
RESPONSES_SSE = (
    _data({"type": "response.created", "response": {**_RESP, "status": "in_progress", "usage": None},
           "sequence_number": 0})
    + _data({"type": "response.in_progress", "response": {**_RESP, "status": "in_progress",
                                                          "usage": None}, "sequence_number": 1})
    + _data({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
             "content_index": 0, "delta": "Hello! ✓", "sequence_number": 2})
    + _data({"type": "response.completed", "response": {**_RESP, "status": "completed", "usage": {
        "input_tokens": 31500, "input_tokens_details": {"cached_tokens": 30000},
        "output_tokens": 300, "output_tokens_details": {"reasoning_tokens": 256},
        "total_tokens": 31800}}, "sequence_number": 3})
    + b"data: [DONE]\n\n")

# (id, format, body, expected usage, body as a client that did not ask for usage receives it)
SAMPLES = [
    ("chat-anthropic", "chat", CHAT_ANTHROPIC_SSE, Usage(ANTHROPIC_TOKENS, SONNET, None),
     CHAT_ANTHROPIC_SSE.replace(CHAT_ANTHROPIC_USAGE_CHUNK, b"")),
    ("chat-openai", "chat", CHAT_OPENAI_SSE, Usage(OPENAI_TOKENS, GPT, None),
     CHAT_OPENAI_SSE.replace(CHAT_OPENAI_USAGE_CHUNK, b"")),
    ("messages", "messages", MESSAGES_SSE, Usage(ANTHROPIC_TOKENS, SONNET, None), MESSAGES_SSE),
    ("messages-old-api", "messages", MESSAGES_OLD_API_SSE, Usage(ANTHROPIC_TOKENS, SONNET, None),
     MESSAGES_OLD_API_SSE),
    ("messages-bridged", "messages", MESSAGES_BRIDGED_SSE,
     Usage(TokenCounts(input=31500, output=300), GPT, None), MESSAGES_BRIDGED_SSE),
    ("responses", "responses", RESPONSES_SSE, Usage(OPENAI_TOKENS, GPT, None), RESPONSES_SSE),
]
SAMPLE_IDS = [s[0] for s in SAMPLES]


def _crlf(body: bytes) -> bytes:
    return body.replace(b"\n", b"\r\n")


def _cr(body: bytes) -> bytes:
    return body.replace(b"\n", b"\r")


def drive(tap, chunks) -> list[bytes]:
    """Call a stream callable exactly as mitmproxy 12's HttpStream.state_stream_response_body does,
    returning the chunks it would send to the client."""
    sent: list[bytes] = []
    for chunk in chunks:  # ResponseData
        out = tap(chunk)
        sent.extend([out] if isinstance(out, bytes) else out)
    out = tap(b"")  # ResponseEndOfMessage
    if out == b"":
        out = []
    elif isinstance(out, bytes):
        out = [out]
    sent.extend(out)
    return sent


def _pieces(body: bytes, cuts) -> list[bytes]:
    cuts = sorted({c for c in cuts if 0 < c < len(body)})
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


def test_protocol_is_what_the_tap_assumes():
    """Guard: if mitmproxy changes how stream callables are called, `drive` and the tap need review."""
    from mitmproxy.proxy.layers.http import HttpStream
    src = inspect.getsource(HttpStream.state_stream_response_body)
    assert "self.flow.response.stream(event.data)" in src
    assert 'self.flow.response.stream(b"")' in src
    assert "isinstance(chunks, bytes)" in src


# --- parser -------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, events", [
    (b"data: a\n\n", [(None, "a")]),
    (b"data:a\n\n", [(None, "a")]),
    (b"data:  a\n\n", [(None, " a")]),
    (b"event: x\ndata: a\n\n", [("x", "a")]),
    (b"data: a\ndata: b\n\n", [(None, "a\nb")]),
    (b"data: a\r\n\r\ndata: b\r\rdata: c\n\n", [(None, "a"), (None, "b"), (None, "c")]),
    (b": ping\n\ndata: a\n: comment inside\n\n", [(None, "a")]),
    (b"id: 1\nretry: 10\ndata: a\n\n", [(None, "a")]),
    (b"event: ping\n\ndata: a\n\n", [(None, "a")]),  # an event without data dispatches nothing
    (b"data\n\n", [(None, "")]),
    (b"data: [DONE]\n\n", [(None, "[DONE]")]),
    (b"data: a:b: c\n\n", [(None, "a:b: c")]),
    (b"data: \xe2\x9c\x93\n\n", [(None, "✓")]),
    (b"data: \xff\xfe ok\n\n", [(None, "\ufffd\ufffd ok")]),
    (b"data: a\n", []),  # not yet complete
    (b"\n\n\n", []),
])
def test_parser(raw, events):
    assert [(e.event, e.data) for e in SSEParser().feed(raw)] == events


@pytest.mark.parametrize("raw, events", [
    (b"data: a", [(None, "a")]),
    (b"data: a\r", [(None, "a")]),
    (b"event: x\ndata: a\ndata: b", [("x", "a\nb")]),
    (b"data: a\n\n: trailing", [(None, "a")]),  # the comment adds nothing
    (b"", []),
])
def test_parser_finish_dispatches_an_unterminated_event(raw, events):
    parser = SSEParser()
    got = parser.feed(raw) + parser.finish()
    assert [(e.event, e.data) for e in got] == events


@pytest.mark.parametrize("_id, fmt, body, usage, stripped", SAMPLES, ids=SAMPLE_IDS)
@pytest.mark.parametrize("variant", [bytes, _crlf, _cr], ids=["lf", "crlf", "cr"])
def test_parser_every_two_way_split(_id, fmt, body, usage, stripped, variant):
    body = variant(body)
    parser = SSEParser()
    whole = parser.feed(body) + parser.finish()  # with bare \r, the last one awaits a possible \n
    assert whole and all(isinstance(e, SSEEvent) for e in whole)
    for i in range(len(body) + 1):
        parser = SSEParser()
        events = parser.feed(body[:i]) + parser.feed(body[i:]) + parser.finish()
        assert events == whole, i


def test_parser_drops_an_oversized_event_and_recovers():
    parser = SSEParser(max_event_bytes=1000)
    big = b"data: " + b"x" * 5000 + b"\ndata: more\n\n"
    events = []
    for piece in _pieces(big + b"data: next\n\n", range(0, 10000, 7)):
        events += parser.feed(piece)
    assert [e.data for e in events] == ["next"]
    assert parser.dropped == 1


def test_parser_drops_an_event_with_too_many_lines():
    parser = SSEParser(max_event_bytes=1000)
    events = parser.feed(b"data: 0123456789\n" * 200 + b"\ndata: next\n\n")
    assert [e.data for e in events] == ["next"]


# --- stream usage ---------------------------------------------------------------------------------

@pytest.mark.parametrize("_id, fmt, body, usage, stripped", SAMPLES, ids=SAMPLE_IDS)
@pytest.mark.parametrize("variant", [bytes, _crlf, _cr], ids=["lf", "crlf", "cr"])
def test_usage_from_sse_body(_id, fmt, body, usage, stripped, variant):
    assert usage_from_sse_body(fmt, variant(body)) == usage


def test_messages_delta_counts_are_cumulative_not_summed():
    # message_start says output 1, deltas say 10 then 25: the bill is 25 output tokens.
    assert usage_from_sse_body("messages", MESSAGES_OLD_API_SSE).tokens.output == 25


def test_messages_without_event_lines():
    body = b"".join(line + b"\n" for line in MESSAGES_SSE.split(b"\n") if not line.startswith(b"event:"))
    assert usage_from_sse_body("messages", body) == Usage(ANTHROPIC_TOKENS, SONNET, None)


def test_responses_usage_only_from_the_final_event():
    # An in-progress event with usage must not count: only response.completed bills.
    early = _data({"type": "response.in_progress", "response": {
        **_RESP, "usage": {"input_tokens": 999999, "output_tokens": 999999}}})
    assert usage_from_sse_body("responses", early) is None
    assert usage_from_sse_body("responses", early + RESPONSES_SSE).tokens == OPENAI_TOKENS


def test_stream_usage_counts_malformed_and_last_chat_usage_wins():
    stream = StreamUsage("chat")
    for data in ['{"model": "m", "choices": []}', '{"usage": {"prompt_tokens": 5}}', '{"usage": oops',
                 '{"usage": {"prompt_tokens": 7, "completion_tokens": 2}}', '{"usage": "junk"}',
                 "[DONE]"]:
        stream.feed(SSEEvent(None, data))
    assert stream.malformed == 1
    assert stream.result() == Usage(TokenCounts(input=7, output=2), "m", None)


def test_chat_without_include_usage_has_no_usage():
    body = CHAT_OPENAI_SSE.replace(CHAT_OPENAI_USAGE_CHUNK, b"")
    assert usage_from_sse_body("chat", body) is None


def test_chat_usage_cost_in_stream():
    chunk = json.loads(CHAT_OPENAI_USAGE_CHUNK[6:])
    chunk["usage"]["cost"] = 0.001725
    body = CHAT_OPENAI_SSE.replace(CHAT_OPENAI_USAGE_CHUNK, _data(chunk))
    assert usage_from_sse_body("chat", body).cost == 0.001725


MALFORMED = (b"data: {not json\n\n"
             b"data: {\"choices\": 5, \"usage\": \"x\", \"type\": \"message_delta\"}\n\n"
             b"event: message_delta\ndata: [1, 2]\n\n"
             b"data: {\"type\": \"response.completed\", \"response\": 7}\n\n"
             b"data: {\"usage\": {\"prompt_tokens\": -1}}\n\n"
             b"data: \xff\xfe\x00\n\n"
             b"data: " + b"[" * 100000 + b"\n\n")


@pytest.mark.parametrize("_id, fmt, body, usage, stripped", SAMPLES, ids=SAMPLE_IDS)
def test_malformed_events_are_skipped(_id, fmt, body, usage, stripped):
    # Garbage before, inside (between two events) and after the real stream.
    first = body.index(b"\n\n") + 2
    noisy = MALFORMED + body[:first] + MALFORMED + body[first:] + MALFORMED
    assert usage_from_sse_body(fmt, noisy) == usage
    tap = SSETap(fmt)
    assert b"".join(drive(tap, _pieces(noisy, range(0, len(noisy), 4096)))) == noisy
    assert tap.usage == usage and tap.errors == 0


# --- the tap ------------------------------------------------------------------------------------

@pytest.mark.parametrize("_id, fmt, body, usage, stripped", SAMPLES, ids=SAMPLE_IDS)
@pytest.mark.parametrize("variant", [bytes, _crlf], ids=["lf", "crlf"])
def test_tap_every_two_way_split(_id, fmt, body, usage, stripped, variant):
    body, stripped = variant(body), variant(stripped)
    for i in range(len(body) + 1):
        chunks = _pieces(body, [i])
        tap = SSETap(fmt)
        for chunk in chunks:
            assert tap(chunk) is chunk  # passed on at once, unchanged
        assert tap(b"") == []
        assert tap.usage == usage and tap.bytes_seen == len(body), i

        tap = SSETap(fmt, strip_usage_chunk=True)
        sent = drive(tap, chunks)
        assert b"".join(sent) == stripped and all(sent), i
        assert tap.usage == usage, i


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample=st.sampled_from(SAMPLES), crlf=st.booleans(),
       cuts=st.lists(st.integers(min_value=1, max_value=5000), max_size=40))
def test_tap_random_splits(sample, crlf, cuts):
    _id, fmt, body, usage, stripped = sample
    if crlf:
        body, stripped = _crlf(body), _crlf(stripped)
    chunks = _pieces(body, cuts)
    plain = SSETap(fmt)
    assert b"".join(drive(plain, chunks)) == body
    strip = SSETap(fmt, strip_usage_chunk=True)
    sent = drive(strip, chunks)
    assert b"".join(sent) == stripped and all(sent)
    assert plain.usage == strip.usage == usage
    assert plain.events_seen == strip.events_seen == len(SSEParser().feed(body))


@pytest.mark.parametrize("chunk, dropped", [
    (CHAT_OPENAI_USAGE_CHUNK, True),
    (_data({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}), True),
    (_data({"usage": {"prompt_tokens": 1, "completion_tokens": 1}}), True),
    # Anything a client could notice is kept, even with usage attached.
    (_data({"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": {"prompt_tokens": 1}}), False),
    (_data({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1}}), False),
    (_data({"choices": [{"index": 0, "delta": {}}], "usage": None}), False),
    (b"data: {\"usage\": {}, \"choices\": [\n\n", False),
    (b"data: [DONE]\n\n", False),
    (b": usage\n\n", False),
])
def test_strip_only_the_usage_only_chunk(chunk, dropped):
    head = _data({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})
    body = head + chunk + b"data: [DONE]\n\n"
    expected = head + b"data: [DONE]\n\n" if dropped else body
    assert strip_usage_chunk_from_body(body) == expected
    assert b"".join(drive(SSETap("chat", strip_usage_chunk=True), [body])) == expected


def test_strip_holds_partial_events_and_releases_pings_at_once():
    tap = SSETap("chat", strip_usage_chunk=True)
    assert tap(b"data: {\"choices\": [{\"delta\": {\"content\": \"a\"}}]}") == []
    assert tap(b"\n\n: ping\n\ndata: {\"usa") == (
        b"data: {\"choices\": [{\"delta\": {\"content\": \"a\"}}]}\n\n: ping\n\n")
    assert tap(b"ge\": {\"prompt_tokens\": 3}, \"choices\": []}\n\n") == []
    assert tap(b"") == []
    assert tap.usage.tokens == TokenCounts(input=3)


def test_stream_ending_without_blank_line_is_metered_and_flushed():
    body = CHAT_OPENAI_SSE.replace(b"data: [DONE]\n\n", b"").rstrip(b"\n")
    tap = SSETap("chat")
    assert b"".join(drive(tap, [body])) == body
    assert tap.usage == Usage(OPENAI_TOKENS, GPT, None)
    strip = SSETap("chat", strip_usage_chunk=True)
    assert b"".join(drive(strip, [body])) == CHAT_OPENAI_SSE.replace(
        CHAT_OPENAI_USAGE_CHUNK + b"data: [DONE]\n\n", b"")
    # An unterminated ordinary event is delivered, not lost.
    strip = SSETap("chat", strip_usage_chunk=True)
    assert b"".join(drive(strip, [b"data: {\"choices\": []}"])) == b"data: {\"choices\": []}"


def test_usage_readable_without_end_call():
    # A dropped connection fires mitmproxy's `error` hook with no final b"" call.
    tap = SSETap("chat")
    tap(CHAT_OPENAI_SSE[: CHAT_OPENAI_SSE.index(b"data: [DONE]")])
    assert tap.usage == Usage(OPENAI_TOKENS, GPT, None)


def test_empty_chunk_mid_stream_loses_nothing():
    # An empty non-final HTTP/2 DATA frame would reach the tap as b"" before more data. A usage chunk
    # already half released then goes to the client whole: harmless, unlike a truncated event.
    body = CHAT_OPENAI_SSE
    usage_at = body.index(CHAT_OPENAI_USAGE_CHUNK)
    for cut, strip, expected in [
        (usage_at + 20, False, body),
        (usage_at + 20, True, body),
        (usage_at, True, body.replace(CHAT_OPENAI_USAGE_CHUNK, b"")),
        (usage_at + len(CHAT_OPENAI_USAGE_CHUNK) - 1, True, body.replace(CHAT_OPENAI_USAGE_CHUNK, b"")),
    ]:
        tap = SSETap("chat", strip_usage_chunk=strip)
        sent = drive(tap, [body[:cut], b"", body[cut:]])
        assert b"".join(sent) == expected and all(sent), (cut, strip)
        assert tap.usage == Usage(OPENAI_TOKENS, GPT, None)
        assert tap.events_seen == 5


def test_strip_passes_an_oversized_event_through():
    big = b"data: {\"choices\": [{\"delta\": {\"content\": \"" + b"x" * 3000 + b"\"}}]}\n\n"
    body = big + CHAT_OPENAI_USAGE_CHUNK + b"data: [DONE]\n\n"
    tap = SSETap("chat", strip_usage_chunk=True, max_event_bytes=1000)
    sent = drive(tap, _pieces(body, range(0, len(body), 100)))
    assert b"".join(sent) == big + b"data: [DONE]\n\n"
    assert tap.usage == Usage(OPENAI_TOKENS, GPT, None)


def test_internal_error_fails_open(monkeypatch):
    tap = SSETap("chat", strip_usage_chunk=True)
    assert tap(b"data: {\"choices\": []}\n\ndata: par") == b"data: {\"choices\": []}\n\n"

    def boom(data):
        raise RuntimeError("bug")

    monkeypatch.setattr(SSETap, "_scan", lambda self, data: boom(data))
    assert tap(b"tial\n\n") == b"data: partial\n\n"  # held bytes released, nothing lost
    assert tap(b"data: more\n\n") == b"data: more\n\n"
    assert tap(b"") == []
    assert tap.errors >= 1


def test_tap_on_a_mitmproxy_flow():
    from mitmproxy.test import tflow
    flow = tflow.tflow(resp=True)
    flow.response.headers["content-type"] = "text/event-stream"
    flow.response.stream = SSETap("messages")
    sent = drive(flow.response.stream, _pieces(MESSAGES_SSE, range(0, len(MESSAGES_SSE), 64)))
    assert b"".join(sent) == MESSAGES_SSE
    assert flow.response.stream.usage == Usage(ANTHROPIC_TOKENS, SONNET, None)
    assert flow.response.stream.events_seen == 7


_GARBAGE = st.lists(st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"\r", b"\n", b"\r\n", b"data:", b"data: ", b"event: message_delta\n", b": ",
                     b"\xff", b"\xe2\x9c", b"{\"usage\": {\"prompt_tokens\": 5}}", b"[DONE]",
                     b"{\"type\": \"response.completed\"", CHAT_OPENAI_USAGE_CHUNK[:40]]),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(pieces=_GARBAGE, fmt=st.sampled_from(["chat", "messages", "responses"]),
       small_cap=st.booleans())
def test_tap_never_raises_on_garbage(pieces, fmt, small_cap):
    cap = 64 if small_cap else 1 << 20
    chunks = [p for p in pieces if p]
    body = b"".join(chunks)
    tap = SSETap(fmt, max_event_bytes=cap)
    assert b"".join(drive(tap, chunks)) == body
    assert tap.errors == 0 and tap.bytes_seen == len(body)
    strip = SSETap(fmt, strip_usage_chunk=True, max_event_bytes=cap)
    sent = drive(strip, chunks)
    assert all(isinstance(s, bytes) and s for s in sent)
    out = b"".join(sent)
    if b"usage" not in body:
        assert out == body
    assert len(out) <= len(body)
    assert tap.usage is None or isinstance(tap.usage, Usage)
    assert strip.usage is None or isinstance(strip.usage, Usage)


# --- memory -------------------------------------------------------------------------------------

def _synthetic_stream(total: int, chunk_size: int = 64 * 1024):
    """`total` bytes of chat chunks (with a 5 MiB event in the middle), in `chunk_size` pieces."""
    event = _data({**_CHUNK, "model": GPT,
                   "choices": [{"index": 0, "delta": {"content": "lorem ipsum ✓ " * 70}}]})
    pattern = event * (1 << 20 // len(event) + 1)
    ring = pattern * 2
    sent = 0
    giant_at = total // 2
    while sent < total:
        off = sent % len(pattern)
        chunk = ring[off:off + chunk_size]
        sent += len(chunk)
        yield chunk
        if giant_at and sent >= giant_at:
            giant_at = 0
            yield b"data: "
            for _ in range((5 << 20) // chunk_size):
                yield b"y" * chunk_size
            yield b"\n\n"
    # Realign to an event boundary, then the usage chunk.
    rest = len(pattern) - sent % len(pattern)
    yield ring[sent % len(pattern):sent % len(pattern) + rest]
    yield CHAT_OPENAI_USAGE_CHUNK + b"data: [DONE]\n\n"


@pytest.mark.parametrize("strip", [False, True], ids=["pass", "strip"])
def test_memory_flat_over_100mb(strip):
    tap = SSETap("chat", strip_usage_chunk=strip)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out_bytes = 0
        for chunk in _synthetic_stream(100 * 1000 * 1000):
            out = tap(chunk)
            out_bytes += len(out) if isinstance(out, bytes) else sum(map(len, out))
        out = tap(b"")
        out_bytes += len(out) if isinstance(out, bytes) else sum(map(len, out))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tap.bytes_seen > 100 * 1000 * 1000
    assert out_bytes == tap.bytes_seen - (len(CHAT_OPENAI_USAGE_CHUNK) if strip else 0)
    assert tap.usage == Usage(OPENAI_TOKENS, GPT, None)
    assert tap.dropped == 1
    print(f"tracemalloc peak: {peak} bytes")
    assert peak < 4 * 1024 * 1024, peak


# -- the bounded copy a tap keeps when flows are kept (mitmweb, -w) ------------------------------
from addon.core.sse import StreamCopy  # noqa: E402


def _split_every(body: bytes, size: int) -> list[bytes]:
    return [body[i:i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("fmt,body,usage,stripped", [s[1:] for s in SAMPLES], ids=SAMPLE_IDS)
@pytest.mark.parametrize("strip", [False, True], ids=["pass", "strip"])
def test_the_kept_copy_is_exactly_what_the_client_received(fmt, body, usage, stripped, strip):
    tap = SSETap(fmt, strip_usage_chunk=strip, keep_bytes=1 << 20)
    sent = b"".join(drive(tap, _split_every(body, 7)))
    assert tap.kept_body() == sent
    assert sent == (stripped if strip and fmt == "chat" else body)
    assert not tap.kept_truncated
    assert tap.usage == usage  # keeping a copy changes nothing the meter sees


def test_keep_can_be_switched_on_after_construction_and_a_default_tap_keeps_nothing():
    plain = SSETap("chat")
    drive(plain, [CHAT_OPENAI_SSE])
    assert plain.kept_body() is None and not plain.keeps_copy
    late = SSETap("chat")
    late.keep(1 << 20)  # what the flow observer does in `responseheaders`, before the first chunk
    assert b"".join(drive(late, _split_every(CHAT_OPENAI_SSE, 13))) == late.kept_body() == CHAT_OPENAI_SSE
    late.release_copy()
    assert late.kept_body() is None


def test_beyond_the_bound_the_head_and_tail_are_kept_at_event_boundaries_with_a_marker():
    events = [b'data: {"n":%d,"choices":[{"delta":{"content":"%s"}}]}\n\n' % (i, b"x" * 50) for i in range(2000)]
    body = b"".join(events)
    tap = SSETap("chat", keep_bytes=8192)
    drive(tap, _split_every(body, 333))
    kept = tap.kept_body()
    assert tap.kept_truncated and len(kept) <= 8192 + 200
    assert kept.startswith(events[0]) and kept.endswith(events[-1])
    head, marker, tail = kept.partition(b": openhands-sidecar: ")
    assert head.endswith(b"\n\n") and marker
    omitted = int(tail.split(b" ", 1)[0])
    rest = tail.split(b"\n\n", 1)[1]
    assert len(head) + omitted + len(rest) == len(body)  # the marker says exactly what is missing
    assert body.startswith(head) and body.endswith(rest)
    parsed = SSEParser().feed(kept)  # every event in the copy is whole: the views parse it
    assert all(json.loads(ev.data)["choices"] for ev in parsed)


@pytest.mark.parametrize("limit", [2, 10, 1000])
@pytest.mark.parametrize("size", [1, 7, 4096])
def test_stream_copy_bounds_memory_and_keeps_the_ends(limit, size):
    data = bytes(range(256)) * 40
    copy = StreamCopy(limit)
    for piece in _split_every(data, size):
        copy.add(piece)
        assert len(copy._head) + len(copy._tail) <= copy.head_cap + 2 * copy.tail_cap + size
    value = copy.value()
    assert copy.total == len(data) and copy.truncated == (len(data) > limit)
    if copy.truncated:
        assert value.startswith(data[:copy.head_cap]) and value.endswith(data[-copy.tail_cap:])
    else:
        assert value == data


def test_the_copy_stays_bounded_over_a_100mb_stream():
    tap = SSETap("chat", keep_bytes=1 << 20)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for chunk in _synthetic_stream(100 * 1000 * 1000):
            tap(chunk)
        tap(b"")
        kept = tap.kept_body()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tap.kept_truncated and len(kept) < (1 << 20) + 300
    assert kept.endswith(b"data: [DONE]\n\n")
    assert peak < 6 * 1024 * 1024, peak  # the bound (1 MiB, tail window 1.5x) plus the parser's own
