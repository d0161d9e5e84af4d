"""Usage extraction from JSON bodies, with the payloads observed from LiteLLM 1.80 (reference §3)."""
from __future__ import annotations

import copy
import json

import pytest

from addon.core.usage import Usage, add_include_usage, parse_json, usage_from_json, wire_format_for_path
from pricing.tokens import TokenCounts

SONNET = "claude-sonnet-4-5-20250929"
GPT = "gpt-5-mini-2025-08-07"

# Fake upstream usage: Anthropic input 12, cache writes 1500, cache reads 30000, output 25;
# OpenAI prompt 31500 of which 30000 cached, completion 300 of which 256 reasoning.
ANTHROPIC_TOKENS = TokenCounts(input=12, cache_write=1500, cache_read=30000, output=25)
OPENAI_TOKENS = TokenCounts(input=1500, cache_read=30000, output=300, reasoning=256)

CHAT_ANTHROPIC_JSON = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1760000000, "model": SONNET,
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Hello!"}}],
    "usage": {"completion_tokens": 25, "prompt_tokens": 31512, "total_tokens": 31537,
              "prompt_tokens_details": {
                  "cached_tokens": 30000, "cache_creation_tokens": 1500,
                  "cache_creation_token_details": {"ephemeral_5m_input_tokens": 1500,
                                                   "ephemeral_1h_input_tokens": 0}},
              "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 30000},
}

CHAT_OPENAI_JSON = {
    "id": "chatcmpl-2", "object": "chat.completion", "created": 1760000000, "model": GPT,
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Hello!"}}],
    "usage": {"completion_tokens": 300, "prompt_tokens": 31500, "total_tokens": 31800,
              "completion_tokens_details": {"accepted_prediction_tokens": 0, "audio_tokens": 0,
                                            "reasoning_tokens": 256, "rejected_prediction_tokens": 0},
              "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 30000}},
}

CHAT_KIMI_JSON = {
    "model": "kimi-k2-thinking", "choices": [],
    "usage": {"prompt_tokens": 5000, "completion_tokens": 700, "total_tokens": 5700,
              "cached_tokens": 4096, "prompt_tokens_details": None,
              "completion_tokens_details": {"reasoning_tokens": 600}},
}

MESSAGES_JSON = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": SONNET,
    "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn",
    "usage": {"input_tokens": 12, "cache_creation_input_tokens": 1500,
              "cache_read_input_tokens": 30000,
              "cache_creation": {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 0},
              "output_tokens": 25, "service_tier": "standard"},
}

MESSAGES_BRIDGED_JSON = {
    "id": "msg_2", "type": "message", "role": "assistant", "model": GPT,
    "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn",
    "usage": {"input_tokens": 31500, "output_tokens": 300},
}

RESPONSES_JSON = {
    "id": "resp_1", "object": "response", "created_at": 1760000000, "status": "completed",
    "model": GPT, "output": [],
    "usage": {"input_tokens": 31500, "input_tokens_details": {"cached_tokens": 30000},
              "output_tokens": 300, "output_tokens_details": {"reasoning_tokens": 256},
              "total_tokens": 31800, "audio_tokens": None, "text_tokens": None, "cost": None},
}

RESPONSES_BRIDGED_JSON = {
    "id": "resp_2", "object": "response", "status": "completed", "model": SONNET,
    "usage": {"input_tokens": 31512, "output_tokens": 25, "total_tokens": 31537},
}


def _with_usage(body: dict, **changes) -> dict:
    body = copy.deepcopy(body)
    body["usage"].update(changes)
    return body


@pytest.mark.parametrize("fmt, body, tokens, model", [
    ("chat", CHAT_ANTHROPIC_JSON, ANTHROPIC_TOKENS, SONNET),
    ("chat", CHAT_OPENAI_JSON, OPENAI_TOKENS, GPT),
    ("chat", CHAT_KIMI_JSON, TokenCounts(input=904, cache_read=4096, output=700, reasoning=600),
     "kimi-k2-thinking"),
    ("messages", MESSAGES_JSON, ANTHROPIC_TOKENS, SONNET),
    ("messages", MESSAGES_BRIDGED_JSON, TokenCounts(input=31500, output=300), GPT),
    ("responses", RESPONSES_JSON, OPENAI_TOKENS, GPT),
    ("responses", RESPONSES_BRIDGED_JSON, TokenCounts(input=31512, output=25), SONNET),
], ids=["chat-anthropic", "chat-openai", "chat-kimi", "messages", "messages-bridged", "responses",
        "responses-bridged"])
def test_reference_payloads(fmt, body, tokens, model):
    # Round-trip through JSON text: the addon sees bodies as parsed JSON, not Python literals.
    usage = usage_from_json(fmt, json.loads(json.dumps(body)))
    assert usage == Usage(tokens=tokens, model=model, cost=None)


def test_reference_chat_anthropic_totals_match_litellm_prompt_tokens():
    tokens = usage_from_json("chat", CHAT_ANTHROPIC_JSON).tokens
    assert tokens.prompt_total == 31512 and tokens.total == 31537


@pytest.mark.parametrize("fmt, body, tokens", [
    # 1-hour writes are priced apart, so they must be split out of the write total.
    ("chat", _with_usage(CHAT_ANTHROPIC_JSON, prompt_tokens_details={
        "cached_tokens": 30000, "cache_creation_tokens": 1500,
        "cache_creation_token_details": {"ephemeral_5m_input_tokens": 1000,
                                         "ephemeral_1h_input_tokens": 500}}),
     TokenCounts(input=12, cache_write=1000, cache_write_1h=500, cache_read=30000, output=25)),
    ("messages", _with_usage(MESSAGES_JSON, cache_creation={"ephemeral_5m_input_tokens": 1000,
                                                            "ephemeral_1h_input_tokens": 500}),
     TokenCounts(input=12, cache_write=1000, cache_write_1h=500, cache_read=30000, output=25)),
    # Only the prompt_tokens_details spelling of writes present.
    ("chat", {"usage": {"prompt_tokens": 2000, "completion_tokens": 1,
                        "prompt_tokens_details": {"cached_tokens": 0, "cache_creation_tokens": 1500}}},
     TokenCounts(input=500, cache_write=1500, output=1)),
    # Only the top-level Anthropic spelling of reads present.
    ("chat", {"usage": {"prompt_tokens": 2000, "completion_tokens": 1, "cache_read_input_tokens": 1800}},
     TokenCounts(input=200, cache_read=1800, output=1)),
    # A `cached_tokens: 0` placeholder must not hide Kimi's top-level count.
    ("chat", {"usage": {"prompt_tokens": 5000, "completion_tokens": 1, "cached_tokens": 4096,
                        "prompt_tokens_details": {"cached_tokens": 0}}},
     TokenCounts(input=904, cache_read=4096, output=1)),
    # Inconsistent upstream (cache larger than the prompt): never a negative input.
    ("chat", {"usage": {"prompt_tokens": 100, "completion_tokens": 1,
                        "prompt_tokens_details": {"cached_tokens": 500}}},
     TokenCounts(input=0, cache_read=500, output=1)),
    ("responses", {"usage": {"input_tokens": 10, "output_tokens": 1,
                             "input_tokens_details": {"cached_tokens": 50}}},
     TokenCounts(input=0, cache_read=50, output=1)),
])
def test_cache_variants(fmt, body, tokens):
    assert usage_from_json(fmt, body).tokens == tokens


@pytest.mark.parametrize("fmt, body, cost", [
    ("chat", _with_usage(CHAT_OPENAI_JSON, cost=0.001725), 0.001725),
    ("chat", _with_usage(CHAT_OPENAI_JSON, cost=0), 0.0),
    ("chat", _with_usage(CHAT_OPENAI_JSON, cost=None), None),
    ("chat", _with_usage(CHAT_OPENAI_JSON, cost="0.1"), None),
    ("chat", _with_usage(CHAT_OPENAI_JSON, cost=-1.0), None),
    ("chat", _with_usage(CHAT_OPENAI_JSON, cost=float("nan")), None),
    ("chat", _with_usage(CHAT_OPENAI_JSON, cost=float("inf")), None),
    ("chat", _with_usage(CHAT_OPENAI_JSON, cost=True), None),
    ("responses", _with_usage(RESPONSES_JSON, cost=0.5), 0.5),
    ("messages", _with_usage(MESSAGES_JSON, cost=0.015036), 0.015036),
])
def test_cost_from_body(fmt, body, cost):
    usage = usage_from_json(fmt, body)
    assert usage.cost == cost
    assert usage.tokens.output > 0  # a bad cost field does not discard the tokens


@pytest.mark.parametrize("fmt, body", [
    ("chat", None), ("chat", []), ("chat", "usage"), ("chat", 42), ("chat", {}),
    ("chat", {"usage": None}), ("chat", {"usage": []}), ("chat", {"usage": "31500"}),
    ("chat", {"usage": {}}), ("chat", {"usage": {"total_tokens": 10}}),
    ("chat", {"usage": {"prompt_tokens": "12", "completion_tokens": "3"}}),
    ("chat", {"usage": {"prompt_tokens": True, "completion_tokens": False}}),
    ("chat", {"usage": {"prompt_tokens": -5, "completion_tokens": float("nan")}}),
    ("chat", {"usage": {"prompt_tokens": 1.5, "completion_tokens": float("inf")}}),
    ("messages", {"usage": {"service_tier": "standard"}}),
    ("messages", {"usage": {"input_tokens": None, "output_tokens": [1]}}),
    ("responses", {"usage": None}), ("responses", {"response": {"usage": {"input_tokens": 1}}}),
    ("bogus", CHAT_OPENAI_JSON), (None, CHAT_OPENAI_JSON),
])
def test_junk_gives_none(fmt, body):
    assert usage_from_json(fmt, body) is None


@pytest.mark.parametrize("fmt, usage, tokens", [
    # Bad fields are ignored, good ones kept.
    ("chat", {"prompt_tokens": 100, "completion_tokens": -3}, TokenCounts(input=100)),
    ("chat", {"prompt_tokens": 100.0, "completion_tokens": 7,
              "prompt_tokens_details": "junk", "completion_tokens_details": [1]},
     TokenCounts(input=100, output=7)),
    ("chat", {"prompt_tokens": 100, "completion_tokens": 7,
              "prompt_tokens_details": {"cached_tokens": True, "cache_creation_tokens": -1,
                                        "cache_creation_token_details": {"ephemeral_1h_input_tokens": "x"}},
              "cache_read_input_tokens": float("nan"), "cached_tokens": None},
     TokenCounts(input=100, output=7)),
    ("messages", {"input_tokens": 12, "output_tokens": "25", "cache_read_input_tokens": -1,
                  "cache_creation": "junk"}, TokenCounts(input=12)),
    ("messages", {"input_tokens": 12, "output_tokens": 25, "cache_creation_input_tokens": 100,
                  "cache_creation": {"ephemeral_1h_input_tokens": 10 ** 9}},
     TokenCounts(input=12, cache_write_1h=100, output=25)),
    ("responses", {"input_tokens": 10, "output_tokens": False, "input_tokens_details": None,
                   "output_tokens_details": {"reasoning_tokens": -1}}, TokenCounts(input=10)),
])
def test_bad_fields_are_ignored(fmt, usage, tokens):
    assert usage_from_json(fmt, {"model": 7, "usage": usage}) == Usage(tokens, None, None)


@pytest.mark.parametrize("path, fmt", [
    ("/chat/completions", "chat"), ("/v1/chat/completions", "chat"),
    ("/v1/chat/completions?foo=bar", "chat"), ("/chat/completions/", "chat"),
    ("/v1/messages", "messages"), ("/v1/messages?beta=true", "messages"),
    ("/responses", "responses"), ("/v1/responses", "responses"), ("/v1/responses?x=1", "responses"),
    ("/v1/messages/count_tokens", None), ("/v1/models", None), ("/v1/model/info", None),
    ("/key/info", None), ("/", None), ("", None), ("/v1/responses/resp_1", None),
    ("/admin/openhands/keys", None), ("/messages", None), ("/v2/chat/completions", None),
])
def test_wire_format_for_path(path, fmt):
    assert wire_format_for_path(path) == fmt


@pytest.mark.parametrize("body, changed, after", [
    ({"stream": True}, True, {"stream": True, "stream_options": {"include_usage": True}}),
    ({"stream": True, "stream_options": {}}, True,
     {"stream": True, "stream_options": {"include_usage": True}}),
    ({"stream": True, "stream_options": {"include_usage": False, "x": 1}}, True,
     {"stream": True, "stream_options": {"include_usage": True, "x": 1}}),
    ({"stream": True, "stream_options": {"include_usage": True}}, False,
     {"stream": True, "stream_options": {"include_usage": True}}),
    ({"stream": False}, False, {"stream": False}),
    ({}, False, {}),
    ({"stream": "true"}, False, {"stream": "true"}),
    ({"stream": True, "stream_options": "junk"}, False, {"stream": True, "stream_options": "junk"}),
    ([], False, []), (None, False, None), ("stream", False, "stream"),
])
def test_add_include_usage(body, changed, after):
    assert add_include_usage(body) is changed
    assert body == after


@pytest.mark.parametrize("body", [
    json.dumps(CHAT_ANTHROPIC_JSON).encode(),
    b'{"model":"m","usage":{"prompt_tokens":' + str(10**400).encode() + b',"completion_tokens":3}}',
    b'{"model":"m","usage":{"prompt_tokens":123456789012345678901234,"completion_tokens":2,"cost":1e400}}',
    b'{"model":"m","usage":{"prompt_tokens":NaN,"completion_tokens":Infinity,"cost":-1}}',
    b'{"model":"\\ud800","usage":{"prompt_tokens":5,"completion_tokens":5}}',
    b'\xef\xbb\xbf{"model":"bom","usage":{"prompt_tokens":5,"completion_tokens":5}}',
    '{"model":"utf16","usage":{"prompt_tokens":5,"completion_tokens":1}}'.encode("utf-16"),
    b'{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2,"completion_tokens":9}}',  # the last one wins
    b'[' * 5000 + b']' * 5000, b'{"usage": {"prompt_tokens": 1', b'\xff\xfe\x00', b'',
])
def test_the_fast_json_reader_meters_exactly_as_the_standard_one(body):
    """Hostile bodies included: the same usage (or the same refusal) whichever parser read them."""
    def read(loads):
        try:
            return [(u.tokens, u.model, u.cost, u.rejected) if (u := usage_from_json(f, loads(body))) else None
                    for f in ("chat", "messages", "responses")]
        except (ValueError, RecursionError) as e:
            return type(e).__mro__[-3]  # ValueError (any JSON or Unicode error), or RecursionError
    assert read(parse_json) == read(json.loads)


LITELLM_CHAT_USAGE = {  # LiteLLM 1.110's chat usage: nested details, nulls, its own cost
    "prompt_tokens": 31500, "completion_tokens": 300, "total_tokens": 31800, "cost": 0.0017,
    "prompt_tokens_details": {"cached_tokens": 30000, "audio_tokens": None, "text_tokens": None},
    "completion_tokens_details": {"reasoning_tokens": 64, "accepted_prediction_tokens": None, "audio_tokens": None},
}


@pytest.mark.parametrize("changes,named", [
    ({}, ()),
    ({"prompt_tokens": -1}, ("prompt_tokens",)),
    ({"total_tokens": 10**12}, ("total_tokens",)),
    ({"prompt_tokens_details": {"cached_tokens": 10**12, "audio_tokens": -2}},
     ("prompt_tokens_details.cached_tokens", "prompt_tokens_details.audio_tokens")),
    ({"completion_tokens_details": {"reasoning_tokens": float("nan")}},
     ("completion_tokens_details.reasoning_tokens",)),
    ({"cost": float("nan")}, ("cost",)),
    ({"cost": 5000}, ("cost",)),
    ({"cost": 5000.0}, ("cost",)),
    ({"cost": 12}, ()),
    ({"total_tokens": 1e10}, ("total_tokens",)),
    ({"total_tokens": 31800.0}, ()),
    ({"total_tokens": True, "cache_creation_input_tokens": "12", "extra": [1, -1]}, ()),  # not numbers: ignored
    ({"prompt_tokens_details": {"deeper": {"deepest": {"x": -1}}}}, ()),  # past two levels: not read
])
def test_the_usage_warning_names_exactly_the_fields_metering_dropped(changes, named):
    """A hostile or broken answer's implausible counts and costs are dropped and named in one warning per key;
    a usual answer names nothing."""
    usage = {**copy.deepcopy(LITELLM_CHAT_USAGE), **changes}
    got = usage_from_json("chat", {"model": "m", "usage": usage})
    assert got is not None and got.rejected == named
