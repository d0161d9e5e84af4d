"""The `SSE-LLM` contentview (issue 8 §2): events, reassembled text, usage and cost, in all three formats."""
from __future__ import annotations

import json
import re

import pytest
from mitmproxy import contentviews
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow

from addon.operator import contentview as cv


def sse(*events: tuple[str | None, object]) -> bytes:
    out = []
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data)
        out.append((f"event: {name}\n" if name else "") + f"data: {text}\n\n")
    return "".join(out).encode()


CHAT = sse(
    (None, {"id": "c1", "model": "gpt-5-mini",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
    (None, {"id": "c1", "model": "gpt-5-mini", "choices": [{"index": 0, "delta": {"content": "Hello"}}]}),
    (None, {"id": "c1", "model": "gpt-5-mini", "choices": [{"index": 0, "delta": {"content": ", world"}}]}),
    (None, {"id": "c1", "model": "gpt-5-mini", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"name": "get_weather", "arguments": "{\"city\":"}}]}}]}),
    (None, {"id": "c1", "model": "gpt-5-mini", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": "\"Paris\"}"}}]}}]}),
    (None, {"id": "c1", "model": "gpt-5-mini", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    (None, {"id": "c1", "model": "gpt-5-mini", "choices": [],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
                      "prompt_tokens_details": {"cached_tokens": 40}}}),
    (None, "[DONE]"),
)
MESSAGES = sse(
    ("message_start", {"type": "message_start", "message": {"model": "claude-sonnet-4-5", "usage": {
        "input_tokens": 10, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 300, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking",
                                                                                         "thinking": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "thinking_delta", "thinking": "Let me think."}}),
    ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "text_delta", "text": "Bon"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "text_delta", "text": "jour"}}),
    ("ping", {"type": "ping"}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 42}}),
    ("message_stop", {"type": "message_stop"}),
)
RESPONSES = sse(
    ("response.created", {"type": "response.created", "response": {"model": "gpt-5"}}),
    ("response.output_item.added", {"type": "response.output_item.added", "output_index": 0,
                                    "item": {"type": "message"}}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "output_index": 0, "delta": "Hi "}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "output_index": 0, "delta": "there"}),
    ("response.completed", {"type": "response.completed", "response": {"model": "gpt-5", "usage": {
        "input_tokens": 50, "output_tokens": 7, "input_tokens_details": {"cached_tokens": 20},
        "output_tokens_details": {"reasoning_tokens": 0}}}}),
)


@pytest.mark.parametrize("body,fmt,text,usage", [
    (CHAT, "chat", ["[choice 0 · text]", "Hello, world", "[choice 0 · tool call get_weather]", '{"city":"Paris"}'],
     "body usage: model gpt-5-mini · input 60 · output 20 · cache read 40 · cache write 0"),
    (MESSAGES, "messages", ["[block 0 · thinking]", "Let me think.", "[block 1 · text]", "Bonjour"],
     "body usage: model claude-sonnet-4-5 · input 10 · output 42 · cache read 300 · cache write 5"),
    (RESPONSES, "responses", ["[output 0 · message]", "Hi there"],
     "body usage: model gpt-5 · input 30 · output 7 · cache read 20 · cache write 0"),
])
@pytest.mark.parametrize("known_format", [True, False])
def test_render_all_three_formats(body, fmt, text, usage, known_format):
    out = cv.render(body, fmt if known_format else None)
    events_at, text_at, usage_at = out.index("── events"), out.index("── text ──"), out.index("── usage and cost ──")
    assert events_at < text_at < usage_at  # events, then text, then usage and cost at the end
    assert f"{fmt} format" in out
    for line in text:
        assert line in out.splitlines()
    assert usage in out
    assert re.search(r"body cost: \$\d+\.\d{6} \(bundled price table\)", out)


def test_event_lines_are_one_per_event_and_bounded():
    long = sse((None, {"choices": [{"index": 0, "delta": {"content": "x" * 5000}}]}))
    out = cv.render(long, "chat")
    event_lines = [ln for ln in out.splitlines() if re.match(r"^\s+0 data", ln)]
    assert len(event_lines) == 1 and len(event_lines[0]) < cv.MAX_EVENT_CHARS + 40


@pytest.mark.parametrize("header,expected", [
    ("0.0123", "body cost: $0.012300 (x-litellm-response-cost header)"),
    (None, "(bundled price table)"),
])
def test_cost_prefers_the_upstream_header(header, expected):
    assert expected in cv.render(CHAT, "chat", header_cost=header)


def test_metered_figures_from_the_flow_are_shown():
    meta = {"metered": True, "cost": 0.0042, "cost_source": "header", "key_id": "k1", "key": "sk-pool-...cdef",
            "model": "gpt-5-mini", "tokens": {"input": 60, "output": 20, "cache_read": 40, "cache_write": 0}}
    out = cv.render(CHAT, "chat", meta)
    assert "metered by the sidecar: $0.004200 (header) · key k1 (sk-pool-...cdef) · model gpt-5-mini" in out
    assert "metered tokens: input 60 · output 20 · cache read 40 · cache write 0" in out


def test_empty_body_without_store_streamed_bodies_explains_and_still_shows_metering():
    meta = {"metered": True, "cost": 0.01, "cost_source": "table", "key_id": "k1", "key": "sk-pool-...cdef"}
    out = cv.render(b"", "chat", meta, stored=False)
    assert "store_streamed_bodies=true" in out
    assert "metered by the sidecar: $0.010000 (table)" in out


@pytest.mark.parametrize("junk", [b"\xff\xfe\x00garbage", b"data: {not json\n\n", b"data: [1,2]\n\n",
                                  b"event: x\n" * 1000, sse((None, {"choices": "nope"})),
                                  sse(("content_block_delta", {"type": "content_block_delta", "delta": None}))])
def test_junk_never_raises(junk):
    for fmt in ("chat", "messages", "responses", None):
        assert isinstance(cv.render(junk, fmt), str)


# -- as mitmproxy uses it -------------------------------------------------------------------------
def _flow(body: bytes, path: str = "/v1/chat/completions", ctype: str = "text/event-stream", meta=None):
    f = tflow.tflow(resp=True)
    f.request.path = path
    f.response.headers["content-type"] = ctype
    f.response.content = body
    if meta is not None:
        f.metadata["openhands"] = meta
    return f


def test_name_is_fetchable_by_mitmweb():
    assert re.fullmatch(r"[A-Za-z0-9-]+", cv.VIEW.name) and cv.VIEW.name == "SSE-LLM"


def test_registered_by_the_addon_and_removed_on_unload():

    cv.unregister()
    assert "sse-llm" not in contentviews.registry
    addon = cv.ContentViewAddon()
    with taddons.context(addon) as tctx:
        assert "sse-llm" in contentviews.registry.available_views()
        f = _flow(MESSAGES, "/v1/messages")
        result = contentviews.prettify_message(f.response, f)  # "auto" picks our view for SSE
        assert result.view_name == "SSE-LLM"
        assert "Bonjour" in result.text
        tctx.master.addons.remove(addon)
    assert "sse-llm" not in contentviews.registry
    cv.register()  # leave the registry as other tests found it


@pytest.mark.parametrize("ctype,path,body,chosen", [
    ("text/event-stream", "/v1/chat/completions", CHAT, True),
    ("text/event-stream", "/some/other/stream", CHAT, True),  # still SSE: ours beats raw
    ("application/json", "/v1/chat/completions", b'{"id":1}', False),
    ("text/plain", "/v1/messages", MESSAGES, True),  # a retried stream kept whole, with a generic type
    ("text/plain", "/not/llm", MESSAGES, False),
])
def test_render_priority(ctype, path, body, chosen):
    cv.register()
    f = _flow(body, path, ctype)
    view = contentviews.registry.get_view(body, contentviews.make_metadata(f.response, f))
    assert (view.name == "SSE-LLM") is chosen


@pytest.mark.parametrize("store", [False, True])
def test_prettify_with_and_without_store_streamed_bodies(store):
    cv.register()
    ps = Proxyserver()
    with taddons.context(ps) as tctx:
        tctx.configure(ps, store_streamed_bodies=store)
        meta = {"metered": True, "cost": 0.5, "cost_source": "table", "key_id": "k1", "key": "sk-pool-...cdef",
                "format": "responses"}
        f = _flow(RESPONSES if store else b"", "/v1/responses", meta=meta)
        result = contentviews.prettify_message(f.response, f, "SSE-LLM")
    assert result.view_name == "SSE-LLM"
    assert "metered by the sidecar: $0.500000" in result.text
    assert ("Hi there" in result.text) is store
    assert ("store_streamed_bodies=true" in result.text) is (not store)


def test_prettify_never_raises_even_with_a_broken_flow():
    class Broken:
        flow = property(lambda self: (_ for _ in ()).throw(RuntimeError("boom")))

    assert "could not render" in cv.VIEW.prettify(CHAT, Broken())
    assert cv.VIEW.render_priority(CHAT, Broken()) == -1
